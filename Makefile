# deepsplit: `make run` starts a local cluster on the tiny model; `make test` runs the whole suite.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODEL   ?= .models/tiny
STAMP   := $(VENV)/.installed

.PHONY: run test install sysdeps model lint clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Debian libraries that the Mooncake transfer engine links against (no-op when present or not root).
sysdeps:
	@bash scripts/sysdeps.sh

$(STAMP): pyproject.toml | $(BIN)/python
	$(MAKE) sysdeps
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(MODEL)/config.json: | $(STAMP)
	$(BIN)/deepsplit tiny-model --out $(MODEL) --preset tiny --seed 0

model: $(MODEL)/config.json

run: install model
	$(BIN)/deepsplit demo --model $(MODEL)

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .models .pytest_cache
