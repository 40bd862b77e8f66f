# Two commands do everything on a fresh machine:
#   make bench   - set up, then run the main job (portres bench --backend mlx --depth 50)
#   make test    - set up, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the backends the tests must find: one that failed to install fails the run instead of vanishing from it
EXPECT := PORTRES_EXPECT_BACKENDS=numpy,tinygrad,mlx,torch,onnxruntime

.PHONY: setup system-deps bench test test-full test-fast lint matrix mutants mutants-full clean

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
	$(EXPECT) $(BIN)/python -m pytest -q

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

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
