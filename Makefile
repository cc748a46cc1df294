# The two commands of the README. Each sets up what it needs on a fresh machine with only Python: a virtual
# environment (.venv, unless one is already active), torch, the requirements.
#   make demo   train a DCO LoRA on the shipped tiny SDXL and write a consistency-guidance grid (~2 min on 2 CPU cores)
#   make test   the test suite (what CI runs)
# TORCH: what to install for torch when it is missing: the version this project is tested with (here pip finds its
# CPU wheel locally; PyPI's Linux wheel carries CUDA: for the CPU build elsewhere pass
# TORCH="torch --index-url https://download.pytorch.org/whl/cpu"), or plain torch where nvidia-smi exists.

VENV ?= .venv
PYTHON := $(if $(VIRTUAL_ENV),python,$(VENV)/bin/python)
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
DEMO := output/demo
export OMP_NUM_THREADS ?= 1

.PHONY: demo test setup setup-test

$(VENV)/bin/python:
	python3 -m venv $(VENV)

setup: $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -r requirements.txt

setup-test: setup
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps open_clip_torch  # its data file is the real CLIP vocabulary; its deps would pull a CUDA torch

demo: setup
	rm -rf $(DEMO)/checker
	$(PYTHON) train.py --images tinyworld/concepts/checker --model tiny --token "<checker>" --init-word yellow \
	    --rank 8 --lr 5e-3 --ti-lr 1e-3 --steps 300 --beta 10 --checkpoint-every 0 --sample-steps 0 \
	    --output $(DEMO)/checker
	$(PYTHON) sample.py --model tiny --lora $(DEMO)/checker --wcon 0,1,2,3 --cfg 4 --n 4 --output $(DEMO)/grid.png \
	    --prompt "a big <checker> circle at the top left on a green background, flat style"
	@echo "demo: the LoRA is in $(DEMO)/checker/, the consistency-guidance grid in $(DEMO)/grid.png"

test: setup-test
	$(PYTHON) -m pytest -q tests
