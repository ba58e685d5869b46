"""One database role per service (roles.sql), proved logged in as each role on a real database.

GRANTS is the one table of what each service may do: table x operation x role. Every cell of
it is run as that role, the allowed ones too (they must succeed, in a transaction rolled back),
and the denied ones must fail with "permission denied". The catalog must say exactly the same,
nothing more. Then the services' real queries run as their roles, roles.sql is applied again
on a live database, and concurrently on a cluster of our own where the roles do not exist yet.
Trust authentication (the test server's) lets a test log in as a role without its password.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import uuid

import falcon.testing
import psycopg
import psycopg.conninfo
import pytest
from psycopg import sql
from psycopg.rows import dict_row

import appointments
import billing_worker
import reconcile
import telemetry
from config import Config
from db import Listen, apply_schema, make_pool, set_role_passwords
from ledger import create_app as create_billing_app
from support import ROOT, TempCluster, create_database, drop_database, ledger, make_backlog

API, WORKER, OWNER = "clinic_api", "clinic_worker", "clinic_owner"
SERVICES = (API, WORKER)

COLUMNS = {
    "appointments": ("id", "physician_id", "patient_id", "start_date", "end_date", "hourly_rate", "price", "created_at"),
    "billing_queue": (
        "appointment_id", "total_price", "status", "attempts", "available_at", "last_error", "created_at", "processed_at", "request_id",
    ),
    "billing_entries": ("appointment_id", "total_price", "created_at", "txid"),
    "base_backups": (
        "label", "kind", "started_at", "stopped_at", "size_bytes", "repo_bytes", "wal_start", "wal_stop", "recorded_at",
    ),
}
NONE: frozenset[str] = frozenset()

# table x operation x role -> allowed. SELECT, INSERT and UPDATE are granted column by column, so
# their cells are the columns allowed (every other column of the table is denied); the other
# operations are allowed or not. Derived from the SQL of appointments.py, billing_worker.py and
# telemetry.QUEUE_STATS and BACKUP_STATS; roles.sql says which query needs what.
GRANTS = {
    "appointments": {
        "SELECT": {API: {"id", "physician_id", "patient_id", "start_date", "end_date", "hourly_rate", "price"},
                   WORKER: {"id", "end_date", "price"}},
        "INSERT": {API: {"id", "physician_id", "patient_id", "start_date", "hourly_rate"}, WORKER: NONE},
        "UPDATE": {API: {"end_date", "price"}, WORKER: NONE},
        "DELETE": {API: False, WORKER: False},
        "TRUNCATE": {API: False, WORKER: False},
    },
    "billing_queue": {
        "SELECT": {API: {"appointment_id", "status", "available_at"},
                   WORKER: {"appointment_id", "total_price", "status", "attempts", "available_at", "processed_at", "request_id"}},
        "INSERT": {API: {"appointment_id", "total_price", "request_id"}, WORKER: NONE},
        "UPDATE": {API: NONE, WORKER: {"status", "attempts", "available_at", "last_error", "processed_at"}},
        "DELETE": {API: False, WORKER: False},
        "TRUNCATE": {API: False, WORKER: False},
    },
    "billing_entries": {
        "SELECT": {API: NONE, WORKER: set(COLUMNS["billing_entries"])},
        "INSERT": {API: NONE, WORKER: {"appointment_id", "total_price"}},
        "UPDATE": {API: NONE, WORKER: NONE},
        "DELETE": {API: False, WORKER: False},
        "TRUNCATE": {API: False, WORKER: False},
    },
    # Written by the backup service as the superuser; read for /metrics (telemetry.BACKUP_STATS).
    "base_backups": {
        "SELECT": {API: {"stopped_at"}, WORKER: {"stopped_at"}},
        "INSERT": {API: NONE, WORKER: NONE},
        "UPDATE": {API: NONE, WORKER: NONE},
        "DELETE": {API: False, WORKER: False},
        "TRUNCATE": {API: False, WORKER: False},
    },
    # Creating objects: a table in schema public, a temporary table, a schema.
    "database": {
        "CREATE TABLE": {API: False, WORKER: False},
        "CREATE TEMP TABLE": {API: False, WORKER: False},
        "CREATE SCHEMA": {API: False, WORKER: False},
    },
}
COLUMN_OPERATIONS = ("SELECT", "INSERT", "UPDATE")

# The rows every cell runs against (committed by the superuser): three ended appointments, all
# started 13:00; the first two queued (pending), the first one billed too. The third, not queued
# yet, is what an INSERT into billing_queue refers to; the second, not billed yet, what an
# INSERT into billing_entries refers to.
BILLED, QUEUED, ENDED = (uuid.UUID(int=n) for n in (1, 2, 3))
SEED = f"""
INSERT INTO appointments (id, physician_id, patient_id, start_date, end_date, hourly_rate, price)
SELECT id, gen_random_uuid(), gen_random_uuid(), '2020-12-01 13:00:00+00', '2020-12-01 14:00:00+00', 200.00, 200.00
FROM unnest(ARRAY['{BILLED}', '{QUEUED}', '{ENDED}']::uuid[]) id;
INSERT INTO billing_queue (appointment_id, total_price) VALUES ('{BILLED}', 200.00), ('{QUEUED}', 200.00);
INSERT INTO billing_entries (appointment_id, total_price) VALUES ('{BILLED}', 200.00);
INSERT INTO base_backups (label, kind, started_at, stopped_at, size_bytes, repo_bytes, wal_start, wal_stop)
VALUES ('20201201-130000F', 'full', '2020-12-01 13:00:00+00', '2020-12-01 13:00:05+00', 1, 1,
        '000000010000000000000002', '000000010000000000000003');
