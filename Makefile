# Native commands for machines without Docker (docker compose up is the main way to run it).
#   make run    apply schema.sql to $DATABASE_URL and run both services; Ctrl-C stops both
#   make test   the whole test suite (see README)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/postgres

.PHONY: venv schema run test chaos

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# Idempotent: safe on a live database.
schema: venv
	$(PY) db.py apply-schema

# Both services in the foreground; Ctrl-C (or SIGTERM to make) stops both cleanly.
# Logs for a person at a terminal (LOG_FORMAT=json for the JSON lines production gets).
run: schema
	@export LOG_FORMAT=$${LOG_FORMAT:-console}; \
	$(PY) appointments.py & api=$$!; \
	$(PY) billing_worker.py & worker=$$!; \
	trap 'kill -TERM $$api $$worker 2>/dev/null' INT TERM; \
	echo "appointments API on :$${APPOINTMENTS_PORT:-8080}, billing worker on :$${BILLING_PORT:-8081}; Ctrl-C stops both"; \
	while kill -0 $$api 2>/dev/null || kill -0 $$worker 2>/dev/null; do wait; done

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The chaos harness (tests/chaos.py): faults under load, then the money is counted.
DURATION ?= 120
chaos: venv
	$(PY) tests/chaos.py --duration $(DURATION)
