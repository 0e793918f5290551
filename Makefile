# The two set-up commands: `make demo` (train on the built-in corpus, then generate) and
# `make test`. Each creates .venv and installs everything when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/arlm train --out $(RUN)
	$(BIN)/arlm generate $(RUN) "The for statement" --max-tokens 80 --temperature 0.8 \
		--top-k 50 --seed 0 --stats

# two workers (pytest-xdist): subprocess-heavy tests overlap with compute; tests/conftest.py
# keeps each file's tests, and all users of the trained model, on one worker each
test: $(VENV)/.installed
	$(BIN)/pytest -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(BIN)/ruff check arlm tests benchmarks
	$(BIN)/ruff format --check arlm tests benchmarks
