"""schema.sql and roles.sql bring a database made by any supported older version to the shape of a
fresh install, keeping every row, and leave an up-to-date database as it is.

Each older version's files are kept frozen in tests/schema_versions/<version>/, exactly as
databases of that version were made with them (gzipped: never edited, read with zcat). A database is made with them, given rows, upgraded
with today's files (through db.apply_schema and through psql -f, the two ways docs/operations.md
gives), and its catalog compared with a fresh install's: columns, constraints, indexes, triggers,
functions, views, owners, grants and storage parameters. What an upgraded database keeps of its
past on purpose is listed in INTENDED, with why; anything else that differs fails the test.

In this module `db_url` (and so conftest's db, pool, api and biller) is a database of version 1,
which the test using it upgrades.
"""

from __future__ import annotations

import contextlib
import gzip
import shutil
import subprocess
import uuid

import psycopg
import pytest
from psycopg import sql

from db import apply_schema
from support import ROOT, SHAPE, create_database, drop_database
from support import catalog_shape as shape

VERSIONS = ROOT / "tests" / "schema_versions"
OLDEST, CURRENT = 1, 4
OLDER = list(range(OLDEST, CURRENT))

# Every table's rows, whole, to prove an upgrade keeps them.
TABLE_ROWS = sql.SQL("SELECT to_jsonb(t) AS row FROM {table} t ORDER BY 1")
TABLES = ("appointments", "billing_queue", "billing_entries")

# Rows as version 1's services wrote them (its columns only, valid in every later version too):
# an open appointment, a charge pending, one billed with its entry, one that failed.
SEED = """
INSERT INTO appointments (id, physician_id, patient_id, start_date, end_date, hourly_rate, price, created_at) VALUES
    ('00000000-0000-0000-0000-000000000001', gen_random_uuid(), gen_random_uuid(), '2024-01-01 08:00+00', NULL, 200.00, NULL, '2024-01-01 08:00+00'),
    ('00000000-0000-0000-0000-000000000002', gen_random_uuid(), gen_random_uuid(), '2024-01-01 09:00+00', '2024-01-01 09:30+00', 200.00, 100.00, '2024-01-01 09:00+00'),
    ('00000000-0000-0000-0000-000000000003', gen_random_uuid(), gen_random_uuid(), '2024-01-01 10:00+00', '2024-01-01 11:00+00', 180.00, 180.00, '2024-01-01 10:00+00'),
    ('00000000-0000-0000-0000-000000000004', gen_random_uuid(), gen_random_uuid(), '2024-01-01 12:00+00', '2024-01-01 12:01+00', 200.00, 3.33, '2024-01-01 12:00+00');
INSERT INTO billing_queue (appointment_id, total_price, status, attempts, available_at, last_error, created_at, processed_at) VALUES
    ('00000000-0000-0000-0000-000000000002', 100.00, 'pending', 0, '2024-01-01 09:30+00', NULL, '2024-01-01 09:30+00', NULL),
    ('00000000-0000-0000-0000-000000000003', 180.00, 'billed', 1, '2024-01-01 11:00+00', NULL, '2024-01-01 11:00+00', '2024-01-01 11:00:01+00'),
    ('00000000-0000-0000-0000-000000000004', 3.33, 'failed', 5, '2024-01-01 13:00+00', 'numeric field overflow', '2024-01-01 12:01+00', NULL);
INSERT INTO billing_entries (appointment_id, total_price, created_at) VALUES
    ('00000000-0000-0000-0000-000000000003', 180.00, '2024-01-01 11:00:01+00');
"""

# What a database made by an older version keeps of its past after the upgrade, on purpose, as
# differences() reports it: {aspect: (rows only a fresh install has, rows only the upgraded one has)}.
# Nothing else may differ.
REQUEST_ID_SHAPE = "CHECK ((request_id ~ '^[A-Za-z0-9._:-]{1,128}$'::text))"
# Every older version made the request_id CHECK NOT VALID (an upgrade from version 1 adds it so to
# a live billing_queue, so as not to scan it): rows written since are checked, the old ones are
# NULL, which passes. VALIDATE CONSTRAINT makes it the fresh install's (test_validating_...).
REQUEST_ID_CHECK_NOT_VALID = (
    {("billing_queue", "billing_queue_request_id_shape", "c", REQUEST_ID_SHAPE, True)},
    {("billing_queue", "billing_queue_request_id_shape", "c", REQUEST_ID_SHAPE + " NOT VALID", False)},
)
# Versions 1 and 2 had no txid: it is added to a live ledger with the constant default '0' and no
# rewrite, so the entries written before read their 0 from the catalog (atthasmissing).
TXID = ("billing_entries", "txid", 4, "xid8", True, "pg_current_xact_id()", "", "")
TXID_OF_OLD_ENTRIES_IN_THE_CATALOG = ({(*TXID, False, "")}, {(*TXID, True, "")})
INTENDED = {
    1: {"constraints": REQUEST_ID_CHECK_NOT_VALID, "columns": TXID_OF_OLD_ENTRIES_IN_THE_CATALOG},
    2: {"constraints": REQUEST_ID_CHECK_NOT_VALID, "columns": TXID_OF_OLD_ENTRIES_IN_THE_CATALOG},
    3: {"constraints": REQUEST_ID_CHECK_NOT_VALID},
}


