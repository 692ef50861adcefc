# One command runs hello-cluster, one runs the whole test suite; both set up what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test lint docs soak bench clean

$(BIN)/hello-cluster: pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	mkdir -p build && touch $@ $(COMPILED)

# The editable install compiles http/fastproto.py with mypyc (setup.py) next to the source;
# an edit of the .py recompiles it here, so a stale extension never shadows the source.
# HELLO_CLUSTER_PURE=1 builds nothing and removes the extension (pure Python).
COMPILED := build/fastproto.compiled
$(COMPILED): service/hello_cluster/http/fastproto.py | $(BIN)/hello-cluster
	rm -f service/hello_cluster/http/fastproto*.so
	$(BIN)/python setup.py -q build_ext --inplace
	# (an edit that leaves the C unchanged, a comment, reuses the old build's file and date)
	find service/hello_cluster/http -name 'fastproto*.so' -exec touch {} +
	mkdir -p build && touch $@

run: $(BIN)/hello-cluster $(COMPILED)
	$(BIN)/hello-cluster $(ARGS)

lint: $(BIN)/hello-cluster
	$(BIN)/ruff check service tests bench examples tools
	$(BIN)/mypy
	$(BIN)/bandit -q -ll -r service

test: $(BIN)/hello-cluster $(COMPILED) lint
	$(BIN)/pytest -q -n 4 --dist loadgroup

# docs/configuration.md's option table, between its markers, from config.OPTIONS.
docs: $(BIN)/hello-cluster
	$(BIN)/python tools/gen_config_docs.py

soak: $(BIN)/hello-cluster
	HC_SOAK_SECONDS=300 $(BIN)/pytest -q -m slow tests

bench: $(BIN)/hello-cluster
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) bench/.venv build *.egg-info service/hello_cluster/http/*.so
