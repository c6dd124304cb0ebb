# Two commands on a fresh machine: `make run` and `make test`. Everything else
# (the venv, the generated stubs) is built on demand and only when stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
STUBS := daemon/modeld/_proto/.stamp
ARGS ?=

.PHONY: run test lint proto bench bench-cluster soak clean

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The same generator the package build runs (setup.py): one way to make stubs.
$(STUBS): $(PROTOS) tools/protogen.py $(BIN)/.installed
	$(BIN)/python tools/protogen.py
	touch $@

proto: $(STUBS)

run: $(STUBS)
	$(BIN)/modeld serve $(ARGS)

test: $(STUBS)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STUBS)
	$(BIN)/ruff check daemon tests bench tools setup.py
	$(BIN)/ruff format --check daemon tests bench tools setup.py
	$(BIN)/mypy

bench: $(STUBS)
	$(BIN)/python bench/route_bench.py $(ARGS)
	$(BIN)/python bench/flood_bench.py $(FLOOD_ARGS)

bench-cluster: $(STUBS)
	$(BIN)/python bench/cluster_bench.py $(ARGS)

soak: $(STUBS)
	$(BIN)/python bench/soak.py $(ARGS)

clean:
	rm -rf $(VENV) daemon/modeld/_proto var .mypy_cache .ruff_cache .pytest_cache