"""

# A value for each column, valid in an INSERT of a new row and in an UPDATE of every seeded row
# wherever the cell is allowed (a denied cell fails on its privilege before any row is looked at).
VALUES = {
    "appointments": {
        "id": "gen_random_uuid()", "physician_id": "gen_random_uuid()", "patient_id": "gen_random_uuid()",
        "start_date": "'2020-12-01 13:00:00+00'", "end_date": "'2020-12-01 15:00:00+00'", "hourly_rate": "200.00",
        "price": "400.00", "created_at": "now()",
    },
    "billing_queue": {
        "appointment_id": f"'{ENDED}'", "total_price": "200.00", "status": "'pending'", "attempts": "1", "available_at": "now()",
        "last_error": "'probe'", "created_at": "now()", "processed_at": "NULL", "request_id": "'probe'",
    },
    "billing_entries": {"appointment_id": f"'{QUEUED}'", "total_price": "200.00", "created_at": "now()", "txid": "pg_current_xact_id()"},
    "base_backups": {
        "label": "'20201202-130000F'", "kind": "'full'", "started_at": "'2020-12-01 13:00:00+00'", "stopped_at": "'2020-12-01 13:00:05+00'",
        "size_bytes": "1", "repo_bytes": "1", "wal_start": "'000000010000000000000004'", "wal_stop": "'000000010000000000000005'",
        "recorded_at": "now()",
    },
}
# An INSERT names these columns (those without a default that a new row needs), plus the cell's.
INSERT_BASE = {
    "appointments": ("id", "physician_id", "patient_id", "start_date", "hourly_rate"),
    "billing_queue": ("appointment_id", "total_price"),
    "billing_entries": ("appointment_id", "total_price"),
    "base_backups": ("label", "kind", "started_at", "stopped_at", "size_bytes", "repo_bytes", "wal_start", "wal_stop"),
}


def statement(table: str, operation: str, column: str | None) -> str:
    """The SQL that needs exactly this cell's privilege: no WHERE, no RETURNING, no column read
    but the cell's own (an UPDATE sets a constant), so no other privilege comes into it."""
    if operation == "SELECT":
        return f"SELECT {column} FROM {table}"
    if operation == "INSERT":
        columns = [*INSERT_BASE[table], *([] if column in INSERT_BASE[table] else [column])]
        values = ", ".join(VALUES[table][c] for c in columns)
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values})"
    if operation == "UPDATE":
        return f"UPDATE {table} SET {column} = {VALUES[table][column]}"
    if operation == "DELETE":
        return f"DELETE FROM {table}"
    if operation == "TRUNCATE":
        return f"TRUNCATE {table}"
    return {
        "CREATE TABLE": "CREATE TABLE public.role_probe (i int)",
        "CREATE TEMP TABLE": "CREATE TEMP TABLE role_probe (i int)",
        "CREATE SCHEMA": "CREATE SCHEMA role_probe",
    }[operation]