def differences(fresh: dict, other: dict) -> dict[str, tuple[set, set]]:
    """{aspect: (rows only in fresh, rows only in other)} for every aspect where they differ."""
    return {aspect: (fresh[aspect] - other[aspect], other[aspect] - fresh[aspect]) for aspect in fresh if fresh[aspect] != other[aspect]}


def rows(conn) -> dict[str, list[dict]]:
    return {table: [r for (r,) in conn.execute(TABLE_ROWS.format(table=sql.Identifier(table)))] for table in TABLES}


def version_files(version: int) -> list:
    return [path for path in (VERSIONS / str(version) / "schema.sql.gz", VERSIONS / str(version) / "roles.sql.gz") if path.exists()]


def make_version(url: str, version: int) -> None:
    """A database as that version made it: its files as one query, as its apply-schema sent them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("\n".join(gzip.decompress(path.read_bytes()).decode() for path in version_files(version)))


def apply_with_psql(url: str) -> None:
    """docs/operations.md's other way: psql -f, statement by statement."""
    psql = shutil.which("psql")
    assert psql, "psql (the PostgreSQL client) is needed for this test"
    files = ["-f", str(ROOT / "schema.sql"), "-f", str(ROOT / "roles.sql")]
    done = subprocess.run([psql, url, "-v", "ON_ERROR_STOP=1", "-q", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


APPLY = {"apply_schema": apply_schema, "psql": apply_with_psql}


@contextlib.contextmanager
def scratch_database(admin_url: str, version: int | None = None):
    """A new database (made by that older version when given), dropped on the way out."""
    name = f"clinic_schema_{uuid.uuid4().hex[:12]}"
    url = create_database(admin_url, name)
    try:
        if version is not None:
            make_version(url, version)
        yield url
    finally:
        drop_database(admin_url, name)


def fresh_shape(admin_url: str) -> dict[str, set[tuple]]:
    """The shape of a fresh install of today's files through db.apply_schema."""
    with scratch_database(admin_url) as url, psycopg.connect(url, autocommit=True) as conn:
        apply_schema(url)
        return shape(conn)


@pytest.fixture(scope="module")
def fresh(admin_url):
    """A fresh install of today's files through db.apply_schema: (its url, its shape)."""
    with scratch_database(admin_url) as url:
        apply_schema(url)
        with psycopg.connect(url, autocommit=True) as conn:
            made = shape(conn)
        yield url, made


@pytest.fixture
def db_url(admin_url):
    with scratch_database(admin_url, OLDEST) as url:
        yield url


# --- the frozen files --------------------------------------------------------------------------


def test_every_older_version_is_kept_and_the_oldest_has_none_of_what_later_ones_added(admin_url):
    assert sorted(int(path.name) for path in VERSIONS.iterdir() if path.is_dir()) == OLDER
    with scratch_database(admin_url, OLDEST) as url, psycopg.connect(url) as conn:
        columns = {(table, column) for table, column, *_ in conn.execute(SHAPE["columns"])}
        assert ("billing_queue", "request_id") not in columns and ("billing_entries", "txid") not in columns
        assert {name for name, *_ in conn.execute(SHAPE["relations"])} == {
            "appointments", "appointments_pkey", "billing_queue", "billing_queue_pkey", "billing_queue_due",
            "billing_entries", "billing_entries_pkey", "billing_entries_newest",
        }
        assert conn.execute(SHAPE["triggers"]).fetchall() == []


# --- upgrades ------------------------------------------------------------------------------------


@pytest.mark.parametrize("way", APPLY)
@pytest.mark.parametrize("version", OLDER)
def test_an_older_database_upgrades_to_a_fresh_install_s_shape_keeping_every_row(admin_url, fresh, version, way):
    with scratch_database(admin_url, version) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED)
        before = rows(conn)
        APPLY[way](url)
        assert differences(fresh[1], shape(conn)) == INTENDED[version]
        after = rows(conn)
        # Every row as it was; the columns the upgrade added hold what the comments in schema.sql say.
        assert {table: [{k: row[k] for k in before[table][0]} for row in after[table]] for table in TABLES} == before
        if version == 1:
            assert [row["request_id"] for row in after["billing_queue"]] == [None, None, None]
        if version <= 2:
            assert [row["txid"] for row in after["billing_entries"]] == ["0"]


def test_a_fresh_install_through_psql_has_the_same_shape_as_through_apply_schema(admin_url, fresh):
    with scratch_database(admin_url) as url, psycopg.connect(url) as conn:
        apply_with_psql(url)
        assert differences(fresh[1], shape(conn)) == {}


def test_validating_the_request_id_check_leaves_an_upgraded_database_as_a_fresh_one(admin_url, fresh):
    """What INTENDED says of the CHECK: the only difference is that it has not read the old rows."""
    with scratch_database(admin_url, 3) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED)
        apply_schema(url)
        conn.execute("ALTER TABLE billing_queue VALIDATE CONSTRAINT billing_queue_request_id_shape")
        assert differences(fresh[1], shape(conn)) == {}


