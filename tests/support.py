"""Test plumbing: a PostgreSQL cluster of our own, throwaway databases, and real service processes."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import decimal
import glob
import json
import os
import re
import shutil
import signal
import socket
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import NoReturn, Sequence

import jsonschema
import psycopg
import psycopg.rows
import pytest
import requests
import yaml


from db import apply_schema

ROOT = Path(__file__).resolve().parent.parent
SERVICE_VARS = (
    "DATABASE_URL APPOINTMENTS_PORT BILLING_PORT HOURLY_RATE APP_TIMEZONE BILLING_POLL_SECONDS "
    "BILLING_BATCH_SIZE BILLING_MAX_ATTEMPTS BILLING_FEED_MAX_WAITERS BILLING_LISTEN LOG_LEVEL LOG_FORMAT API_TOKENS API_TOKENS_FILE "
    "REQUEST_TIMEOUT_SECONDS"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_dbname(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


# The problem details every error answer is (RFC 9457), as openapi.yaml documents them.
PROBLEM_SCHEMA = jsonschema.Draft202012Validator(yaml.safe_load((ROOT / "openapi.yaml").read_text())["components"]["schemas"]["Problem"])


def assert_problem_parts(status: int, content_type: str, body: bytes | str, expected: int, mentions: str = "") -> dict:
    """A clean problem: the status, the media type, the documented shape, a detail naming what is wrong."""
    assert status == expected, body
    assert content_type == "application/problem+json", (content_type, body)
    problem = json.loads(body)
    PROBLEM_SCHEMA.validate(problem)
    assert problem["status"] == expected and problem["title"] and problem["type"] == "about:blank"
    assert mentions in problem.get("detail", ""), problem
    return problem


def assert_problem(answer, expected: int, mentions: str = "") -> dict:
    """assert_problem_parts of an answer: falcon.testing's Result or a requests.Response."""
    return assert_problem_parts(answer.status_code, answer.headers.get("content-type", ""), answer.content, expected, mentions)