def cells():
    """Every cell of GRANTS: (table, operation, column or None, role, allowed)."""
    for table, operations in GRANTS.items():
        for operation, by_role in operations.items():
            for role in SERVICES:
                if operation in COLUMN_OPERATIONS:
                    for column in COLUMNS[table]:
                        yield table, operation, column, role, column in by_role[role]
                else:
                    yield table, operation, None, role, by_role[role]


CELLS = [
    pytest.param(*cell, id="-".join(str(part) for part in cell[:4] if part) + ("-allowed" if cell[4] else "-denied"))
    for cell in cells()
]


def as_role(url: str, role: str) -> str:
    return psycopg.conninfo.make_conninfo(url, user=role)


# --- one database for the whole table: every cell runs in a transaction that is rolled back ------


@pytest.fixture(scope="module")
def matrix_url(admin_url, template_db):
    """A copy of the template database with the seeded rows. roles.sql is applied to it again:
    CREATE DATABASE ... TEMPLATE copies the objects and their grants, not the database's own
    privileges (CREATE, TEMPORARY), which is what CREATE TEMP TABLE and CREATE SCHEMA check."""
    name = f"clinic_test_roles_{uuid.uuid4().hex[:10]}"
    url = create_database(admin_url, name, template=template_db)
    apply_schema(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED)
    yield url
    drop_database(admin_url, name)


@pytest.fixture(scope="module")
def role_connections(matrix_url):
    conns = {role: psycopg.connect(as_role(matrix_url, role)) for role in SERVICES}
    yield conns
    for conn in conns.values():
        conn.close()


@pytest.mark.parametrize("table, operation, column, role, allowed", CELLS)
def test_each_service_can_do_exactly_what_the_grant_table_says(role_connections, table, operation, column, role, allowed):
    """One cell of GRANTS, run as the role: allowed succeeds, denied is "permission denied"."""
    conn = role_connections[role]
    query = statement(table, operation, column)
    try:
        with conn.transaction(force_rollback=True):
            if allowed:
                cur = conn.execute(query)
                if operation == "SELECT":
                    assert len(cur.fetchall()) >= 1, "the seeded rows are visible"
                elif operation in ("INSERT", "UPDATE"):
                    assert cur.rowcount >= 1, query
            else:
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                    conn.execute(query)
    finally:
        conn.rollback()  # a failed assertion inside must not leave the shared connection aborted


def test_the_grant_table_names_every_column_of_every_table(matrix_url):
    """A column added to schema.sql must get its row in GRANTS (and a decision in roles.sql)."""
    with psycopg.connect(matrix_url) as conn:
        for table, columns in COLUMNS.items():
            actual = conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                [table],
            ).fetchall()
            assert tuple(name for (name,) in actual) == columns, table


