# Two commands do everything on a fresh machine:
#   make bench   - set up, then run the main job (portres bench --backend mlx --depth 50)
#   make test    - set up, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps bench test test-full test-fast lint matrix clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@PYTHON=$(PYTHON) .ci/system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,test]'
	@touch $@

system-deps:
	@PYTHON=$(PYTHON) .ci/system-deps

bench: setup
	$(BIN)/portres bench --backend mlx --depth 50

test: setup
	$(BIN)/python -m pytest -q

# every zoo entry on every backend (tinygrad too): well over 45 minutes on 2 cores
test-full: setup
	PORTRES_FULL_ZOO=1 $(BIN)/python -m pytest -q

# the inner loop: the reference, one small network per framework, the mechanics (tests/conftest.py)
test-fast: setup
	$(BIN)/python -m pytest -q --fast

lint: setup
	$(BIN)/ruff check .

# The standard CPU matrix for BENCHMARKS.md (adds the torch peer to the venv first).
matrix: setup
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q -e '.[torch]'
	$(BIN)/python benchmarks/run_matrix.py --output BENCHMARKS.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
