# Two commands on a fresh machine: `make run` and `make test`. Everything else
# (the venv, the generated stubs, the bytecode) is built on demand and only when stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
STUBS := daemon/modeld/_proto/.stamp
ARGS ?=

.PHONY: run test test-long test-real lint proto bench bench-cluster bench-scale soak clean

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

# Bytecode of every module, compiled once and again only for what changed. `make`'s
# environment (and CI's) may set PYTHONDONTWRITEBYTECODE, and the package is installed
# editable, so without it every daemon the tests and benchmarks start would compile
# all of modeld from source (~80 ms of its start), which a daemon installed by pip
# (which writes the .pyc files at install) never pays. Python reads .pyc files even
# with that variable set; a stale one is recompiled in memory, never trusted.
SOURCES := $(shell find daemon/modeld -name '*.py')
BYTECODE := daemon/modeld/__pycache__/.compiled
$(BYTECODE): $(SOURCES) $(STUBS)
	$(BIN)/python -m compileall -q daemon/modeld
	touch $@

run: $(BYTECODE)
	$(BIN)/modeld serve $(ARGS)

test: $(BYTECODE)
	$(BIN)/python -m pytest $(ARGS)

# modeld with real llama.cpp servers (tests/test_real_servers.py, marker `real`, never
# part of `make test`). tools/real_servers.sh builds them once into a cache outside the
# repository (~20 min on 2 cores the first time); where they cannot be built it says
# so in one line and the suite is skipped.
MODELD_REAL_CACHE ?= $(HOME)/.cache/modeld-real
# The slowest scenarios (tests marked `long`, tests/conftest.py), about 5 minutes.
test-long: $(BYTECODE)
	$(BIN)/python -m pytest -m long $(ARGS)

test-real: $(BYTECODE)
	@if tools/real_servers.sh "$(MODELD_REAL_CACHE)"; then \
		MODELD_REAL_CACHE="$(MODELD_REAL_CACHE)" $(BIN)/python -m pytest -m real -s \
			-p no:cacheprovider --timeout 600 tests/test_real_servers.py $(ARGS); \
	fi

# import-linter in a venv of its own: it brings `rich`, which structlog imports
# whenever it is installed, and the daemon's venv (the one `make bench` measures)
# should hold what a production install holds.
LINT_BIN := .venv-lint/bin
$(LINT_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-lint
	$(LINT_BIN)/pip install --quiet 'import-linter>=2.1,<3'
	touch $@

lint: $(STUBS) $(LINT_BIN)/.installed
	$(BIN)/ruff check daemon tests bench tools setup.py
	$(BIN)/ruff format --check daemon tests bench tools setup.py
	$(BIN)/mypy
	cd daemon && PYTHONPATH=. ../$(LINT_BIN)/lint-imports --config ../pyproject.toml --no-cache

bench: $(BYTECODE)
	$(BIN)/python bench/route_bench.py $(ARGS)
	$(BIN)/python bench/flood_bench.py $(FLOOD_ARGS)
	$(BIN)/python bench/gateway_bench.py $(GATEWAY_ARGS)
	$(BIN)/python bench/affinity_bench.py $(AFFINITY_ARGS)
	$(BIN)/python bench/queue_bench.py $(QUEUE_ARGS)

bench-cluster: $(BYTECODE)
	$(BIN)/python bench/cluster_bench.py $(ARGS)

# N real daemons on one database (README "How many hosts one PostgreSQL carries");
# ARGS="--hosts 10,30,100" for the full run.
bench-scale: $(BYTECODE)
	$(BIN)/python bench/scale_bench.py $(ARGS)

# The soak: the stateful router test at >= 50,000 steps (the test asserts at least
# 20 steps per example; its log goes to bench/results/, the step count is printed),
# then the chaos soak against the real daemon.
SOAK_STATEFUL_EXAMPLES ?= 2500
soak: $(BYTECODE)
	@mkdir -p bench/results
	@echo "stateful router test: $(SOAK_STATEFUL_EXAMPLES) examples (log: bench/results/stateful_soak.log)"
	@ROUTER_STATEFUL_EXAMPLES=$(SOAK_STATEFUL_EXAMPLES) $(BIN)/python -m pytest -q -s --timeout 3600 \
		-p no:cacheprovider tests/test_router_stateful.py >bench/results/stateful_soak.log 2>&1 \
		|| { tail -n 80 bench/results/stateful_soak.log; exit 1; }
	@grep -E '^stateful router steps|[0-9]+ passed' bench/results/stateful_soak.log
	$(BIN)/python bench/soak.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-lint daemon/modeld/_proto var .mypy_cache .ruff_cache .pytest_cache
	find daemon -name __pycache__ -prune -exec rm -rf {} +