def test_the_catalog_grants_the_services_nothing_beyond_the_table(matrix_url):
    """Every privilege PostgreSQL knows, on every object, asked of the catalog for each role."""
    has = {"column": "SELECT has_column_privilege(%s, %s, %s, %s)", "table": "SELECT has_table_privilege(%s, %s, %s)"}
    with psycopg.connect(matrix_url) as conn:
        ask = lambda kind, *args: conn.execute(has[kind], args).fetchone()[0]  # noqa: E731
        for role in SERVICES:
            for table, columns in COLUMNS.items():
                for column in columns:
                    for privilege in ("SELECT", "INSERT", "UPDATE", "REFERENCES"):
                        expected = column in GRANTS[table].get(privilege, {}).get(role, NONE)
                        assert ask("column", role, table, column, privilege) == expected, (role, table, column, privilege)
                for privilege in ("DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"):
                    assert ask("table", role, table, privilege) is False, (role, table, privilege)
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"):
                assert ask("table", role, "billing_status", privilege) is False, (role, "billing_status", privilege)
            assert conn.execute(
                "SELECT has_function_privilege(%s, 'billing_entries_append_only()', 'EXECUTE'),"
                "       has_schema_privilege(%s, 'public', 'CREATE'), has_schema_privilege(%s, 'public', 'USAGE'),"
                "       has_database_privilege(%s, current_database(), 'CREATE'),"
                "       has_database_privilege(%s, current_database(), 'TEMPORARY'),"
                "       has_database_privilege(%s, current_database(), 'CONNECT')",
                [role] * 6,
            ).fetchone() == (False, False, True, False, False, True), role
        public_grants = conn.execute(
            "SELECT c.relname, a.privilege_type FROM pg_class c, aclexplode(c.relacl) a"
            " WHERE c.relnamespace = 'public'::regnamespace AND a.grantee = 0"
        ).fetchall()
        assert public_grants == [], "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC"


def test_no_service_reads_through_the_billing_status_view(role_connections):
    """The view is for people with psql (superusers): neither service may read it."""
    for conn in role_connections.values():
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("SELECT * FROM billing_status")
        conn.rollback()


# --- the ledger is append-only for everyone ------------------------------------------------------

EDITS = {
    "UPDATE": "UPDATE billing_entries SET total_price = 0",
    "DELETE": "DELETE FROM billing_entries",
    "TRUNCATE": "TRUNCATE billing_entries",
}


@pytest.mark.parametrize("operation", EDITS)
@pytest.mark.parametrize("who", ["superuser", OWNER])
def test_the_ledger_refuses_edits_from_its_owner_and_superusers_too(matrix_url, who, operation):
    """The triggers stop who holds every privilege: SQLSTATE 42501 and a message saying why."""
    with psycopg.connect(matrix_url) as conn:
        if who == OWNER:
            conn.execute("SET ROLE clinic_owner")  # nobody logs in as the owner; a migration may act as it
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"billing_entries is append-only: {operation} refused") as raised:
            conn.execute(EDITS[operation])
        assert raised.value.sqlstate == "42501" and "correction is a new kind of entry" in raised.value.diag.message_hint
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM billing_entries").fetchone() == (1,)


def test_appending_to_the_ledger_is_untouched_by_the_triggers(matrix_url):
    """INSERT and INSERT ... ON CONFLICT DO NOTHING, the worker's way, still work for everyone."""
    with psycopg.connect(as_role(matrix_url, WORKER)) as conn, conn.transaction(force_rollback=True):
        for _ in range(2):
            conn.execute(
                "INSERT INTO billing_entries (appointment_id, total_price) VALUES (%s, 200.00) ON CONFLICT (appointment_id) DO NOTHING",
                [QUEUED],
            )
        assert conn.execute("SELECT count(*) FROM billing_entries").fetchone() == (2,)


# --- the roles themselves -------------------------------------------------------------------------

# As roles.sql sets them (SHOW prints the worker's 60s as 1min).
SETTINGS = {
    API: {"statement_timeout": "5s", "idle_in_transaction_session_timeout": "5s", "lock_timeout": "5s"},
    WORKER: {"statement_timeout": "1min", "idle_in_transaction_session_timeout": "5s", "lock_timeout": "10s"},
}


@pytest.mark.parametrize("role", SERVICES)
def test_each_service_role_carries_its_timeouts(matrix_url, role):
    """statement_timeout, idle_in_transaction_session_timeout and lock_timeout come with the login."""
    with psycopg.connect(as_role(matrix_url, role)) as conn:
        shown = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in SETTINGS[role]}
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    assert shown == SETTINGS[role]