@pytest.mark.parametrize("way", APPLY)
def test_applying_again_to_an_upgraded_database_changes_nothing(admin_url, way):
    with scratch_database(admin_url, OLDEST) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED)
        APPLY[way](url)
        upgraded, kept = shape(conn), rows(conn)
        APPLY[way](url)
        assert shape(conn) == upgraded and rows(conn) == kept


# The locks this backend holds on the three tables the services write.
TABLE_LOCKS = """
SELECT relation::regclass::text, mode FROM pg_locks
WHERE pid = pg_backend_pid() AND relation IN ('appointments'::regclass, 'billing_queue'::regclass, 'billing_entries'::regclass)
"""


def locks_taken_by_applying(url: str) -> set[tuple[str, str]]:
    """The table locks one run of schema.sql and roles.sql holds at its end (as in db.apply_schema,
    one transaction), rolled back afterwards."""
    script = "\n".join((ROOT / name).read_text(encoding="utf-8") for name in ("schema.sql", "roles.sql"))
    with psycopg.connect(url) as conn:
        conn.execute(script)
        locks = set(conn.execute(TABLE_LOCKS).fetchall())
        conn.rollback()
    return locks


@pytest.mark.parametrize("version", OLDER)
def test_an_upgrade_locks_the_three_tables_up_front(admin_url, version):
    """Whatever the version lacks (version 3: an index on appointments and a new table), the
    upgrade holds all three tables exclusively: schema.sql takes them at once, in the services'
    order, before anything else (section 1), since the database records an older version."""
    with scratch_database(admin_url, version) as url:
        exclusive = {table for table, mode in locks_taken_by_applying(url) if mode == "AccessExclusiveLock"}
        assert exclusive == set(TABLES)


def test_an_up_to_date_database_has_none_of_its_tables_locked_exclusively(admin_url):
    """Behind the version recorded in it (schema.sql, section 4): only the share lock of each
    CREATE INDEX IF NOT EXISTS, which readers never wait for, and the view's reads."""
    with scratch_database(admin_url, OLDEST) as url:
        apply_schema(url)
        assert {mode for _, mode in locks_taken_by_applying(url)} == {"ShareLock", "AccessShareLock"}


def test_a_drift_from_a_fresh_install_is_caught(fresh):
    """The negative control of the comparison: each of these changes alone makes it fail, naming
    the aspect it changed."""
    drifts = {
        "DROP INDEX appointments_ended": {"relations", "indexes"},
        "GRANT SELECT (last_error) ON billing_queue TO clinic_api": {"columns"},
        "ALTER TABLE billing_entries DISABLE TRIGGER billing_entries_ring_the_feed": {"triggers"},
        "ALTER TABLE base_backups ALTER COLUMN recorded_at DROP DEFAULT": {"columns"},
        "ALTER TABLE billing_queue RESET (autovacuum_vacuum_threshold)": {"relations"},
        "ALTER FUNCTION billing_entries_append_only() OWNER TO postgres": {"functions"},
        "ALTER TABLE billing_queue DROP CONSTRAINT billing_queue_request_id_shape": {"constraints"},
        "COMMENT ON SCHEMA public IS 'clinic-billing schema version 3'": {"comments"},
    }
    url, expected = fresh
    with psycopg.connect(url, options="-c lock_timeout=5s") as conn:
        assert differences(expected, shape(conn)) == {}
        for drift, aspects in drifts.items():
            conn.execute(drift)
            assert set(differences(expected, shape(conn))) == aspects, drift
            conn.rollback()


# --- the upgraded database serves this version ---------------------------------------------------


def test_a_database_of_the_oldest_version_upgraded_keeps_its_charges_and_serves_this_version(db_url, db, api, biller, make_appointment):
    """db_url is a version-1 database: its rows stay, its pending charge is billed, billing_status
    shows them all, and an end from now on keeps its request id, in the shape the CHECK allows."""
    db.execute(SEED)
    apply_schema(db_url)
    biller.drain()
    statuses = db.execute("SELECT appointment_id::text AS id, status, request_id FROM billing_status ORDER BY 1").fetchall()
    assert [(r["status"], r["request_id"]) for r in statuses] == [("open", None), ("billed", None), ("billed", None), ("failed", None)]
    fresh = make_appointment()
    ended = api.simulate_post(f"/appointments/{fresh['id']}/end", headers={"X-Request-ID": "after-upgrade"})
    assert ended.status_code == 200, ended.text
    assert db.execute("SELECT request_id FROM billing_queue WHERE appointment_id = %s", [fresh["id"]]).fetchone()["request_id"] == "after-upgrade"
    with pytest.raises(psycopg.errors.CheckViolation, match="billing_queue_request_id_shape"):
        db.execute("UPDATE billing_queue SET request_id = 'no spaces allowed' WHERE appointment_id = %s", [fresh["id"]])
