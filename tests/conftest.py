"""Fixtures on a real PostgreSQL.

TEST_DATABASE_URL names a server (default postgresql://postgres@127.0.0.1:5432/postgres). The
suite makes a template database from schema.sql once, and each test gets a fresh copy of it. When
nothing answers at the default address, a temporary cluster is started from the local server
binaries; when that is impossible too, the run stops and says how to provide a server.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import falcon.testing
import psycopg
import pytest
from psycopg.rows import dict_row

import appointments
import billing_worker
import ledger
from config import Config
from db import make_pool

from support import (
    Service,
    TempCluster,
    apply_schema,
    as_role,
    create_database,
    drop_database,
    free_port,
)

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# The tiers (docs/testing.md): a test that starts service processes is marked `processes`, found
# by the fixtures that start them, so that `make test-fast` (-m "not slow and not compose and not
# processes") keeps to the in-process tier. A module whose own fixtures start a cluster or a tool
# marks itself.
PROCESS_FIXTURES = frozenset({"services", "live"})
# Fixtures that load a large data set (test_listings' plans over 150,000 and 220,000 rows): slow.
LARGE_DATA_FIXTURES = frozenset({"loaded", "forgotten_open"})


def pytest_collection_modifyitems(items):
    for item in items:
        used = set(item.fixturenames)
        if PROCESS_FIXTURES & used:
            item.add_marker(pytest.mark.processes)
        if LARGE_DATA_FIXTURES & used:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def admin_url():
    """A superuser connection string to a running server."""
    url = os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL
    try:
        psycopg.connect(url, connect_timeout=3).close()
        yield url
        return
    except psycopg.OperationalError as exc:
        if os.environ.get("TEST_DATABASE_URL"):
            pytest.exit(f"TEST_DATABASE_URL={url} does not answer: {exc}", returncode=3)
        reason = exc
    try:
        cluster = TempCluster()
        cluster.start()
    except Exception as exc:  # noqa: BLE001 - we report and stop either way
        pytest.exit(
            f"No PostgreSQL at {DEFAULT_URL} ({reason}) and no temporary cluster could be started ({exc}). "
            "Start a server, or set TEST_DATABASE_URL=postgresql://user@host:port/dbname (a superuser).",
            returncode=3,
        )
    try:
        yield cluster.url
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def template_db(admin_url):
    name = f"clinic_tmpl_{uuid.uuid4().hex[:10]}"
    url = create_database(admin_url, name)
    apply_schema(url)
    yield name
    drop_database(admin_url, name)


@pytest.fixture
def db_url(admin_url, template_db):
    """A fresh database with the schema, dropped after the test."""
    name = f"clinic_test_{uuid.uuid4().hex[:12]}"
    url = create_database(admin_url, name, template=template_db)
    yield url
    drop_database(admin_url, name)


@pytest.fixture
def db(db_url):
    """An observer connection: sees what the services committed."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def config(db_url):
    return Config(database_url=db_url, poll_seconds=0.2, batch_size=50, max_attempts=3)


@pytest.fixture
def pool(config):
    pool = make_pool(config, "tests")
    pool.open(wait=True, timeout=10)
    yield pool
    pool.close()


@pytest.fixture
def api(config, pool):
    return falcon.testing.TestClient(appointments.create_app(config, pool))


@pytest.fixture
def billing_api(config, pool):
    bell = ledger.LedgerBell(pool)  # the change feed's LISTEN, closed with the test
    yield falcon.testing.TestClient(ledger.create_app(config, pool, bell=bell))
    bell.close()


@pytest.fixture
def biller(config, pool):
    return billing_worker.Biller(pool, config.batch_size, config.max_attempts)


@pytest.fixture
def services(tmp_path):
    """Starts real service processes; every one is stopped when the test ends."""
    started: list[Service] = []

    def start(script: str, database_url: str, *args: str, **env: str) -> Service:
        env = {
            "DATABASE_URL": as_role(database_url, script),  # as in production: its own role
            "APPOINTMENTS_PORT": str(free_port()),
            "BILLING_PORT": str(free_port()),
            "BILLING_POLL_SECONDS": "60",
            **{k: str(v) for k, v in env.items()},
        }
        service = Service(script, env, args, log_dir=tmp_path)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop(timeout=5)


@pytest.fixture
def make_appointment(api):
    """Starts (and optionally ends) an appointment through the in-process API."""

    def make(start="2020-12-01 13:00:00", end=None, **fields):
        body = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": start, **fields}
        created = api.simulate_post("/appointments", json=body)
        assert created.status_code == 201, created.text
        if end is None:
            return created.json
        ended = api.simulate_post(f"/appointments/{created.json['id']}/end", json={"end_date": end})
        assert ended.status_code == 200, ended.text
        return ended.json

    return make


def replace(config: Config, **changes) -> Config:
    return dataclasses.replace(config, **changes)