def test_the_roles_are_plain_and_only_the_services_log_in(matrix_url):
    """No role is superuser or may create roles or databases; the owner cannot log in."""
    with psycopg.connect(matrix_url) as conn:
        rows = conn.execute(
            "SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls,"
            "       pg_has_role(rolname, 'pg_read_all_data', 'USAGE') OR pg_has_role(rolname, 'pg_write_all_data', 'USAGE')"
            " FROM pg_roles WHERE rolname LIKE 'clinic\\_%' ORDER BY rolname"
        ).fetchall()
    assert rows == [(role, role != OWNER, False, False, False, False, False, False) for role in sorted([API, OWNER, WORKER])]
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        psycopg.connect(as_role(matrix_url, OWNER)).close()


def test_every_object_of_the_schema_belongs_to_clinic_owner(matrix_url):
    """Tables, indexes, the view and the trigger function: a new one needs its line in roles.sql."""
    with psycopg.connect(matrix_url) as conn:
        strays = conn.execute(
            """SELECT c.relname FROM pg_class c
               WHERE c.relnamespace = 'public'::regnamespace AND c.relowner <> 'clinic_owner'::regrole
                 AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
               UNION ALL
               SELECT p.proname FROM pg_proc p
               WHERE p.pronamespace = 'public'::regnamespace AND p.proowner <> 'clinic_owner'::regrole
                 AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')"""
        ).fetchall()
        owned = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relowner = 'clinic_owner'::regrole"
        ).fetchone()[0]
    assert strays == [] and owned >= 4


# --- the services' real queries, as their roles ---------------------------------------------------


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.fixture
def api_as_role(db_url):
    config = Config(database_url=as_role(db_url, API), poll_seconds=0.2)
    pool = make_pool(config, "tests-clinic-api")
    pool.open(wait=True, timeout=10)
    yield falcon.testing.TestClient(appointments.create_app(config, pool)), pool
    pool.close()


@pytest.fixture
def worker_as_role(db_url):
    config = Config(database_url=as_role(db_url, WORKER), poll_seconds=0.2, batch_size=50, max_attempts=1)
    pool = make_pool(config, "tests-clinic-worker", max_size=4, **billing_worker.WORKER_SESSION)
    pool.open(wait=True, timeout=10)
    yield config, pool
    pool.close()


def start_and_end(api, end="2020-12-01 14:00:00") -> str:
    body = {"id": str(uuid.uuid4()), "physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": "2020-12-01 13:00:00"}
    assert api.simulate_post("/appointments", json=body).status_code == 201
    ended = api.simulate_post(f"/appointments/{body['id']}/end", json={"end_date": end})
    assert ended.status_code == 200, ended.text
    return body["id"]


def test_the_appointments_api_serves_every_route_as_clinic_api(api_as_role, db):
    """Start, repeat, end (lock, update, queue, notify), repeat, read, /ready and the queue gauges."""
    api, pool = api_as_role
    with pool.connection() as conn:
        assert conn.execute("SELECT current_user").fetchone() == (API,)
    body = {"id": str(uuid.uuid4()), "physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": "2020-12-01 13:00:00"}
    assert api.simulate_post("/appointments", json=body).status_code == 201  # INSERT_APPOINTMENT
    assert api.simulate_post("/appointments", json=body).status_code == 200  # the conflict, then SELECT_APPOINTMENT
    path = f"/appointments/{body['id']}"
    ended = api.simulate_post(path + "/end", json={"end_date": "2020-12-01 14:00:00"}, headers={"X-Request-ID": "as-clinic-api"})
    assert ended.status_code == 200 and ended.json["price"] == 200.00 and ended.json["billing_status"] == "pending"
    assert api.simulate_post(path + "/end", json={"end_date": "2020-12-01 14:00:00"}).status_code == 200  # LOCK, then SELECT
    assert api.simulate_post(path + "/end", json={"end_date": "2020-12-01 15:00:00"}).status_code == 409
    assert api.simulate_get(path).json["billing_status"] == "pending"
    assert api.simulate_get("/ready").status_code == 200
    scraped = api.simulate_get("/metrics").text
    assert metric(scraped, "clinic_db_up") == 1.0 and metric(scraped, "clinic_billing_queue_rows") == 1.0
    queued = db.execute("SELECT request_id, total_price FROM billing_queue WHERE appointment_id = %s", [body["id"]]).fetchone()
    assert queued == {"request_id": "as-clinic-api", "total_price": 200}


