# One command runs hello-cluster, one runs the whole test suite; both set up what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test lint docs soak bench clean

$(BIN)/hello-cluster: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/hello-cluster
	$(BIN)/hello-cluster $(ARGS)

lint: $(BIN)/hello-cluster
	$(BIN)/ruff check service tests bench examples tools
	$(BIN)/mypy
	$(BIN)/bandit -q -ll -r service

test: $(BIN)/hello-cluster lint
	$(BIN)/pytest -q -n 4 --dist loadgroup

# docs/configuration.md's option table, between its markers, from config.OPTIONS.
docs: $(BIN)/hello-cluster
	$(BIN)/python tools/gen_config_docs.py

soak: $(BIN)/hello-cluster
	HC_SOAK_SECONDS=300 $(BIN)/pytest -q -m slow tests

bench: $(BIN)/hello-cluster
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) bench/.venv build *.egg-info