def unavailable(reason: str, required_by: str) -> NoReturn:
    """Skips the test, saying why; or fails it when the environment sets ``required_by`` to 1:
    CI does for every tool it installs, so that a test that cannot run there never passes as skipped."""
    if os.environ.get(required_by) == "1":
        pytest.fail(f"{reason} ({required_by}=1, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def require_tools(*tools: str, required_by: str) -> None:
    """unavailable() unless every one of ``tools`` is on the PATH (each a Debian package's name too)."""
    lacking = [tool for tool in tools if shutil.which(tool) is None]
    if lacking:
        unavailable(f"{' and '.join(lacking)} not on the PATH (apt-get install {' '.join(lacking)})", required_by)


def has_tool(tool: str, required_by: str) -> bool:
    """For a test that goes on without ``tool``: whether it is on the PATH; a failure, as in
    unavailable(), when it is not and the environment sets ``required_by`` to 1."""
    if shutil.which(tool) is not None:
        return True
    if os.environ.get(required_by) == "1":
        unavailable(f"{tool} not on the PATH (apt-get install {tool})", required_by)
    return False


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls predicate until it returns something truthy; fails the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def server_bindir() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if os.path.exists(os.path.join(bindir, "initdb")):
            return bindir
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def freeze(postmaster: int) -> list[int]:
    """SIGSTOP a PostgreSQL server: the postmaster first (it forks no new backend then), then
    every process it started. Sockets stay open and nothing answers: a hung disk or a paused VM
    as its clients see it. Returns the PIDs, for thaw()."""
    os.kill(postmaster, signal.SIGSTOP)
    pids = [postmaster, *children(postmaster)]
    for pid in pids[1:]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


class TempCluster:
    """A PostgreSQL cluster this test run owns, so it may stop, crash, freeze and restart it."""

    def __init__(self, port: int | None = None):
        self.bindir = server_bindir()
        if self.bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb) found via pg_config or /usr/lib/postgresql/*/bin")
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="clinic-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # initdb refuses to run as root: run the server binaries as the postgres OS user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self._as, os.path.join(self.bindir, tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}{tail}")

    def configure(self, **settings: str) -> None:
        """Server settings appended to postgresql.conf (a base backup carries them along); a
        setting that needs a restart takes effect at the next start."""
        with open(self.data / "postgresql.conf", "a") as conf:
            for name, value in settings.items():
                conf.write(f"{name} = '{value}'\n")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            thaw([self.postmaster_pid(), *children(self.postmaster_pid())])  # a stop must not wait on a frozen server
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# The compose system's pgBackRest settings (deploy/postgres/pgbackrest.conf), for a TempCluster.
PGBACKREST_CONF = ROOT / "deploy" / "postgres" / "pgbackrest.conf"


class PgBackRest:
    """A pgBackRest repository of a TempCluster's own, configured by deploy/postgres/pgbackrest.conf
    with only the paths changed (and the port and socket of the cluster), run as the postgres user."""

    STANZA = "clinic"

    def __init__(self, cluster: TempCluster):
        self.cluster = cluster
        self.repo = cluster.dir / "pgbackrest"
        self.config = cluster.dir / "pgbackrest.conf"
        text = PGBACKREST_CONF.read_text()
        for line, replacement in (
            ("repo1-path=/var/lib/pgbackrest", f"repo1-path={self.repo}\nlock-path={cluster.dir / 'pgbackrest-lock'}"
                                               f"\nspool-path={cluster.dir / 'pgbackrest-spool'}"),
            ("pg1-path=/var/lib/postgresql/data", f"pg1-path={cluster.data}\npg1-port={cluster.port}\npg1-socket-path={cluster.dir}"),
        ):
            assert line in text, f"{PGBACKREST_CONF} no longer says {line}"
            text = text.replace(line, replacement)
        self.config.write_text(text)
        self.repo.mkdir()
        if cluster._as:
            shutil.chown(self.repo, "postgres", "postgres")
        self._as = cluster._as

    @property
    def archive_command(self) -> str:
        return f"pgbackrest --config={self.config} --stanza={self.STANZA} archive-push %p"

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = [*self._as, "pgbackrest", f"--config={self.config}", f"--stanza={self.STANZA}", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done

    def info(self) -> dict:
        return json.loads(self.run("--output=json", "info").stdout)[0]

    def clinic_backup(self, kind: str, database_url: str) -> subprocess.CompletedProcess:
        """deploy/postgres/clinic-backup, as the compose backup service runs it on demand: a
        backup of that kind, recorded in the database's base_backups."""
        info = psycopg.conninfo.conninfo_to_dict(database_url)
        env = [f"PGBACKREST_CONFIG={self.config}", f"PGHOST={self.cluster.dir}", f"PGPORT={self.cluster.port}",
               f"PGUSER={info.get('user', 'postgres')}", f"PGDATABASE={info['dbname']}", f"PATH={os.environ['PATH']}"]
        cmd = [*self._as, "env", "-i", *env, str(ROOT / "deploy" / "postgres" / "clinic-backup"), kind]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd="/")
        if done.returncode != 0:
            raise RuntimeError(f"clinic-backup {kind} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done

    def restore(self, *target: str) -> None:
        """What deploy/postgres/restore runs in the backup container, into this cluster's (stopped)
        data directory: the newest backup before the target, then replay up to it (to the end of
        the archived WAL without one) and promote."""
        self.run("restore", "--delta", *(["--target-action=promote", *target] if target else []))


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return with_dbname(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# What PostgreSQL's catalog says about every object of schema public (and the database's schemas and
# settings), one query per aspect, each row a tuple of text and booleans (arrays sorted into text,
# so that grant order does not count). test_schema compares an upgraded database with a fresh
# install by it; conftest's Databases, a database a test gives back with the template's.
# Column position is the rank among live columns: the order a reader and SELECT * see.
SHAPE = {
    "relations": """
        SELECT c.relname, c.relkind::text, c.relpersistence::text, pg_get_userbyid(c.relowner),
               array_to_string(ARRAY(SELECT unnest(c.relacl)::text ORDER BY 1), ' '),
               array_to_string(ARRAY(SELECT unnest(c.reloptions) ORDER BY 1), ' '),
               c.relrowsecurity, c.relforcerowsecurity
        FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace""",
    "columns": """
        SELECT c.relname, a.attname, rank() OVER (PARTITION BY c.oid ORDER BY a.attnum)::int,
               format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
               a.attidentity::text, a.attgenerated::text, a.atthasmissing,
               array_to_string(ARRAY(SELECT unnest(a.attacl)::text ORDER BY 1), ' ')
        FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef d ON (d.adrelid, d.adnum) = (a.attrelid, a.attnum)
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v')""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, contype::text, pg_get_constraintdef(oid), convalidated
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace""",
    "indexes": """
        SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid), indisvalid, indisready
        FROM pg_index WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'public'::regnamespace)""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid), tgenabled::text
        FROM pg_trigger WHERE NOT tgisinternal
          AND tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'public'::regnamespace)""",
    # The foreign keys' own triggers, by their constraint (their names carry oids): disabled, a
    # foreign key is no longer enforced.
    "constraint triggers": """
        SELECT c.conname, t.tgfoid::regproc::text, t.tgenabled::text
        FROM pg_trigger t JOIN pg_constraint c ON c.oid = t.tgconstraint
        WHERE t.tgisinternal AND c.connamespace = 'public'::regnamespace""",
    "rules": """
        SELECT ev_class::regclass::text, rulename, pg_get_ruledef(oid) FROM pg_rewrite
        WHERE rulename <> '_RETURN' AND ev_class IN (SELECT oid FROM pg_class WHERE relnamespace = 'public'::regnamespace)""",
    "policies": """
        SELECT polrelid::regclass::text, polname, polcmd::text, polpermissive FROM pg_policy""",
    "types": """
        SELECT typname, typtype::text, pg_get_userbyid(typowner) FROM pg_type
        WHERE typnamespace = 'public'::regnamespace AND typtype IN ('b', 'd', 'e', 'm', 'r')""",
    "statistics objects": """
        SELECT stxname FROM pg_statistic_ext WHERE stxnamespace = 'public'::regnamespace""",
    "event triggers": """
        SELECT evtname, evtevent, evtenabled::text FROM pg_event_trigger""",
    "default privileges": """
        SELECT pg_get_userbyid(defaclrole), defaclobjtype::text, array_to_string(ARRAY(SELECT unnest(defaclacl)::text ORDER BY 1), ' ')
        FROM pg_default_acl""",
    "functions": """
        SELECT oid::regprocedure::text, pg_get_functiondef(oid), pg_get_userbyid(proowner),
               array_to_string(ARRAY(SELECT unnest(proacl)::text ORDER BY 1), ' ')
        FROM pg_proc WHERE pronamespace = 'public'::regnamespace""",
    "views": """
        SELECT relname, pg_get_viewdef(oid) FROM pg_class
        WHERE relnamespace = 'public'::regnamespace AND relkind = 'v'""",
    "schema": """
        SELECT nspname, pg_get_userbyid(nspowner), array_to_string(ARRAY(SELECT unnest(nspacl)::text ORDER BY 1), ' ')
        FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'""",
    "database": """
        SELECT array_to_string(ARRAY(SELECT unnest(datacl)::text ORDER BY 1), ' '), pg_get_userbyid(datdba), datconnlimit, datallowconn
        FROM pg_database WHERE datname = current_database()""",
    "settings": """
        SELECT pg_get_userbyid(setrole), array_to_string(setconfig, ' ') FROM pg_db_role_setting
        WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())""",
    # The version section 4 of schema.sql records is one of these.
    "comments": """
        SELECT pg_describe_object(classoid, objoid, objsubid), description FROM pg_description
        WHERE objoid >= 16384 OR (classoid = 'pg_namespace'::regclass AND objoid = 'public'::regnamespace)""",
}

def catalog_shape(conn) -> dict[str, set[tuple]]:
    return {aspect: set(conn.execute(query).fetchall()) for aspect, query in SHAPE.items()}


# Every aspect of SHAPE hashed on the server, in one round trip: equal when catalog_shape() is.
CATALOG_FINGERPRINT = "SELECT " + ", ".join(
    f"(SELECT md5(coalesce(string_agg(row::text, E'\\n' ORDER BY row::text), '')) FROM ({query}) AS row)" for query in SHAPE.values()
)


def catalog_fingerprint(conn) -> tuple:
    return tuple(conn.execute(CATALOG_FINGERPRINT).fetchone())


# The database role each service logs in as (roles.sql); trust authentication needs no password.
SERVICE_ROLES = {"appointments.py": "clinic_api", "billing_worker.py": "clinic_worker", "tests/broken_worker.py": "clinic_worker"}


def as_role(url: str, script: str) -> str:
    """The connection string a service would be given: the same database, its own role."""
    return psycopg.conninfo.make_conninfo(url, user=SERVICE_ROLES[script])


def fresh_database(admin_url: str) -> str:
    """A new database with the schema applied (for clusters without our template)."""
    url = create_database(admin_url, f"clinic_test_{uuid.uuid4().hex[:12]}")
    apply_schema(url)
    return url


class Service:
    """One real service process (python appointments.py / billing_worker.py)."""

    def __init__(self, script: str, env: dict[str, str], args: tuple[str, ...] = (), log_dir: Path | None = None):
        self.script = script
        base = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
        self.env = {**base, **env}
        self.log_path = Path(tempfile.mkstemp(prefix=f"{Path(script).stem}-", suffix=".log", dir=log_dir)[1])
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, str(ROOT / script), *args], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def base_url(self) -> str:
        key = "APPOINTMENTS_PORT" if self.script == "appointments.py" else "BILLING_PORT"
        return f"http://127.0.0.1:{self.env[key]}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 20) -> Service:
        def answers():
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.script} exited with {self.popen.returncode}:\n{self.output()}")
            with contextlib.suppress(requests.RequestException):
                return requests.get(self.base_url + "/health", timeout=1).status_code == 200
            return False

        wait_until(answers, timeout, what=f"{self.script} /health")
        return self

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, then SIGKILL if it does not go; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(timeout=5)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=5)


def worker_env(url: str, **env) -> dict[str, str]:
    """The caller's environment without service settings, DATABASE_URL as the worker's role."""
    base = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    return {**base, "DATABASE_URL": as_role(url, "billing_worker.py"), **{k: str(v) for k, v in env.items()}}


def run_worker_command(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """python billing_worker.py <args> (--once, requeue, reconcile), as the worker's database role."""
    return subprocess.run([sys.executable, str(ROOT / "billing_worker.py"), *args], env=worker_env(url),
                          capture_output=True, text=True, timeout=timeout)


# A backlog of n ended appointments with their pending charges, as the API would have left them
# (durations of 1 to 180 minutes, at the default rate), written in one statement for speed.
MAKE_BACKLOG = """
WITH ended AS (
    INSERT INTO appointments (id, physician_id, patient_id, start_date, end_date, hourly_rate, price)
    SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), s, s + make_interval(mins => g %% 180 + 1),
           200.00, round(200.00 * (g %% 180 + 1) / 60, 2)
    FROM generate_series(1, %(n)s) g, (SELECT timestamptz '2020-12-01 13:00:00+00' AS s) start
    RETURNING id, price
)
INSERT INTO billing_queue (appointment_id, total_price) SELECT id, price FROM ended
"""

# Everything that would mean lost or doubled money, counted from the data. The expected price is
# recomputed here in SQL, independently of the Python pricing code.
LEDGER = """
SELECT
  (SELECT count(*) FROM appointments WHERE end_date IS NOT NULL) AS ended,
  (SELECT count(*) FROM billing_entries) AS entries,
  (SELECT count(*) FROM billing_queue WHERE status = 'pending') AS pending,
  (SELECT count(*) FROM billing_queue WHERE status = 'failed') AS failed,
  (SELECT count(*) FROM appointments a WHERE end_date IS NOT NULL
      AND (SELECT count(*) FROM billing_entries e WHERE e.appointment_id = a.id) <> 1) AS not_billed_once,
  (SELECT count(*) FROM billing_queue q WHERE (q.status = 'billed')
      <> EXISTS (SELECT 1 FROM billing_entries e WHERE e.appointment_id = q.appointment_id)) AS status_mismatch,
  (SELECT count(*) FROM billing_entries e JOIN appointments a ON a.id = e.appointment_id
      WHERE e.total_price <> round(a.hourly_rate * ceil(extract(epoch FROM a.end_date - a.start_date) / 60) / 60, 2)
  ) AS wrong_total
"""


def make_backlog(conn, n: int) -> None:
    conn.execute(MAKE_BACKLOG, {"n": n})


def ledger(conn) -> dict:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(LEDGER).fetchone()


def assert_billed_exactly_once(conn, ended: int) -> None:
    """Every ended appointment has exactly one entry with the right total; nothing else."""
    assert ledger(conn) == {
        "ended": ended, "entries": ended, "pending": 0, "failed": 0,
        "not_billed_once": 0, "status_mismatch": 0, "wrong_total": 0,
    }


# ---------------------------------------------------------------------------------------------
# The listings' data set: tests/test_listings.py's plans and make bench's listings section page through it.

LISTINGS_OPEN = 300  # the newest appointments: still in progress
LISTINGS_BATCH = 500  # entries per worker transaction: one txid and one created_at each

# `rows` appointments, four on each minute (ties). Every 10th is the busy physician's, every 10th
# (another tenth) the busy patient's; the rest spread over 997 physicians and 1009 patients. Ids
# are md5 of the row number, so that a test can name them without a lookup.
LOAD_LISTING_APPOINTMENTS = """
INSERT INTO appointments (id, physician_id, patient_id, start_date, end_date, hourly_rate, price)
SELECT md5('appointment ' || g)::uuid,
       md5('physician ' || CASE WHEN g %% 10 = 0 THEN 0 ELSE g %% 997 + 1 END)::uuid,
       md5('patient ' || CASE WHEN g %% 10 = 5 THEN 0 ELSE g %% 1009 + 1 END)::uuid,
       s.start,
       CASE WHEN g <= %(ended)s THEN s.start + make_interval(mins => g %% 90 + 1) END,
       200.00,
       CASE WHEN g <= %(ended)s THEN round(200.00 * (g %% 90 + 1) / 60, 2) END
FROM generate_series(1, %(rows)s) g,
     LATERAL (SELECT timestamptz '2020-01-01 00:00:00+00' + (g / 4) * interval '1 minute' AS start) s
"""

LOAD_LISTING_QUEUE = """
INSERT INTO billing_queue (appointment_id, total_price, status, attempts, processed_at)
SELECT id, price, 'billed', 1, now() FROM appointments WHERE end_date IS NOT NULL
"""

# The ledger as a worker writes it: a transaction per batch (its own txid and created_at), in the
# order the appointments ended.
LOAD_LISTING_ENTRIES = """
DO $$
DECLARE lo bigint := 1;
BEGIN
    WHILE lo <= {ended} LOOP
        INSERT INTO billing_entries (appointment_id, total_price)
        SELECT md5('appointment ' || g)::uuid, round(200.00 * (g % 90 + 1) / 60, 2)
        FROM generate_series(lo, least(lo + {batch} - 1, {ended})) g;
        COMMIT;
        lo := lo + {batch};
    END LOOP;
END $$
"""


def load_listings(conn, rows: int) -> None:
    """The data set into an empty database (an autocommit connection): the newest LISTINGS_OPEN
    appointments open, the rest ended, billed and in the ledger; then VACUUM ANALYZE (what
    autovacuum keeps doing in production). The triggers are off while it loads
    (session_replication_role = replica: no foreign-key checks, no NOTIFY), twice as fast; the rows
    are consistent by construction."""
    ended = rows - LISTINGS_OPEN
    conn.execute("SET session_replication_role = replica")
    conn.execute(LOAD_LISTING_APPOINTMENTS, {"rows": rows, "ended": ended})
    conn.execute(LOAD_LISTING_QUEUE)
    conn.execute(LOAD_LISTING_ENTRIES.format(ended=int(ended), batch=int(LISTINGS_BATCH)))
    conn.execute("RESET session_replication_role")
    conn.execute("VACUUM ANALYZE")


# ---------------------------------------------------------------------------------------------
# The edge (HAProxy with deploy/haproxy/haproxy.cfg) and wrk, for the overload tests and bench.

EDGE_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
OVERLOAD_LUA = ROOT / "bench" / "bench_overload.lua"


class Edge:
    """HAProxy run with deploy/haproxy/haproxy.cfg, as the compose `edge` service runs it, in
    front of one API process; on ports and a socket of its own. A context manager."""

    def __init__(self, api_url: str, log_dir: Path | None = None, **settings: str):
        self.port, self.metrics_port = free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="clinic-edge-", dir=log_dir))
        api = api_url.removeprefix("http://")
        self.env = {
            **os.environ,
            "CLINIC_EDGE_BIND": f"127.0.0.1:{self.port}",
            "CLINIC_EDGE_METRICS_BIND": f"127.0.0.1:{self.metrics_port}",
            "CLINIC_EDGE_ADMIN_SOCKET": str(self.dir / "admin.sock"),
            "CLINIC_API_SERVERS": api,
            **settings,
        }
        self.log_path = self.dir / "haproxy.log"
        self.popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Edge:
        with open(self.log_path, "wb") as log:
            # -db: in the foreground, as the official image runs it (-W -db).
            self.popen = subprocess.Popen(["haproxy", "-W", "-db", "-f", str(EDGE_CONFIG)], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._serving, 20, interval=0.1, what="HAProxy to route to the API")
        return self

    def _serving(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.popen.returncode}: {self.log_path.read_text()[-2000:]}")
        with contextlib.suppress(requests.RequestException):
            return 'haproxy_backend_active_servers{proxy="api"} 1' in self.metrics()
        return False

    def __exit__(self, *exc) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()  # SIGTERM: a hard stop; the image's SIGUSR1 would drain first
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text


def run_wrk(url: str, connections: int, seconds: float, script: Path = OVERLOAD_LUA, threads: int = 2, args: Sequence[str] = ()) -> dict:
    """wrk against url (``args`` after it: more options such as -H, then ``--`` and the script's
    own); the script's RESULT line (bench/bench_report.lua) as a dict, with `duration_s` and, for
    bench_overload.lua, `goodput` (2xx answers a second). bench/bench.py runs its timed cells with it too."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script), url, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    found = re.search(r"^RESULT (\{.*\})$", done.stdout, re.M)
    if done.returncode != 0 or not found:
        raise AssertionError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    figures = json.loads(found.group(1))
    figures["duration_s"] = figures["duration_us"] / 1e6
    if "ok" in figures:
        figures["goodput"] = figures["ok"] / figures["duration_s"]
    return figures


# ---------------------------------------------------------------------------------------------
# A client's record of what it was told: the load of the failover and hung-database tests.

RATE = decimal.Decimal("200.00")
BASE_START = dt.datetime(2024, 1, 1, 8, 0, 0, tzinfo=dt.timezone.utc)


def expected_price(minutes: int) -> decimal.Decimal:
    """The price rule, restated independently of appointments.price_for."""
    return (RATE * minutes / 60).quantize(decimal.Decimal("0.01"), rounding=decimal.ROUND_HALF_UP)


@dataclasses.dataclass
class Appointment:
    id: str
    minutes: int
    end_sent: bool = False
    end_acked: bool = False
    end_acked_at: float = 0.0  # monotonic, when the 2xx came
    end_unknowns: int = 0
    acked_attempt_sent_at: float = 0.0  # wall clock, when the attempt that got the 2xx was sent
    acked_attempt_sent: float = 0.0  # the same, monotonic


@dataclasses.dataclass
class Attempt:
    kind: str  # start or end
    sent: float  # monotonic
    done: float
    outcome: str  # acked, 4xx, 503, no_response, 5xx
    status: int | None


class Load(threading.Thread):
    """``clients`` threads starting and ending appointments through the API until stopped, each
    with ids of its own choosing; each finishes the appointment in hand, retrying unknown outcomes
    (no answer, a 503) with the same body, as a careful client does. Every attempt is recorded,
    so that a test can count what was acknowledged against the ledger, and time each call."""

    def __init__(self, api_url: str, seed: int, clients: int = 4, timeout: tuple[float, float] = (2, 10), headers: dict | None = None):
        super().__init__(daemon=True)
        self.api_url = api_url
        self.seed = seed
        self.halt = threading.Event()
        self.given_up = threading.Event()
        self.lock = threading.Lock()
        self.appointments: dict[str, Appointment] = {}
        self.attempts: list[Attempt] = []
        self.bad_responses: list[str] = []
        self.timeout = timeout
        self.headers = headers or {}
        self.clients = [threading.Thread(target=self._client, args=(random.Random(seed + i),), daemon=True) for i in range(clients)]

    def run(self) -> None:
        for client in self.clients:
            client.start()
        for client in self.clients:
            client.join()

    def stop(self, timeout: float = 60) -> bool:
        """True when every client finished the appointment in hand within timeout."""
        self.halt.set()
        self.join(timeout)
        return not self.is_alive()

    def give_up(self, timeout: float = 30) -> bool:
        """Stops at once, leaving unknown outcomes unknown (the server is gone for good): each
        client ends after its call in flight. True when every client ended within timeout."""
        self.given_up.set()
        return self.stop(timeout)

    def outcomes(self) -> collections.Counter:
        with self.lock:
            return collections.Counter(f"{a.kind}_{a.outcome}" for a in self.attempts)

    def _client(self, rng: random.Random) -> None:
        session = requests.Session()
        session.headers.update(self.headers)
        while not self.halt.is_set():
            appointment = Appointment(id=str(uuid.uuid4()), minutes=rng.randint(1, 180))
            start = BASE_START + dt.timedelta(minutes=rng.randint(0, 500_000))
            # Any second inside the last started minute: the price counts started minutes.
            end = start + dt.timedelta(minutes=appointment.minutes) - dt.timedelta(seconds=rng.randint(0, 59))
            with self.lock:
                self.appointments[appointment.id] = appointment
            body = {
                "id": appointment.id, "physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()),
                "start_date": start.isoformat(),
            }
            if not self._send(session, rng, "start", "/appointments", body, appointment):
                continue
            appointment.end_sent = True
            self._send(session, rng, "end", f"/appointments/{appointment.id}/end", {"end_date": end.isoformat()}, appointment)

    def _send(self, session, rng, kind: str, path: str, body: dict, appointment: Appointment) -> bool:
        """POSTs until acknowledged (True) or refused with a 4xx (False)."""
        while True:
            sent, sent_wall = time.monotonic(), time.time()
            try:
                response = session.post(self.api_url + path, json=body, timeout=self.timeout)
                status, text = response.status_code, response.text
            except requests.RequestException:
                response, status, text = None, None, ""
            done = time.monotonic()
            if status is not None and status < 300:
                outcome = "acked"
            elif status is not None and 400 <= status < 500:
                outcome = "4xx"
            elif status == 503:
                outcome = "503"
            else:
                outcome = "no_response" if status is None else "5xx"
            with self.lock:
                self.attempts.append(Attempt(kind, sent, done, outcome, status))
                bad = outcome in ("4xx", "5xx") or (outcome == "503" and not response.headers.get("Retry-After"))
                if bad and len(self.bad_responses) < 20:
                    self.bad_responses.append(f"{kind} {status} {dict(response.headers) if response is not None else ''}: {text[:300]}")
            if outcome == "acked":
                if kind == "end":
                    appointment.end_acked, appointment.end_acked_at = True, done
                    appointment.acked_attempt_sent_at, appointment.acked_attempt_sent = sent_wall, sent
                return True
            if outcome == "4xx":
                return False
            if kind == "end":
                appointment.end_unknowns += 1
            if self.given_up.is_set():
                return False
            # Unknown (no answer, 503; any other 5xx fails the run but is retried alike): again,
            # the same body, soon; short pauses so that the figures measure the services.
            time.sleep(rng.uniform(0.02, 0.1))


class Probes(threading.Thread):
    """GETs /health, /ready and /metrics of each service every 50 ms, as a kubelet and Prometheus
    would; records (base_url, path, sent at, seconds, status)."""

    PATHS = ("/health", "/ready", "/metrics")

    def __init__(self, base_urls: list[str], paths: tuple[str, ...] = PATHS):
        super().__init__(daemon=True)
        self.base_urls, self.paths = base_urls, paths
        self.halt = threading.Event()
        self.samples: list[tuple[str, str, float, float, int | None]] = []

    def run(self) -> None:
        session = requests.Session()
        while not self.halt.is_set():
            for base in self.base_urls:
                for path in self.paths:
                    began = time.monotonic()
                    try:
                        status = session.get(base + path, timeout=30).status_code
                    except requests.RequestException:
                        status = None
                    self.samples.append((base, path, began, time.monotonic() - began, status))
            self.halt.wait(0.05)

    def stop(self) -> None:
        self.halt.set()
        self.join(40)

    def summary(self, since: float = float("-inf"), until: float = float("inf")) -> dict:
        """{base_url: {path: n, p99_ms, max_ms, statuses}} of the samples sent within [since, until]."""
        out: dict = {}
        for base in self.base_urls:
            for path in self.paths:
                rows = [(s, st) for b, p, at, s, st in self.samples if b == base and p == path and since <= at <= until]
                times = sorted(s for s, _ in rows)
                out.setdefault(base, {})[path] = {
                    "n": len(times),
                    "p99_ms": round(1000 * times[min(len(times) - 1, int(len(times) * 0.99))], 1) if times else None,
                    "max_ms": round(1000 * times[-1], 1) if times else None,
                    "statuses": dict(collections.Counter(str(st) for _, st in rows)),
                    "not_200": sum(1 for _, st in rows if st != 200),
                }
        return out