def test_the_billing_worker_bills_retries_requeues_serves_and_reconciles_as_clinic_worker(api_as_role, worker_as_role, db, db_url):
    """Both paths of a batch, a failure, requeue, reconcile, the ledger API, the gauges and LISTEN."""
    api, _ = api_as_role
    config, pool = worker_as_role
    with pool.connection() as conn:
        assert conn.execute("SELECT current_user").fetchone() == (WORKER,)
    biller = billing_worker.Biller(pool, config.batch_size, config.max_attempts)

    first = [start_and_end(api) for _ in range(2)]
    assert biller.drain().billed == 2  # CLAIM_AND_BILL

    good = [start_and_end(api) for _ in range(2)]
    bad = start_and_end(api)
    db.execute(f"ALTER TABLE billing_entries ADD CONSTRAINT poison CHECK (appointment_id <> '{bad}')")
    tally = biller.drain()  # CLAIM_AND_BILL fails on the poison: CLAIM, BILL_ONE each, RECORD_FAILURE
    assert (tally.billed, tally.retried, tally.failed) == (2, 0, 1)
    assert biller.requeue() == 1  # REQUEUE_FAILED
    db.execute("ALTER TABLE billing_entries DROP CONSTRAINT poison")

    already = start_and_end(api)
    db.execute("INSERT INTO billing_entries (appointment_id, total_price) VALUES (%s, 200.00)", [already])
    assert biller.drain().billed == 2  # the requeued one, and one already in the ledger (ON CONFLICT DO NOTHING)

    reconcile_pool = make_pool(config, "tests-clinic-reconcile", max_size=1)  # as billing_worker.main makes it
    reconcile_pool.open(wait=True, timeout=10)
    try:
        report = reconcile.reconcile(reconcile_pool)
    finally:
        reconcile_pool.close()
    assert report["counts"] == {"ended": 6, "entries": 6, "pending": 0, "failed": 0}
    assert all(report[name] == [] for name in reconcile.RECONCILE_CHECKS), report

    ledger_api = falcon.testing.TestClient(create_billing_app(config, pool))
    listed = ledger_api.simulate_get("/billing-entries", params={"limit": 10})  # LIST_ENTRIES
    assert listed.status_code == 200 and {e["appointment_id"] for e in listed.json} == {*first, *good, bad, already}
    assert ledger_api.simulate_get(f"/billing-entries/{bad}").status_code == 200  # SELECT_ENTRY
    assert ledger_api.simulate_get("/ready").status_code == 200
    scraped = ledger_api.simulate_get("/metrics").text
    assert metric(scraped, "clinic_db_up") == 1.0 and metric(scraped, "clinic_billing_queue_rows") == 0.0

    stop = threading.Event()
    listen = Listen(pool, billing_worker.CHANNEL, "tests-listen", 0.25, stop)
    try:
        assert listen.wait(5) == "listen"
    finally:
        listen.close()


@pytest.mark.parametrize("role", SERVICES)
def test_both_services_read_the_queue_gauges(db_url, db, role):
    """QUEUE_STATS, which each service runs for its /metrics, works as either role."""
    make_backlog(db, 3)
    with psycopg.connect(as_role(db_url, role)) as conn:
        pending, failed, _ = conn.execute(telemetry.QUEUE_STATS).fetchone()
    assert (pending, failed) == (3, 0)


# --- applying roles.sql again ----------------------------------------------------------------------

GRANTS_IN_CATALOG = """
SELECT c.relname, c.relowner::regrole::text, c.relacl::text,
       array(SELECT a.attname || '=' || a.attacl::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attacl IS NOT NULL ORDER BY a.attnum)::text
FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace ORDER BY c.relname
"""


