# Two commands on a fresh machine:   make train   |   make test
# Each creates .venv and installs the pinned dependencies first (once; redone when they change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build on machines without an NVIDIA GPU (a plain `pip install torch` would fetch a
# multi-GB CUDA build); with a GPU, keep the system's CUDA torch or install the default CUDA one.
TORCH_CPU := torch==2.13.0
# a CUDA torch brings its own triton; on a CPU, triton's interpreter runs the Triton kernels' tests
TRITON_CPU := triton==3.6.0
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup train test test-gpu bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt Makefile
ifeq ($(HAS_GPU),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || $(PY) -m pip install torch
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_CPU) $(TRITON_CPU)
endif
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests $(ARGS)

clean:
	rm -rf outputs .cache
