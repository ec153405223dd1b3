# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
# pip runs without -q so that a first install shows its downloads (torch is the big one).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(BIN)/python:
	@echo "creating the virtual environment $(VENV) ..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

.PHONY: install install-dev cpu-torch demo test test-slow bench
install: $(BIN)/python
	@echo "installing engine and its dependencies into $(VENV) (the first time: torch, several GB with CUDA on Linux) ..."
	$(BIN)/pip install -e .

install-dev: $(BIN)/python
	@echo "installing engine with its test tools into $(VENV) (the first time: torch, several GB with CUDA on Linux) ..."
	$(BIN)/pip install -e '.[dev]'

# CPU-only torch (about 1 GB instead of about 6): run before the first `make demo` or `make test`,
# on a machine that can reach PyTorch's own package index.
cpu-torch: $(BIN)/python
	@echo "installing the CPU-only torch and torchvision wheels from $(TORCH_CPU_INDEX) ..."
	$(BIN)/pip install torch torchvision --index-url $(TORCH_CPU_INDEX)

demo: install
	$(BIN)/engine --home .engine-demo demo
	@echo "engine is installed in $(BIN): run it as $(BIN)/engine, or put it on your PATH with"
	@echo "  source $(BIN)/activate      (then: engine --home .engine-demo query PHOTO)"

test: install-dev
	$(BIN)/python -m pytest

test-slow: install-dev
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/engine bench
