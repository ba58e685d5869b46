"""Fixtures on a real PostgreSQL.

TEST_DATABASE_URL names a server (default postgresql://postgres@127.0.0.1:5432/postgres). The
suite makes a template database from schema.sql once per server, and each test gets a database as
the template has it (``Databases``). When nothing answers at the default address, a temporary
cluster is started from the local server binaries; when that is impossible too, the run stops and
says how to provide a server.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time
import uuid

import falcon.testing
import psycopg
import psycopg.conninfo
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
    catalog_fingerprint,
    create_database,
    drop_database,
    free_port,
    with_dbname,
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


# What a test may leave behind that emptying the tables would not undo: a session still on the
# database (a process, a LISTEN, a lock), a prepared transaction, planner statistics of its data.
LEFT_BEHIND = """
SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()) AS sessions,
       (SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()) AS prepared,
       (SELECT count(*) FROM pg_statistic s JOIN pg_class c ON c.oid = s.starelid
        WHERE c.relnamespace = 'public'::regnamespace) AS statistics
"""

# Every table emptied in replica mode, as the owner of the ledger may, so that its append-only
# trigger lets it through (and foreign keys are not checked row by row). Inside the transaction
# that then looks at what is left: the EXCLUSIVE locks keep anyone from analyzing or writing the
# tables before it commits. DELETE, which touches a few pages, costs a millisecond where TRUNCATE,
# which makes new files for every table and index, costs tens; the dead rows it leaves are few,
# and every REFRESH_EVERY handouts of a database TRUNCATE starts its files afresh.
EMPTY_TABLES = """
SET LOCAL lock_timeout = '1s';
SET LOCAL session_replication_role = replica;
DO $$
DECLARE
    tables text := (SELECT string_agg(oid::regclass::text, ', ') FROM pg_class
                    WHERE relnamespace = 'public'::regnamespace AND relkind = 'r');
BEGIN
    EXECUTE 'LOCK TABLE ' || tables || ' IN EXCLUSIVE MODE';
    IF current_setting('clinic_tests.truncate') = 'on' THEN
        EXECUTE 'TRUNCATE ' || tables || ' RESTART IDENTITY';
    ELSE
        EXECUTE (SELECT string_agg(format('DELETE FROM %s', oid::regclass), '; ') FROM pg_class
                 WHERE relnamespace = 'public'::regnamespace AND relkind = 'r');
    END IF;
END $$;
"""
REFRESH_EVERY = 20
HOW_TO_EMPTY = "SELECT set_config('clinic_tests.truncate', %(truncate)s, true)"


class Unclean(Exception):
    """A database a test gave back is not in the template's shape: dropped, not handed out again."""


class Databases:
    """The tests' databases, per server: the template (schema.sql and roles.sql applied once) and,
    for each test, a database as the template has it.

    A test's database is a copy of the template (CREATE DATABASE, about 0.2 s), or one that an
    earlier test gave back in the template's shape: the same catalog (support.SHAPE), no session left
    on it, no prepared transaction, no planner statistics. That one is emptied (milliseconds) and
    handed out again; any other is dropped. So a test that changes the schema, analyzes, or leaves
    a process behind costs a new copy, and no test sees what another left.
    """

    def __init__(self):
        self._templates: dict[str, str] = {}
        self._shapes: dict[str, tuple] = {}
        self._spare: dict[str, list[str]] = collections.defaultdict(list)
        self._made: dict[str, set[str]] = collections.defaultdict(set)
        self._handouts: collections.Counter[str] = collections.Counter()

    def template(self, admin_url: str) -> str:
        if admin_url not in self._templates:
            name = f"clinic_tmpl_{uuid.uuid4().hex[:10]}"
            url = create_database(admin_url, name)
            self._made[admin_url].add(name)
            apply_schema(url)
            self._templates[admin_url] = name
            # Taken from a copy: CREATE DATABASE copies the objects, not the database's own grants.
            copy = self._copy(admin_url)
            with psycopg.connect(with_dbname(admin_url, copy)) as conn:
                self._shapes[admin_url] = catalog_fingerprint(conn)
            self._spare[admin_url].append(copy)
        return self._templates[admin_url]

    def _copy(self, admin_url: str) -> str:
        name = f"clinic_test_{uuid.uuid4().hex[:12]}"
        create_database(admin_url, name, template=self._templates[admin_url])
        self._made[admin_url].add(name)
        return name

    def take(self, admin_url: str) -> str:
        """A database's URL, for one test; give it back with ``give_back``."""
        self.template(admin_url)
        name = self._spare[admin_url].pop() if self._spare[admin_url] else self._copy(admin_url)
        return with_dbname(admin_url, name)

    def give_back(self, admin_url: str, url: str) -> None:
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
                for _ in range(10):  # a session just closed by its client may take a moment to end
                    if not conn.execute(LEFT_BEHIND).fetchone()[0]:
                        break
                    time.sleep(0.02)
                self._handouts[name] += 1
                with conn.transaction():
                    truncate = "on" if self._handouts[name] % REFRESH_EVERY == 0 else "off"
                    conn.execute(HOW_TO_EMPTY, {"truncate": truncate})
                    conn.execute(EMPTY_TABLES)
                    if any(conn.execute(LEFT_BEHIND).fetchone()) or catalog_fingerprint(conn) != self._shapes[admin_url]:
                        raise Unclean(name)  # rolls the emptying back
                conn.execute("SELECT pg_stat_reset()")  # the table counters (pg_stat_user_tables) start again
                self._spare[admin_url].append(name)
                return
        except (psycopg.Error, Unclean):
            pass  # a new copy is made for the next test
        drop_database(admin_url, name)
        self._made[admin_url].discard(name)

    def forget(self, admin_url: str) -> None:
        """The server is going away with its databases (a cluster of a module's own)."""
        for table in (self._templates, self._shapes, self._spare, self._made):
            table.pop(admin_url, None)

    def drop_all(self) -> None:
        for admin_url, names in self._made.items():
            for name in names:
                try:
                    drop_database(admin_url, name)
                except psycopg.OperationalError:
                    pass  # a cluster of a module's own, already gone with its databases


@pytest.fixture(scope="session")
def databases():
    stock = Databases()
    yield stock
    stock.drop_all()


@pytest.fixture(scope="session")
def template_db(admin_url, databases):
    return databases.template(admin_url)


@pytest.fixture
def db_url(admin_url, databases):
    """A database with the schema and no rows, for this test alone."""
    url = databases.take(admin_url)
    yield url
    databases.give_back(admin_url, url)


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
