# One task runner: README, .ci/run and humans call these targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
CONFIG ?= config.example.toml

.PHONY: install test test-fast lint run bench clean

$(BIN)/appliance: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/appliance

# Tests need PostgreSQL and Redis (TEST_PG_DSN, TEST_REDIS_URL; default 127.0.0.1); they start
# their own S3-compatible server (moto) on a free port.
# Test runs in TEST_WORKERS processes (pytest-xdist), each with its own database, Redis prefix,
# bucket and S3 server, a test file at a time (the files that start whole stacks in turn on one:
# tests/conftest.py). test_openapi.py runs on its own after: under pytest-xdist, schemathesis
# runs its per-operation tests as one and they no longer reach every operation.
TEST_WORKERS ?= 3
test: install lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --ignore=tests/test_openapi.py
	$(BIN)/pytest tests/test_openapi.py

test-fast: install
	$(BIN)/pytest -m "not process"

lint: install
	$(BIN)/ruff check appliance tests scripts bench
	$(BIN)/ruff format --check appliance tests scripts bench
	$(BIN)/mypy

# Runs the appliance with $(CONFIG) against local PostgreSQL and Redis. When the config's
# s3.endpoint_url is a local address, a moto S3 server is started there first.
run: install
	APPLIANCE_CONFIG=$(CONFIG) $(BIN)/python scripts/devrun.py

# Benchmarks print their figures with a same-run reference; results live in docs/benchmarks.md.
# They use the database, Redis and bucket of $(CONFIG) (the database created if missing, migrated
# first); publish.py and fanout.py start their own api (granian, one worker) and moto S3 server.
# Both drive HTTP load with wrk when it is installed (apt-get install wrk), else with Python.
# bench/history.py (~5 min) and bench/cost.py (~30 min: the history tier) run by hand, not here.
bench: install
	APPLIANCE_CONFIG=$(CONFIG) $(BIN)/python bench/common.py ensure-database
	APPLIANCE_CONFIG=$(CONFIG) $(BIN)/appliance migrate
	APPLIANCE_CONFIG=$(CONFIG) $(BIN)/python bench/job_pickup.py
	APPLIANCE_CONFIG=$(CONFIG) $(BIN)/python bench/publish.py
	APPLIANCE_CONFIG=$(CONFIG) $(BIN)/python bench/fanout.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
