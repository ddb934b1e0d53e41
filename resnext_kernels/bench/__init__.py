"""Benchmarks and the self-check behind ``python -m resnext_kernels.bench``."""
