# The verbs a newcomer types. Everything creates the environment it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TS_DIR := clients/typescript
ARGS   ?=

.PHONY: help venv run test test-py test-ts hosts proto proto-check dashboard dashboard-check browser lint typecheck bench bench-quick clean

help:
	@echo "make run          start tether-server with an embedded local cluster on 127.0.0.1:50051"
	@echo "make test         create the environment if needed and run every test"
	@echo "make proto        regenerate clients/python/tether/v1 from protos/"
	@echo "make proto-check  fail if generated code is stale, buf lint or buf breaking fails"
	@echo "make dashboard    recompile the dashboard (clients/dashboard -> server/tether_server/web/static/js)"
	@echo "make lint         ruff + mypy --strict"
	@echo "make bench        run the benchmarks (bench/), print the table, write bench/results.json"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,dev,llm]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tether-server $(ARGS)

test: $(STAMP) proto-check dashboard-check lint test-py test-ts

test-py: $(STAMP) browser hosts
	$(PY) -m pytest -q $(ARGS)

# The multi-host tests (tests/hosts/) run Debian's sshd inside network namespaces.
hosts:
	scripts/ensure_sshd.sh

# The browser tests drive Debian's chromium through chromium-driver (no browser download).
browser:
	scripts/ensure_chromium.sh

test-ts: $(STAMP)
	@if [ -f $(TS_DIR)/package.json ]; then \
	  cd $(TS_DIR) && npm ci --no-audit --no-fund --loglevel=error && npm run gen:check && npm test; \
	fi

proto: $(STAMP)
	scripts/gen_protos.sh

proto-check: $(STAMP)
	scripts/proto_check.sh

dashboard:
	cd clients/dashboard && npm ci --no-audit --no-fund --loglevel=error && npx tsc -p .

dashboard-check:
	scripts/dashboard_check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check server clients/python tests bench
	$(VENV)/bin/ruff format --check server clients/python tests bench
	$(VENV)/bin/mypy server/tether_server clients/python/tether tests/typing

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

bench-quick: $(STAMP)
	$(PY) -m bench --quick $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
