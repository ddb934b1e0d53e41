"""The benchmark suite and the self-check behind ``python -m resnext_kernels.bench`` (see __main__.py).

One file per job: ``shapes`` (the layers timed, their FLOPs, bytes and memory floor), ``timing``
(CUDA-event medians, the copy bandwidth), ``ops`` (per-op providers and runs), ``batch`` (whole-model
training steps and inference), ``report`` (the results JSON and its schema, markdown, chart),
``environment`` (device, versions, commit), ``selfcheck`` (correctness against float64).
"""
