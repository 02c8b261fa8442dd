# The two commands of the README: `make demo` and `make test`. Both install everything first.
# torch's extension builder guesses CUDA_HOME from nvcc's location and can then fail to link
# -lcudart; point it at the toolkit folder whose lib64 holds libcudart instead.
NVCC := $(shell command -v nvcc 2>/dev/null)
CUDA_HOME ?= $(firstword $(foreach d,/usr/local/cuda $(dir $(realpath $(NVCC)))..,$(if $(wildcard $(d)/lib64/libcudart.so*),$(abspath $(d)),)))
export CUDA_HOME
PYTHON ?= python3
export ANML_FAST_DATA ?= $(abspath ../shared/omniglot)

.PHONY: install demo test
install:
	$(PYTHON) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install --quiet setuptools wheel ninja pybind11
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[test]"

demo: install
	anml-fast demo

test: install
	$(PYTHON) -m pytest -q tests
