# Set-up and the two everyday jobs. On a fresh machine (no torch installed) `make bench` and
# `make test` each install what they need first; a second run installs nothing new.
PYTHON ?= python
PIP = $(PYTHON) -m pip
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: install bench test

install:
	$(PIP) install --quiet "torch==2.14.1" "torchvision==0.29.1" ninja setuptools wheel
	$(PIP) install --quiet --no-build-isolation -e ".[test,bench]"

bench: install
	$(PYTHON) -m resnext_kernels.bench

test: install
	$(PYTHON) -m pytest tests -q