def test_roles_sql_applied_again_to_a_live_database_keeps_every_row_and_grant(db_url, db, api_as_role, worker_as_role):
    """Twice through db.py, once through psql -f schema.sql -f roles.sql: same rows, same grants."""
    api, _ = api_as_role
    config, pool = worker_as_role
    make_backlog(db, 20)
    start_and_end(api)
    billing_worker.Biller(pool, config.batch_size, config.max_attempts).drain()
    start_and_end(api)  # one pending
    before, grants = ledger(db), db.execute(GRANTS_IN_CATALOG).fetchall()

    apply_schema(db_url)
    apply_schema(db_url)
    psql = shutil.which("psql")
    assert psql, "psql (the PostgreSQL client) is needed for this test"
    files = ["-f", str(ROOT / "schema.sql"), "-f", str(ROOT / "roles.sql")]
    done = subprocess.run([psql, db_url, "-v", "ON_ERROR_STOP=1", "-q", *files], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    assert ledger(db) == before and before["entries"] == 21 and before["pending"] == 1
    assert db.execute(GRANTS_IN_CATALOG).fetchall() == grants
    assert billing_worker.Biller(pool, config.batch_size, config.max_attempts).drain().billed == 1  # still works


def test_roles_sql_takes_back_what_was_granted_by_hand(db_url, db):
    """A re-run restores the table: an extra grant (here DELETE to the API) is revoked."""
    db.execute("GRANT DELETE ON appointments TO clinic_api")
    db.execute("GRANT SELECT (patient_id) ON appointments TO clinic_worker")
    apply_schema(db_url)
    assert db.execute(
        "SELECT has_table_privilege('clinic_api', 'appointments', 'DELETE') AS d,"
        "       has_column_privilege('clinic_worker', 'appointments', 'patient_id', 'SELECT') AS s"
    ).fetchone() == {"d": False, "s": False}


PASSWORDS = "SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN ('clinic_api', 'clinic_worker')"


def test_set_role_passwords_stores_a_hash_and_leaves_an_unset_one_alone(db_url, db):
    """The server gets a SCRAM (or md5) hash, never the password; None or "" changes nothing."""
    before = {row["rolname"]: row["rolpassword"] for row in db.execute(PASSWORDS)}
    secret = "it's a secret; DROP TABLE x --"
    try:
        assert set_role_passwords(db_url, secret, None) == [API]
        after = {row["rolname"]: row["rolpassword"] for row in db.execute(PASSWORDS)}
        assert after[API].startswith(("SCRAM-SHA-256$", "md5")) and secret not in after[API]
        assert after[WORKER] == before[WORKER]
        assert set_role_passwords(db_url, None, "") == []
        assert {row["rolname"]: row["rolpassword"] for row in db.execute(PASSWORDS)} == after
    finally:
        # Roles are cluster-wide: put back what was there (none, on a trust-auth test server).
        for role, stored in before.items():
            db.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(stored)))


@pytest.mark.processes  # a cluster of its own
def test_concurrent_runs_on_a_cluster_without_the_roles_all_succeed():
    """Roles are cluster-wide: runs against several new databases at once create each role once."""
    cluster = TempCluster()
    try:
        cluster.start()
        urls = [create_database(cluster.url, f"clinic_concurrent_{n}") for n in range(6)]
        errors: list[BaseException] = []

        def apply(url):
            try:
                apply_schema(url)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=apply, args=(url,)) for url in urls * 2]  # two runs per database too
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        for url in urls:
            with psycopg.connect(as_role(url, WORKER)) as conn:
                assert conn.execute("SHOW lock_timeout").fetchone() == ("10s",)
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("SELECT patient_id FROM appointments")
        with psycopg.connect(cluster.url, row_factory=dict_row) as conn:
            assert conn.execute("SELECT count(*) AS n FROM pg_roles WHERE rolname LIKE 'clinic\\_%'").fetchone() == {"n": 3}
    finally:
        cluster.destroy()
