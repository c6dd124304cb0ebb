# Two commands on a fresh machine: `make run` and `make test`. Everything else
# (the venv, the generated stubs) is built on demand and only when stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
STUBS := daemon/modeld/_proto/.stamp
ARGS ?=

.PHONY: run test lint proto bench bench-cluster soak clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(STUBS): $(PROTOS) $(BIN)/.installed
	rm -rf daemon/modeld/_proto
	$(BIN)/python -m grpc_tools.protoc -Imodeld/_proto=protos \
		--python_out=daemon --pyi_out=daemon --grpc_python_out=daemon $(PROTOS)
	find daemon/modeld/_proto -type d -exec touch {}/__init__.py \;
	touch $@

proto: $(STUBS)

run: $(STUBS)
	$(BIN)/modeld serve $(ARGS)

test: $(STUBS)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STUBS)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/mypy

bench: $(STUBS)
	$(BIN)/python bench/route_bench.py $(ARGS)

bench-cluster: $(STUBS)
	$(BIN)/python bench/cluster_bench.py $(ARGS)

soak: $(STUBS)
	$(BIN)/python bench/soak.py $(ARGS)

clean:
	rm -rf $(VENV) daemon/modeld/_proto var .mypy_cache .ruff_cache .pytest_cache
