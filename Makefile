# Two commands do everything on a fresh machine:
#   make bench   - set up, then run the main job (portres bench --backend mlx --depth 50)
#   make test    - set up, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the backends the tests must find: one that failed to install fails the run instead of vanishing from it
EXPECT := PORTRES_EXPECT_BACKENDS=numpy,tinygrad,mlx,torch,onnxruntime

.PHONY: setup system-deps bench test test-opencl test-full test-fast lint matrix mutants mutants-full clean gpu-check gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@PYTHON=$(PYTHON) .ci/system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,test,torch]'
	@touch $@

system-deps:
	@PYTHON=$(PYTHON) .ci/system-deps

bench: setup
	$(BIN)/portres bench --backend mlx --depth 50

test: setup
	$(EXPECT) $(BIN)/python -m pytest -q --durations=25
	@$(MAKE) --no-print-directory test-opencl

# tinygrad's parity and gradient suites on its OpenCL device (pocl on a CPU-only machine), where it has one; the main
# run then leaves them to this tier (tests/conftest.py). PORTRES_OPENCL_TIER=off: both on tinygrad's CPU device
test-opencl: setup
	@if [ "$${PORTRES_OPENCL_TIER:-auto}" != off ] && \
	  $(BIN)/python -c 'import sys; from portres.backends import tinygrad; sys.exit(tinygrad.opencl_device() is None)'; \
	then $(EXPECT) $(BIN)/python -m pytest -q --opencl; \
	else echo "make test: tinygrad finds no OpenCL device, so its CL tier is skipped (sudo apt-get install pocl-opencl-icd)"; fi

# every zoo entry on every backend (tinygrad too): well over 45 minutes on 2 cores
test-full: setup
	$(EXPECT) PORTRES_FULL_ZOO=1 $(BIN)/python -m pytest -q

# the inner loop: the reference, one small network per framework, the mechanics (tests/conftest.py)
test-fast: setup
	$(EXPECT) $(BIN)/python -m pytest -q --fast

# mutation checks: each deliberate bug, applied to a copy of the tree, must turn the test named for it red
mutants: setup
	$(BIN)/python tests/mutants.py

# the same mutants against the whole inner-loop tier (pytest --fast), every red test named
mutants-full: setup
	$(BIN)/python tests/mutants.py --full

lint: setup
	$(BIN)/ruff check .

# The standard CPU matrix for BENCHMARKS.md (the torch peer is in the venv: the tests use it too).
matrix: setup
	$(BIN)/python benchmarks/run_matrix.py --output BENCHMARKS.md

# On a Linux machine with an NVIDIA GPU: parity (fp32/fp16/bf16, gradients) and ResNet-50 speed on tinygrad CUDA/NV,
# MLX gpu and torch cuda within 10 minutes, rows into BENCHMARKS.md (benchmarks/gpu_check.py). Offline: it installs
# from the wheels in .whl/ (make gpu-wheels) and uses the machine's own torch. The project's venv where there is one.
gpu-check:
	PYTHON=$$( [ -x $(BIN)/python ] && echo $(BIN)/python || echo $(PYTHON) ) bash benchmarks/gpu_check.sh

# On a networked machine: the wheels a GPU machine without network may lack (~19 MiB, for Python 3.12 x86-64;
# GPU_WHEELS_PYTHON=3.11 for another), into .whl/ (ignored by git; the device tool carries it with `carry`)
GPU_WHEELS_PYTHON ?= 3.12
gpu-wheels:
	$(PYTHON) benchmarks/gpu_check.py --download-wheels --python-version $(GPU_WHEELS_PYTHON)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
