"""make bench: every figure of the service next to this machine's own ceiling for it, measured in the same run.

    make bench            # .venv/bin/python bench/bench.py, after installing wrk and haproxy when missing
    make bench-smoke      # the same with --smoke: tiny sizes, every section in about a minute and a half
    .venv/bin/python bench/bench.py [--seconds 4] [--connections 4,16,64] [--backlog 100000]
        [--e2c-rates 200,500] [--e2c-seconds 10] [--soak-requests 500000] [--budget-seconds 840]
        [--overload-connections 16,256,1000,4000] [--freeze-seconds 12] [--backup-appointments 1000000]
        [--backup-load-seconds 4] [--scale-connections 64] [--listing-rows 1000000] [--listing-repeats 100]
        [--out FILE] [--smoke]

This file owns the harness; bench/bench_*.lua are its wrk scripts (each ends with
bench_report.lua's result line) and bench/ceiling_app.py the app of the framework ceiling and of
the design floor. The cluster, the edge, wrk's timed runs, the load client, the ledger check and
the listings' data set come from tests/support.py, the restore drill from tests/restore_drill.py;
they import as top-level modules through the venv's .pth file (make venv), as in pytest.
Needs wrk, pgbench, haproxy, pgbackrest and the PostgreSQL server binaries (Debian: wrk, haproxy,
pgbackrest, and postgresql-15 with its client). Takes about 14 minutes on 2 cores: the soak's
500,000 requests are a third of it, section 9's million appointments a fifth, and --budget-seconds
(840) cuts the soak short to keep the whole within it (see 6). --smoke takes about a minute and a
half. The table ends with the run's wall time and each part's.

What it runs, as a user would: a PostgreSQL cluster of its own (initdb in a temporary directory,
PostgreSQL's defaults, fsync on, but for the settings in BenchCluster.SETTINGS; all recorded in
the JSON), a fresh database with the schema (db.apply_schema), and the services as
`python appointments.py` and `python billing_worker.py` with default settings but their ports,
DATABASE_URL (logged in as clinic_api / clinic_worker) and API_TOKENS (one token, made for the
run, which every wrk request carries, so access control is in the hot path); their logs (INFO,
JSON) go to files. Nothing is pinned to a CPU. The SQL that pgbench and the ceilings run comes from
the modules' constants at run time (PGBENCH_SCRIPTS names them), never copied.

Sections:
1. Framework ceiling: bench/ceiling_app.py (a JSON POST, no database) on web.make_server, with
   wrk -t2 at each --connections: a warm-up of WARMUP_SECONDS, then --seconds measured.
2. POST /appointments (server-made ids) and POST /appointments/{id}/end (appointments started in
   SQL beforehand, each ended once), the same wrk settings: req/s, p50, p99, max, errors (wrk's:
   sockets, and answers of 400 and over; the API sends no 1xx or 3xx). Next to section 1 at the
   same connections (the ratio the targets are about) and to pgbench (-M prepared, as
   clinic_api, as many clients as connections) running the endpoint's own SQL (PGBENCH_SCRIPTS).
   The start is also next to the design floor, measured alike at each connection count:
   `ceiling_app.py --with-insert`, the framework ceiling's app whose POST also runs
   appointments.INSERT_APPOINTMENT through the project's pool (db.make_pool) as clinic_api and
   answers the row's id: what one round trip to PostgreSQL through psycopg costs in this design,
   before any of the API's own work (validation, middleware, logging, access control). Its own
   rows stand next to the framework ceiling. An end has no such floor. No worker runs.
3. Drain: the backlog of --backlog charges that the soak (6) made through the real end path with
   no worker running, copied per run (CREATE DATABASE ... TEMPLATE): `billing_worker.py --once`,
   then two, then four `--once` started together (DRAIN_WORKERS); charges/s net of start-up (the
   median wall time of three runs of as many `--once` on an empty queue; a drain under a second,
   as in a smoke run, is timed by the workers' batch log lines instead), and the CPU per charge of
   the workers (wait4) and of the PostgreSQL server (cluster_cpu), net of the same runs' median.
   The ceiling: DRAIN_SQL on another copy, in one transaction. Afterwards every charge must have
   exactly one entry (tests/support.py ledger()).
4. End to charge: ends at each --e2c-rates (open loop from wrk, bench_paced_end.lua) for
   --e2c-seconds, the worker running with its defaults; from each end's HTTP answer to its
   billing entry being visible to another session (LedgerWatch): with NOTIFY, then with polling
   only (BILLING_LISTEN=off; marked NO EFFECT when the worker still LISTENs). Ceiling: with
   NOTIFY, the worker's own CLAIM_AND_BILL run by a bare LISTEN loop (--bare-worker); with
   polling, the poll interval. Each mode starts from a vacuumed queue (VACUUM_MAIN says why).
5. Interference: POST /appointments at 16 connections while one worker drains a copy of the
   backlog, against the same run's idle window just before the worker started (bench_timed_start.lua).
6. Memory and soak: peak RSS (VmHWM) of every service process of the run, next to a process with
   only falcon and waitress imported (MEMORY_FLOOR); the API's RSS (VmRSS) after --soak-baseline
   and after --soak-requests (10,000 and 500,000) requests, on a fresh API process at
   16 connections (bench_soak.lua, soak_phases()). First the "ends" mix until the backlog's ends
   are all sent: SOAK_ENDS_SHARE of the requests are those ends, the rest GET /appointments/{id}
   and POST /appointments 3:1 (the baseline is read within it, so it has seen every kind of
   request); then the "fast" mix makes up the count at about twice the rate: 1 in 20
   POST /appointments, of the rest 1 in 3 GET /appointments/{id} and 2 in 3 GET /health. RSS is
   read after each part. Should the run otherwise end later than --budget-seconds after it
   began (a reserve for sections 3, 5, 7, 8 and 9 taken off, RESERVE_AFTER_SOAK_SECONDS and
   RESERVE_BACKUPS_SECONDS), the fast part
   stops there: the table's row says the count reached, the JSON stopped_by_budget.

7. Overload: POST /appointments (bench_overload.lua, server-made ids) at each
   --overload-connections, through the edge (HAProxy with deploy/haproxy/haproxy.cfg,
   support.Edge) in front of a fresh API process, then straight at another fresh one: goodput (2xx a second) against the
   same path's at 16 connections, 503s a second, p50/p99/max over every answer, answers that
   were not 2xx or a 503 with Retry-After, closed connections and socket errors; meanwhile the
   process's /health, /ready and /metrics every 50 ms (their p99); and the CPU the edge and the
   API spend per request at 16 connections.
8. Hung database: a fresh API and worker on a database of their own, 8 clients starting and
   ending appointments with their own ids and retrying unknown outcomes (support.Load); then the
   whole server frozen (SIGSTOP) for --freeze-seconds and thawed: the longest call against
   REQUEST_TIMEOUT_SECONDS, the probes' p99 while frozen, the first 2xx after the thaw, and the
   ledger against what the clients were told.

9. Backups: tests/restore_drill.py's drill on a cluster of its own archiving with pgBackRest
   (deploy/postgres/pgbackrest.conf, docker-compose.yml's archive_timeout), whose database holds
   --backup-appointments ended and billed appointments (1,000,000): a full backup taken while 4
   clients start and end appointments through a fresh API and a worker bills them, then the data
   directory deleted under that load and the latest point restored: the backup's time and size,
   the RTO (restore, WAL replay and promotion, the first acknowledged end) and the RPO (how old
   the oldest acknowledged end that was lost), and the ledger against what the clients were told.
10. One and two API processes behind the edge: section 2's starts and ends at each
   --scale-connections, through the edge in front of one fresh API process, then in front of it
   and another (TwoProcessEdge), on a database of their own: req/s (the two against the one, the
   one against section 2's straight at a process), p50/p99/max, errors, and the CPU per request of
   the API processes (each), the edge and the PostgreSQL server. Runs after 4, before the soak.
11. Listings: --listing-rows appointments of tests/support.py's listing data set (the one
   tests/test_listings.py asserts the plans on) in a database of its own; page 1 against a deep
   page (500, rows 49,901-50,000; fewer when the busy physician has fewer) of GET /appointments,
   of one busy physician's, of GET /billing-entries and of the change feed (as many pages in):
   the median of --listing-repeats requests through the services' own apps in this process
   (falcon.testing, real pools as the services' roles), the deep page by its cursor; the same page
   by OFFSET in SQL for contrast; the shared buffers each page's SQL touches.

Prints one table (value, ceiling, ratio, target, PASS or MISS) and writes it with
every raw figure and the machine's facts to bench/results/bench-<UTC yyyymmdd-hhmmss>.json (a
smoke run: to the temporary directory), or --out. Every process it starts is stopped on exit, an
error, Ctrl-C or SIGTERM, and should this script be killed outright (SIGKILL) the kernel still
stops them (setpriv --pdeathsig; the cluster's postmaster gets SIGQUIT), but for wrk's timed runs,
which end within their seconds by themselves; the cluster's files go.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import falcon.testing
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

import appointments
import billing_worker
import config
import ledger
import paging
import web
from db import apply_schema, make_pool
from restore_drill import Drill, archive_timeout, lose_the_volume_under_load, start_archiving
from support import (
    LISTINGS_OPEN, OVERLOAD_LUA, SERVICE_VARS, Edge, Load, Probes, TempCluster, as_role, children, create_database, drop_database,
    expected_price, free_port, freeze, ledger as ledger_counts, load_listings, make_backlog, run_wrk, thaw,
)
from telemetry import setup_logging

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CEILING_APP = BENCH / "ceiling_app.py"
START_LUA = BENCH / "bench_start.lua"  # POST /appointments; wrk adds the -H Authorization to it
END_LUA = BENCH / "bench_end.lua"
PACED_END_LUA = BENCH / "bench_paced_end.lua"
SOAK_LUA = BENCH / "bench_soak.lua"
TIMED_START_LUA = BENCH / "bench_timed_start.lua"

WRK_THREADS = 2  # every wrk run's; the scripts that share out an id file are told it too
WARMUP_SECONDS = 1
# More connections than in-flight ends at 500/s (a few ms each), so that a send seldom waits for
# a free one (bench_paced_end.lua); the slip is measured anyway.
PACED_CONNECTIONS = 32
SOAK_CONNECTIONS = 16
# The soak's share of ends until the backlog is made (bench_soak.lua's "ends" mix); afterwards
# the "fast" mix, about twice the rate, makes up --soak-requests (soak_phases()).
SOAK_ENDS_SHARE = 0.9
# What sections 3, 5, 7 and 8 take after the soak: a fixed part (7 and 8 are most of it), and so
# much per 100,000 charges of backlog: the soak's fast part stops where the run would otherwise end later
# than --budget-seconds. (10 and 11 run before the soak: its deadline counts them by itself.)
RESERVE_AFTER_SOAK_SECONDS = (90, 55)  # (fixed, per 100,000 charges)
# And section 9: a fixed part (the drill's load, restore and checks) and so much per 100,000
# appointments of --backup-appointments (making them, the backup, the restore: 175 s for 1,000,000).
RESERVE_BACKUPS_SECONDS = (25, 16)
INTERFERENCE_CONNECTIONS = 16
DRAIN_WORKERS = (1, 2, 4)  # 4: more workers than cores
STARTUP_RUNS = 3  # `--once` on an empty queue, for the worker's start-up (their median)
MIN_NET_DRAIN_SECONDS = 1.0  # below it, a drain's rate comes from the batch log lines (drains())
# Variables the services read that the caller's shell must not hand them: tests/support.py's list
# and settings newer than it.
EXTRA_SERVICE_VARS = ("BILLING_LISTEN",)
ROLES = {"api": "clinic_api", "worker": "clinic_worker"}

# The targets (same run, ratios; this 2-core machine).
TARGET_START_VS_FRAMEWORK = 0.6
TARGET_END_VS_FRAMEWORK = 0.5
TARGET_MAX_MS_AT_64 = 1000
TARGET_DRAIN_VS_SQL = 0.6
TARGET_TWO_VS_ONE = 1.0
TARGET_NOTIFY_P99_MS = 5.0
TARGET_NOTIFY_RATE = 200
TARGET_POLL_MARGIN_S = 1.0
TARGET_INTERFERENCE = 1.5
TARGET_PEAK_RSS_MB = 40
TARGET_RSS_GROWTH_MB = 2
# Overload and a hung database (same run, ratios of goodput to the same path's at 16 connections).
TARGET_GOODPUT_VS_16 = {256: 0.8, 1000: 0.8, 4000: 0.5}
TARGET_OVERLOAD_P99_MS = 500
TARGET_PROBE_P99_MS = 100
TARGET_DEADLINE_MARGIN_S = 0.5
TARGET_FIRST_2XX_AFTER_THAW_S = 1.0
# The backups' promise: an end acknowledged more than this long before the data volume is lost survives.
TARGET_RPO_S = 5.0

# ---------------------------------------------------------------------------------------------
# SQL of the harness itself (the service's own is read from its modules: PGBENCH_SCRIPTS).

PENDING = "SELECT count(*) FROM billing_queue WHERE status = 'pending'"

# Before each mode of section 4. Billing a charge leaves its old queue row behind in the partial
# index that the claim walks (billing_queue_due) until VACUUM: right after the worker had billed
# the 25,000 charges that section 2 leaves pending, claims of 1-5 rows took 10-17 ms instead of
# about 1 ms, and that CPU starved the API at 500 ends/s. Section 4 is about the steady state, so
# each mode starts from a vacuumed queue, not from that leftover of section 2.
VACUUM_MAIN = "VACUUM (ANALYZE) billing_queue, billing_entries, appointments"
ANY_PENDING = "SELECT EXISTS (SELECT FROM billing_queue WHERE status = 'pending')"

# The drain's ceiling: the worker's work on every pending row in one transaction, as plain SQL.
DRAIN_SQL = (
    """
    INSERT INTO billing_entries (appointment_id, total_price)
    SELECT appointment_id, total_price FROM billing_queue WHERE status = 'pending'
    """,
    """
    UPDATE billing_queue SET status = 'billed', processed_at = now(), attempts = attempts + 1
    WHERE status = 'pending'
    """,
)

# When the entries of a drain were written: the first and the last batch's transaction start.
DRAIN_SPAN = "SELECT extract(epoch FROM min(created_at))::float8, extract(epoch FROM max(created_at))::float8 FROM billing_entries"

# LedgerWatch: the snapshot's xmin (every transaction below it has ended) and the entries written
# by transactions at or above the previous read's xmin (billing_entries_feed serves it).
SNAPSHOT_XMIN = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"
NEW_ENTRIES = """
SELECT pg_snapshot_xmin(pg_current_snapshot())::text,
       array(SELECT appointment_id::text FROM billing_entries WHERE txid >= %(horizon)s::xid8)
"""
LEDGER_CHANNEL = "billing_entries"  # schema.sql's billing_entries_ring_the_feed NOTIFYs it

# Sessions of a role in this database whose last statement was a LISTEN on the worker's channel
# (a session that LISTENs only waits afterwards, so its last statement stays that).
LISTENING = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND usename = %(role)s AND query ~* %(pattern)s
"""

# The server's settings that are not PostgreSQL's built-in defaults, and the ones that shape the
# figures whatever their source.
CHANGED_SETTINGS = """
SELECT name, current_setting(name), source FROM pg_settings
WHERE source NOT IN ('default', 'override') OR name = ANY(%(names)s)
ORDER BY name
"""
KEY_SETTINGS = [
    "shared_buffers", "max_connections", "synchronous_commit", "fsync", "wal_sync_method", "commit_delay",
    "wal_level", "max_wal_size", "checkpoint_timeout", "autovacuum", "jit", "work_mem",
]

# Open appointments for the end cells (ended by wrk with end_date 15:00: price 400.00).
MAKE_OPEN = """
INSERT INTO appointments (id, physician_id, patient_id, start_date, hourly_rate)
SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), timestamptz '2020-12-01 13:00:00+00', 200.00
FROM generate_series(1, %(n)s)
RETURNING id
"""

# pgbench's open appointments: client c's i-th end is appointment md5('pgbench-<run>-<c>-<i>').
MAKE_PGBENCH_OPEN = """
INSERT INTO appointments (id, physician_id, patient_id, start_date, hourly_rate)
SELECT md5('pgbench-' || %(run)s || '-' || c || '-' || i)::uuid, gen_random_uuid(), gen_random_uuid(),
       timestamptz '2020-12-01 13:00:00+00', 200.00
FROM generate_series(0, %(clients)s - 1) c, generate_series(1, %(per_client)s) i
"""

# Section 6's floor: Python with Falcon and waitress imported and a waitress server made with the
# API's thread count (argv[1]), nothing else: the least any Falcon-on-waitress service holds. (The
# ceiling app imports web.py, and with it psycopg, jsonschema, yaml, structlog, prometheus_client.)
MEMORY_FLOOR = """
import re, sys
import falcon, waitress.server
server = waitress.server.create_server(falcon.App(), host="127.0.0.1", port=0, threads=int(sys.argv[1]))
print(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
server.close()
"""

# A copy of the backlog per run: FILE_COPY checkpoints before and after the copy, so each drain
# starts with the same clean buffers and no checkpoint debt.
COPY_DATABASE = "CREATE DATABASE {copy} TEMPLATE {template} STRATEGY FILE_COPY"


class BenchError(Exception):
    """The harness cannot go on; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------
# pgbench: the endpoints' own SQL, taken from the modules at run time.

# What each endpoint runs (AppointmentStore.start and .end): its statements in order, and whether
# they share one transaction (BEGIN ... COMMIT) or each is its own (the pool's connections are in
# autocommit). The first shape whose constants all exist in appointments.py is used, and recorded;
# when appointments.py restructures its statements, this is the one place to follow it.
PGBENCH_SCRIPTS = {
    "start": [(("INSERT_APPOINTMENT",), False)],
    "end": [
        (("SELECT_FOR_END", "END_AND_QUEUE_CHARGE"), False),  # optimistic: read, then end if still open
        (("LOCK_APPOINTMENT", "END_AND_QUEUE_CHARGE"), True),  # read with a row lock, end, one transaction
    ],
}
# pgbench's values for the statements' parameters. An end's appointment is client c's i-th, made
# open beforehand by MAKE_PGBENCH_OPEN; :i counts each client's ends.
PGBENCH_APPOINTMENT = "md5('pgbench-' || :run || '-' || :client_id || '-' || :i)::uuid"
PGBENCH_VALUES = {
    "start": {
        "id": "gen_random_uuid()",  # server-made ids, as the API makes them
        "physician_id": "'ea959b03-5577-45c9-b9f7-a45d3e77ce82'::uuid",
        "patient_id": "'86158d46-ce33-4e3d-9822-462bbff5782e'::uuid",
        "start_date": "NULL::timestamptz",
        "hourly_rate": "200.00",
    },
    "end": {
        "id": PGBENCH_APPOINTMENT,
        "end_date": "timestamptz '2020-12-01 15:00:00+00'",
        "price": "400.00",
        "request_id": "'pgbench'",
    },
}
_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)[sbt]")


def module_sql(module, name: str) -> str:
    """A module's SQL constant, or a BenchError that says what to update."""
    text = getattr(module, name, None)
    if not isinstance(text, str):
        raise BenchError(
            f"{module.__name__}.{name} is gone (or is not SQL text): bench/bench.py runs the service's own "
            f"statements; update bench/bench.py (PGBENCH_SCRIPTS, or the ceiling that names it) to what "
            f"{module.__name__}.py runs now"
        )
    return text


def pgbench_statement(text: str, values: dict[str, str], where: str) -> str:
    """One psycopg statement as a pgbench command: each %(name)s replaced by its pgbench value."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text) if m.group(1)} - set(values))
    if missing:
        raise BenchError(f"{where} takes {', '.join(missing)}, for which bench/bench.py has no pgbench value: add it to PGBENCH_VALUES")
    body = _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) else "%", text).strip().rstrip(";")
    return body + ";\n"


def pgbench_script(kind: str) -> tuple[str, list[str]]:
    """The pgbench script of an endpoint, and the constants it was made of."""
    shapes = PGBENCH_SCRIPTS[kind]
    for names, one_transaction in shapes:
        if all(isinstance(getattr(appointments, name, None), str) for name in names):
            break
    else:
        known = "; ".join(" + ".join(names) for names, _ in shapes)
        missing = sorted({name for names, _ in shapes for name in names if not isinstance(getattr(appointments, name, None), str)})
        raise BenchError(
            f"pgbench {kind}: appointments.py has none of the statement sets bench/bench.py knows ({known}; missing: "
            f"{', '.join(missing)}); add what AppointmentStore.{kind} runs now to PGBENCH_SCRIPTS in bench/bench.py"
        )
    statements = "".join(pgbench_statement(module_sql(appointments, name), PGBENCH_VALUES[kind], f"appointments.{name}") for name in names)
    if kind == "end":
        statements = "\\set i :i + 1\n" + ("BEGIN;\n" + statements + "COMMIT;\n" if one_transaction else statements)
    return statements, [f"appointments.{name}" for name in names] + (["(one transaction)"] if one_transaction and len(names) > 1 else [])


# ---------------------------------------------------------------------------------------------
# Processes


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Processes:
    """Every process the run starts; stop_all() stops those still running, whatever happened.

    Not support.Service, which the tests use: a run starts processes of every kind (wrk, pgbench,
    HAProxy, the ceiling app, workers run --once), many at a time, and must leave none behind
    even when this script is killed (setpriv --pdeathsig), outside any pytest fixture."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, stdout_path: Path | None = None) -> subprocess.Popen:
        log_path = stdout_path or self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            # setpriv --pdeathsig: the kernel sends SIGTERM should this script die without its
            # clean-up (SIGKILL), so nothing is left behind in any case.
            process = subprocess.Popen(
                ["setpriv", "--pdeathsig", "TERM", "--", *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        process.log_path = log_path  # type: ignore[attr-defined]
        self._running.append((name, process))
        return process

    def stop(self, process: subprocess.Popen, timeout: float = 10) -> int:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self._running = [(n, p) for n, p in self._running if p is not process]
        return process.returncode

    def stop_all(self) -> None:
        for _, process in reversed(self._running):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 10
        for name, process in reversed(self._running):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"  {name} did not stop on SIGTERM: SIGKILL")
                process.kill()
                process.wait(timeout=5)
        self._running = []


def wait_http(url: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise BenchError(f"{url}: the process exited with {process.returncode}:\n{tail(process.log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{url} did not answer 200 within {timeout} s:\n{tail(process.log_path)}")
        time.sleep(0.1)


def write_open_appointments(conn: psycopg.Connection, n: int, path: Path) -> None:
    ids = conn.execute(MAKE_OPEN, {"n": n}).fetchall()
    path.write_text("".join(f"{i}\n" for (i,) in ids))


# ---------------------------------------------------------------------------------------------
# The cluster


class BenchCluster(TempCluster):
    """tests/support.py's TempCluster (initdb in a temporary directory, removed by destroy()),
    started for benchmarks: PostgreSQL's defaults, fsync on, except SETTINGS; in the foreground,
    as a child of this script, so that it cannot outlive it: setpriv --pdeathsig sends the
    postmaster SIGQUIT (immediate shutdown) should runuser, which this script's death stops, go."""

    SETTINGS = {
        "listen_addresses": "127.0.0.1",
        # pgbench's 64 clients next to the API's pool, the workers' and the harness's own sessions
        # (the default of 100 is too close).
        "max_connections": "200",
    }

    def start_in(self, processes: Processes) -> None:
        options = [arg for key, value in self.SETTINGS.items() for arg in ("-c", f"{key}={value}")]
        argv = [*self._as, "setpriv", "--pdeathsig", "QUIT", "--", os.path.join(self.bindir, "postgres"),
                "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir), *options]
        self.process = processes.start("postgres", argv, dict(os.environ), stdout_path=self.log)
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"the benchmark cluster did not start:\n{tail(self.log)}") from None
                time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Readings

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int, reaped_children: bool = False) -> float | None:
    """utime + stime of a process (all its threads) in seconds, and with reaped_children the
    cutime + cstime of the children it has waited for; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state) of proc(5)
    return sum(int(f) for f in fields[11:15 if reaped_children else 13]) / CLK_TCK


def cluster_cpu(cluster: TempCluster) -> float:
    """CPU seconds of the whole PostgreSQL server: the postmaster, the processes it runs now and
    those it has reaped (the backends of connections closed meanwhile, a --once worker's)."""
    postmaster = cluster.postmaster_pid()
    running = sum(process_cpu(pid) or 0.0 for pid in children(postmaster))
    return running + (process_cpu(postmaster, reaped_children=True) or 0.0)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def proc_status_kb(pid: int, field: str) -> int | None:
    """VmHWM (peak resident set) or VmRSS of a process, in kB; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank, as wrk reports its percentiles."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def latency_summary(values_ms: list[float]) -> dict:
    return {
        "n": len(values_ms),
        "p50_ms": rounded(percentile(values_ms, 50)),
        "p99_ms": rounded(percentile(values_ms, 99)),
        "max_ms": rounded(max(values_ms) if values_ms else None),
    }


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def wrk_figures(wrk: dict) -> dict:
    seconds = wrk["duration_us"] / 1e6
    return {
        "requests": wrk["requests"],
        "seconds": round(seconds, 3),
        "requests_per_second": round(wrk["requests"] / seconds, 1) if seconds else 0.0,
        "p50_ms": wrk["p50_us"] / 1000,
        "p99_ms": wrk["p99_us"] / 1000,
        "max_ms": wrk["max_us"] / 1000,
        "errors": sum(v for k, v in wrk.items() if k.startswith("errors_")),
        "wrk": wrk,
    }


# ---------------------------------------------------------------------------------------------
# The run's processes


class Run:
    """What the sections share: the cluster, the processes, the token, the memory readings."""

    def __init__(self, args, work_dir: Path):
        self.args = args
        self.work_dir = work_dir
        self.processes = Processes(work_dir)
        self.cluster_processes = Processes(work_dir)  # stopped last, after every client of it
        self.cluster: BenchCluster | None = None
        self.token = secrets.token_urlsafe(32)
        self.auth = ["-H", f"Authorization: Bearer {self.token}"]
        self.memory: list[dict] = []  # one per service process: its peak RSS
        self.databases: list[str] = []
        self.conn: psycopg.Connection | None = None  # superuser, on the main database
        self.pgbench_scripts: dict[str, str] = {}
        self.pgbench_statements: dict[str, list[str]] = {}
        self.section_seconds: dict[str, float] = {}  # wall time of each part of execute(), in order
        self.began = time.monotonic()  # main() sets it to its own start

    @contextlib.contextmanager
    def timed(self, name: str, heading: str | None = ""):
        """Times a part of the run under ``name``, after printing ``heading`` (the name when
        empty, nothing when None)."""
        if heading is not None:
            say(heading or name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.section_seconds[name] = round(time.monotonic() - t0, 1)

    def url(self, dbname: str, role: str | None = None) -> str:
        return psycopg.conninfo.make_conninfo(self.cluster.url, dbname=dbname, **({"user": role} if role else {}))

    def create_database(self, name: str, template: str | None = None) -> str:
        if template:
            with psycopg.connect(self.cluster.url, autocommit=True) as conn:
                conn.execute(sql.SQL(COPY_DATABASE).format(copy=sql.Identifier(name), template=sql.Identifier(template)))
        else:
            create_database(self.cluster.url, name)
            apply_schema(self.url(name))
        self.databases.append(name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        drop_database(self.cluster.url, name)
        self.databases.remove(name)

    def service_env(self, database_url: str, **values: str) -> dict[str, str]:
        """The caller's environment without any service setting, then the run's: a service runs
        with its defaults but for these."""
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS and k not in EXTRA_SERVICE_VARS}
        return {**env, "DATABASE_URL": database_url, "API_TOKENS": self.token, **values}

    def start_api(self, name: str, dbname: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        env = self.service_env(self.url(dbname, ROLES["api"]), APPOINTMENTS_PORT=str(port))
        process = self.processes.start(name, [sys.executable, "appointments.py"], env)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/ready", process)
        return process, base

    def start_worker(self, name: str, dbname: str, *args: str, **settings: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        env = self.service_env(self.url(dbname, ROLES["worker"]), BILLING_PORT=str(port), **settings)
        return self.processes.start(name, [sys.executable, "billing_worker.py", *args], env), port

    def retire(self, name: str, kind: str, process: subprocess.Popen) -> None:
        """Stops a service, its peak RSS read first (the kernel forgets it with the process)."""
        peak = proc_status_kb(process.pid, "VmHWM")
        self.processes.stop(process)
        self.memory.append({"process": name, "kind": kind, "peak_rss_kb": peak})

    def reap(self, process: subprocess.Popen, timeout: float) -> tuple[float, int | None, float]:
        """Waits for a short-lived process: (its exit's time.monotonic() within 2 ms, its peak RSS
        in kB as last read, its CPU seconds from wait4). VmHWM is read every 2 ms while it runs:
        wait4's ru_maxrss would be simpler, but Linux counts in it the pages of the parent that
        forked the child. Popen gets the exit code."""
        deadline = time.monotonic() + timeout
        peak = None
        while True:
            peak = proc_status_kb(process.pid, "VmHWM") or peak
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                return time.monotonic(), peak, usage.ru_utime + usage.ru_stime
            if time.monotonic() > deadline:
                raise BenchError(f"{process.args[-1]} did not exit within {timeout} s:\n{tail(process.log_path)}")
            time.sleep(0.002)

    # wrk runs that end when bench.py says so: a quota reached (markers) or a SIGINT.

    def wrk_start(self, name: str, script: Path, url: str, connections: int, args: list[str]) -> subprocess.Popen:
        argv = ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", "-d3600s", "--timeout", "10s", "-s", str(script),
                url, *self.auth, "--", *args]
        return self.processes.start(name, argv, dict(os.environ), stdout_path=self.work_dir / f"{name}.out")

    def wrk_stop(self, process: subprocess.Popen, markers: str | None = None, timeout: float = 600, must_finish: bool = True) -> dict:
        """Once every thread has left its marker (bench_lib.lua's bench.finish), or at once
        without markers: SIGINT, which wrk takes as the end of its run; its result line. A run
        whose threads are not done after `timeout` fails, or is stopped there (must_finish=False:
        what it did not get is counted by the caller)."""
        deadline = time.monotonic() + timeout
        while markers and process.poll() is None:
            if all(Path(f"{markers}.done.{k}").exists() for k in range(WRK_THREADS)):
                break
            if time.monotonic() > deadline:
                if not must_finish:
                    break
                raise BenchError(f"wrk did not finish its quota within {timeout} s:\n{tail(process.log_path)}")
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        finally:
            self.processes.stop(process)
        text = process.log_path.read_text(errors="replace")
        found = re.search(r"^RESULT (\{.*\})$", text, re.M)
        if process.returncode != 0 or not found:
            raise BenchError(f"wrk failed ({process.returncode}): {text}")
        return json.loads(found.group(1))


# ---------------------------------------------------------------------------------------------
# 1 and 2: the framework ceiling, the API, pgbench


def http_cell(run: Run, script: Path, url: str, connections: int, warm_args: list[str] = (), args: list[str] = (),
              meter=None) -> dict:
    """A warm-up, then the measured wrk run (support.run_wrk: -t2, --timeout 10s). ``meter``, when
    given, returns CPU seconds by part ({name: seconds}); what each part spent in the measured run
    goes into the cell's cpu_seconds."""
    if run.args.warmup:
        run_wrk(url, connections, run.args.warmup, script, WRK_THREADS, [*run.auth, "--", *warm_args])
    before = meter() if meter else {}
    wrk = run_wrk(url, connections, run.args.seconds, script, WRK_THREADS, [*run.auth, "--", *args])
    cell = {"connections": connections, **wrk_figures(wrk)}
    if meter:
        cell["cpu_seconds"] = {part: round(seconds - before[part], 3) for part, seconds in meter().items()}
    return cell


def end_cell(run: Run, api: str, connections: int, expected_rps: float, meter=None, conn: psycopg.Connection | None = None) -> dict:
    """Ends of appointments started in SQL (on `conn`, the API's database: run.conn's by default),
    each once: files longer than the run can use."""
    conn, work_dir = conn or run.conn, run.work_dir
    warm_ids, ids = work_dir / "warm-ids.txt", work_dir / "ids.txt"
    per_second = max(1000.0, 1.5 * expected_rps)
    write_open_appointments(conn, math.ceil(per_second * run.args.warmup) + 100, warm_ids)
    n = math.ceil(per_second * run.args.seconds) + 100
    write_open_appointments(conn, n, ids)
    queued_before = conn.execute("SELECT count(*) FROM billing_queue").fetchone()[0]
    cell = http_cell(run, END_LUA, api, connections, [str(warm_ids), str(WRK_THREADS)], [str(ids), str(WRK_THREADS)], meter)
    # Every end queues one charge: a check that the ends happened (the warm-up's included).
    cell["charges_queued_with_warmup"] = conn.execute("SELECT count(*) FROM billing_queue").fetchone()[0] - queued_before
    cell["repeats"] = max(0, cell["wrk"]["ids_used"] - n)
    return cell


def pgbench_cell(run: Run, kind: str, clients: int, number: int, expected_tps: float) -> dict:
    """pgbench -M prepared, as clinic_api, `clients` clients for --seconds (whole seconds: -T),
    every transaction logged (-l) for its latency percentiles."""
    conn, work_dir = run.conn, run.work_dir
    seconds = max(1, math.ceil(run.args.seconds))
    per_client = 0
    if kind == "end":  # open appointments enough for the fastest client, each ended once
        per_client = math.ceil(1.5 * max(expected_tps, 1000) * seconds / clients) + 100
        conn.execute(MAKE_PGBENCH_OPEN, {"run": number, "clients": clients, "per_client": per_client})
    script = work_dir / f"pgbench-{kind}.sql"
    script.write_text(run.pgbench_scripts[kind])
    prefix = work_dir / f"pgbench-{number}"
    argv = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(WRK_THREADS, clients)), "-T", str(seconds),
            "-D", f"run={number}", "-D", "i=0", "-l", f"--log-prefix={prefix}", "-f", str(script), run.url("bench", ROLES["api"])]
    out = work_dir / "pgbench.out"
    process = run.processes.start("pgbench", argv, dict(os.environ), stdout_path=out)
    try:
        process.wait(timeout=seconds + 60)
    finally:
        run.processes.stop(process)
    text = out.read_text(errors="replace")
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", text)
    if process.returncode != 0 or not tps:
        raise BenchError(f"pgbench {kind} failed ({process.returncode}): {text}")
    failed = re.search(r"number of failed transactions: (\d+)", text)
    latencies = []
    for log in work_dir.glob(f"{prefix.name}.*"):
        latencies += [int(line.split()[2]) / 1000 for line in log.read_text().splitlines() if line.strip()]
        log.unlink()
    if kind == "end":
        left = conn.execute(
            "SELECT count(*) FROM appointments WHERE id = md5('pgbench-' || %s || '-0-' || %s)::uuid AND end_date IS NULL",
            [number, per_client],
        ).fetchone()[0]
        if not left:
            raise BenchError(f"pgbench end at {clients} clients: client 0 ran out of open appointments")
    return {
        "clients": clients,
        "seconds": seconds,
        "transactions": len(latencies),
        "transactions_per_second": float(tps.group(1)),
        **latency_summary(latencies),
        "errors": int(failed.group(1)) if failed else 0,
    }


def api_sections(run: Run, report: dict, api: str, ceiling: str, floor: str) -> None:
    framework, floors, starts, ends, pg_starts, pg_ends = [], [], [], [], [], []
    number = 0
    for connections in run.args.connections:
        fw = http_cell(run, START_LUA, ceiling + "/appointments", connections)
        framework.append(fw)
        say(f"  c={connections} framework ceiling: {fw['requests_per_second']:,.0f} req/s, p99 {fw['p99_ms']:.1f} ms")
        fl = http_cell(run, START_LUA, floor + "/appointments", connections)
        floors.append(fl)
        say(f"  c={connections} design floor (the ceiling app + INSERT_APPOINTMENT through the pool): {fl['requests_per_second']:,.0f} req/s, p99 {fl['p99_ms']:.1f} ms")
        start = http_cell(run, START_LUA, api + "/appointments", connections)
        starts.append(start)
        say(f"  c={connections} POST /appointments: {start['requests_per_second']:,.0f} req/s, p99 {start['p99_ms']:.1f} ms")
        end = end_cell(run, api, connections, fw["requests_per_second"])
        ends.append(end)
        say(f"  c={connections} POST /appointments/{{id}}/end: {end['requests_per_second']:,.0f} req/s, p99 {end['p99_ms']:.1f} ms")
        number += 1
        pg_start = pgbench_cell(run, "start", connections, number, 0)
        pg_starts.append(pg_start)
        pg_end = pgbench_cell(run, "end", connections, number, pg_start["transactions_per_second"])
        pg_ends.append(pg_end)
        say(f"  c={connections} pgbench: start {pg_start['transactions_per_second']:,.0f} tx/s, end {pg_end['transactions_per_second']:,.0f} tx/s")
    report["sections"]["1_framework_ceiling"] = {"app": "bench/ceiling_app.py", "cells": framework}
    report["sections"]["2_api"] = {
        "design_floor": {
            "app": "bench/ceiling_app.py --with-insert",
            "what": "the framework ceiling's app whose POST also runs appointments.INSERT_APPOINTMENT (a uuid4 made by the app, the "
                    "body's two ids) through db.make_pool as clinic_api and answers the row's id: one round trip to PostgreSQL "
                    "through psycopg, no validation, middleware, logging or access control",
            "cells": floors,
        },
        "start": starts, "end": ends, "pgbench_start": pg_starts, "pgbench_end": pg_ends,
        "pgbench_scripts": run.pgbench_scripts, "pgbench_statements": run.pgbench_statements,
    }


# ---------------------------------------------------------------------------------------------
# 4: end to charge


class LedgerWatch(threading.Thread):
    """When each billing entry became visible to another session.

    A connection LISTENs on the ledger's channel (schema.sql NOTIFYs it when a statement's
    entries commit) and, on each notification and every 50 ms anyway, reads the entries whose
    txid is at or above the xmin of its previous read's snapshot: every transaction below that
    had ended by then, so its entries were there to be read already. (An outstanding-ids list
    instead would cost a probe per id per wake, thousands at 500 ends/s.) Each new entry is
    stamped with the time.monotonic() at which its read returned: no earlier than it was visible,
    and at most a round trip later."""

    def __init__(self, url: str):
        super().__init__(name="ledger-watch", daemon=True)
        self._url = url
        self._halt = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self._url, autocommit=True, application_name="bench-ledger-watch") as conn:
                conn.execute(f"LISTEN {LEDGER_CHANNEL}")
                horizon = conn.execute(SNAPSHOT_XMIN).fetchone()[0]
                self._ready.set()
                while not self._halt.is_set():
                    for _ in conn.notifies(timeout=0.05, stop_after=1):
                        pass
                    for _ in conn.notifies(timeout=0):  # what came meanwhile: this read covers it
                        pass
                    xmin, ids = conn.execute(NEW_ENTRIES, {"horizon": horizon}).fetchone()
                    now = time.monotonic()
                    with self._lock:
                        for appointment_id in ids:
                            self._seen.setdefault(appointment_id, now)
                    horizon = xmin
        except BaseException as exc:  # noqa: BLE001 - reported by wait_for
            self.error = exc
            self._ready.set()

    def started(self) -> LedgerWatch:
        self.start()
        self._ready.wait(10)
        return self

    def wait_for(self, ids: list[str], timeout: float) -> dict[str, float]:
        """The stamps of these ids, once all are seen or after timeout (the missing ones left out)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.error is not None:
                raise BenchError(f"the ledger watch failed: {self.error!r}")
            with self._lock:
                missing = [i for i in ids if i not in self._seen]
                if not missing or time.monotonic() > deadline:
                    return {i: self._seen[i] for i in ids if i in self._seen}
            time.sleep(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def paced_ends(run: Run, api: str, rate: int, seconds: float, tag: str) -> dict:
    """Sends rate x seconds ends at a steady rate (bench_paced_end.lua); what was sent and answered."""
    n = max(WRK_THREADS, round(rate * seconds))
    ids = run.work_dir / f"paced-{tag}-{rate}-ids.txt"
    write_open_appointments(run.conn, n, ids)
    records = run.work_dir / f"paced-{tag}-{rate}.txt"
    process = run.wrk_start(f"paced-{tag}-{rate}", PACED_END_LUA, api, PACED_CONNECTIONS, [str(ids), str(WRK_THREADS), str(rate), str(records)])
    # An answer that never comes (wrk's --timeout is 10 s) must not hold the run: stopped 15 s
    # after the schedule's end, what is missing counts as errors.
    wrk = run.wrk_stop(process, markers=str(records), timeout=seconds + 15, must_finish=False)
    sent, answered = {}, {}
    for line in records.read_text().splitlines():
        kind, appointment_id, t, rest = line.split(" ", 3)
        if kind == "E":
            sent[appointment_id] = (float(t), float(rest))
        else:
            answered[appointment_id] = (float(t), int(rest))
    times = sorted(s for _, s in sent.values())
    slip_ms = [(s - scheduled) * 1000 for scheduled, s in sent.values()]
    return {
        "rate": rate, "tag": tag, "ends": n, "sent": len(sent),
        "sent_per_second": round((len(times) - 1) / (times[-1] - times[0]), 1) if len(times) > 1 else None,
        "schedule_slip_p99_ms": rounded(percentile(slip_ms, 99)),
        "schedule_slip_max_ms": rounded(max(slip_ms) if slip_ms else None),
        "answered": len(answered),
        "errors": sum(1 for _, status in answered.values() if not 200 <= status < 300) + len(sent) - len(answered),
        "http": latency_summary([(answered[i][0] - sent[i][1]) * 1000 for i in sent if i in answered]),
        "wrk": wrk,
        "_answered": answered,
    }


def charge_latency(watch: LedgerWatch, cell: dict, timeout: float) -> dict:
    """From each successful end's answer to its entry seen by the watch."""
    answered = cell.pop("_answered")
    ended = [i for i, (_, status) in answered.items() if 200 <= status < 300]
    seen = watch.wait_for(ended, timeout)
    latencies = [(seen[i] - answered[i][0]) * 1000 for i in ended if i in seen]
    cell["end_to_charge"] = {**latency_summary(latencies), "not_seen": len(ended) - len(seen)}
    return cell


def listening_workers(run: Run) -> int:
    channel = getattr(billing_worker, "CHANNEL", "billing_queue")
    return run.conn.execute(LISTENING, {"role": ROLES["worker"], "pattern": rf'^\s*LISTEN\s+"?{channel}"?\s*;?\s*$'}).fetchone()[0]


def wait_drained(conn: psycopg.Connection, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while conn.execute(ANY_PENDING).fetchone()[0]:
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: charges still pending after {timeout} s")
        time.sleep(interval)


def end_to_charge(run: Run, report: dict, api: str) -> None:
    args = run.args
    watch = LedgerWatch(run.url("bench")).started()
    cells = []
    try:
        # With NOTIFY: the worker with its defaults. It first bills what section 2 left pending.
        worker, port = run.start_worker("worker-notify", "bench")
        wait_http(f"http://127.0.0.1:{port}/ready", worker)
        wait_drained(run.conn, 120, "the worker's first pass")
        run.conn.execute(VACUUM_MAIN)
        for rate in args.e2c_rates:
            say(f"  with NOTIFY: {rate} ends/s for {args.e2c_seconds} s")
            cell = charge_latency(watch, paced_ends(run, api, rate, args.e2c_seconds, "notify"), timeout=30)
            cells.append(cell)
            say(f"    p99 {cell['end_to_charge']['p99_ms']} ms (sent {cell['sent_per_second']}/s, slip p99 {cell['schedule_slip_p99_ms']} ms)")
        run.retire("worker-notify", "worker", worker)

        # The ceiling: the worker's own statement run by a bare LISTEN loop.
        env = run.service_env(run.url("bench", ROLES["worker"]))
        bare = run.processes.start("bare-worker", [sys.executable, str(Path(__file__).resolve()), "--bare-worker", run.url("bench", ROLES["worker"])], env)
        run.conn.execute(VACUUM_MAIN)
        deadline = time.monotonic() + 30
        while not listening_workers(run):
            if bare.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the bare worker did not LISTEN:\n{tail(bare.log_path)}")
            time.sleep(0.05)
        for rate in args.e2c_rates:
            say(f"  ceiling (a bare LISTEN loop running CLAIM_AND_BILL): {rate} ends/s for {args.e2c_ceiling_seconds} s")
            cell = charge_latency(watch, paced_ends(run, api, rate, args.e2c_ceiling_seconds, "ceiling"), timeout=30)
            cells.append(cell)
            say(f"    p99 {cell['end_to_charge']['p99_ms']} ms")
        run.processes.stop(bare)

        # Polling only: BILLING_LISTEN=off. Both rates back to back, then one wait for the polls.
        polling = {"BILLING_LISTEN": "off"}
        if args.poll_seconds is not None:
            polling["BILLING_POLL_SECONDS"] = str(args.poll_seconds)
        poll_seconds = args.poll_seconds or config.Config.poll_seconds
        worker, port = run.start_worker("worker-polling", "bench", **polling)
        wait_http(f"http://127.0.0.1:{port}/ready", worker)
        time.sleep(0.5)  # its LISTEN, if it still makes one, is in place by now
        listeners = listening_workers(run)
        run.conn.execute(VACUUM_MAIN)
        sent = []
        for rate in args.e2c_rates:
            say(f"  polling only (BILLING_LISTEN=off, every {poll_seconds} s): {rate} ends/s for {args.e2c_seconds} s")
            sent.append(paced_ends(run, api, rate, args.e2c_seconds, "polling"))
        for cell in sent:
            cells.append(charge_latency(watch, cell, timeout=poll_seconds + 10))
            say(f"    {cell['rate']}/s: p99 {cell['end_to_charge']['p99_ms']} ms")
        run.retire("worker-polling", "worker", worker)
    finally:
        watch.stop()
    p50s = [c["end_to_charge"]["p50_ms"] for c in cells if c["tag"] == "polling" and c["end_to_charge"]["p50_ms"] is not None]
    # With polling only, half the ends wait more than a fifth of the interval: anything far
    # quicker means the worker was woken some other way.
    quick = bool(p50s) and max(p50s) < poll_seconds * 1000 / 5
    report["sections"]["4_end_to_charge"] = {
        "cells": cells,
        "poll_seconds": poll_seconds,
        "listen_off_honoured": listeners == 0 and not quick,
        "listening_sessions_with_listen_off": listeners,
        "paced_connections": PACED_CONNECTIONS,
        "before_each_mode": VACUUM_MAIN + " (see VACUUM_MAIN in bench/bench.py)",
        "client": "wrk with bench_paced_end.lua: a fixed schedule per thread, each slot given to a free connection (open loop while one is free; the slip is recorded)",
    }


def bare_worker(url: str) -> int:
    """The end-to-charge ceiling: LISTEN, and on each wake the worker's own CLAIM_AND_BILL until a
    batch comes back short, each run on its own (autocommit: one statement, one transaction, one
    round trip). No pool (so no check query), no logs, no metrics, one connection."""
    claim = module_sql(billing_worker, "CLAIM_AND_BILL")
    channel = getattr(billing_worker, "CHANNEL", "billing_queue")
    batch_size = config.Config.batch_size
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with psycopg.connect(url, autocommit=True, application_name="bench-bare-worker") as conn:
        conn.execute(f"LISTEN {channel}")
        while True:
            if not any(True for _ in conn.notifies(timeout=1, stop_after=1)):
                continue
            for _ in conn.notifies(timeout=0):  # one pass serves every notification queued
                pass
            while len(conn.execute(claim, {"batch_size": batch_size}).fetchall()) == batch_size:
                pass


# ---------------------------------------------------------------------------------------------
# 6 (first part): the soak, which makes the backlog of sections 3 and 5


def soak_phases(backlog: int, baseline: int, total: int) -> list[tuple[str, int, int, str]]:
    """The soak's wrk runs: (name, requests, ends among them, mix). The backlog's ends take
    SOAK_ENDS_SHARE of the requests until they are all sent (the "ends" mix), spread alike over
    the baseline and the rest of that span; what is left of the total is the "fast" mix. Empty
    runs are left out."""
    span = min(total, math.ceil(backlog / SOAK_ENDS_SHARE))
    first = min(baseline, span)
    first_ends = round(backlog * first / span)
    phases = [("baseline", first, first_ends, "ends"), ("ends", span - first, backlog - first_ends, "ends")]
    if baseline > span:  # a baseline past the ends' span: its remainder in the fast mix
        phases.insert(1, ("baseline", baseline - span, 0, "fast"))
    phases.append(("fast", total - max(span, baseline), 0, "fast"))
    return [phase for phase in phases if phase[1] > 0]


def soak(run: Run, report: dict) -> int:
    """On a fresh API process over the empty backlog database: --soak-requests requests in the
    wrk runs of soak_phases(), the API's RSS read after each (the first after --soak-baseline).
    The ends mix ends every appointment of the backlog once, so the database is left with
    --backlog pending charges; then the fast mix (bench_soak.lua) makes up the count."""
    args, conn_url = run.args, run.url("backlog")
    with psycopg.connect(conn_url, autocommit=True) as conn:
        all_ids = run.work_dir / "backlog-ids.txt"
        write_open_appointments(conn, args.backlog, all_ids)
    ids = all_ids.read_text().splitlines()
    api, base = run.start_api("api-soak", "backlog")
    readings, ends_sent = [], 0
    watch = psycopg.connect(conn_url, autocommit=True)
    fixed, per_100k = RESERVE_AFTER_SOAK_SECONDS
    backups_fixed, backups_per_100k = RESERVE_BACKUPS_SECONDS
    reserve = fixed + per_100k * args.backlog / 100_000 + backups_fixed + backups_per_100k * args.backup_appointments / 100_000
    fast_deadline = run.began + args.budget_seconds - reserve if args.budget_seconds else math.inf
    cut = False
    for k, (name, requests, ends, mix) in enumerate(soak_phases(args.backlog, args.soak_baseline, args.soak_requests)):
        # Only the fast part gives way to the budget: the baseline and the backlog's ends are needed whole.
        limited = name == "fast" and fast_deadline < math.inf
        if limited and fast_deadline - time.monotonic() < 1:
            cut = True
            say(f"  soak: the fast part ({requests:,} requests) left out: the run would end past --budget-seconds {args.budget_seconds}")
            break
        if mix == "ends":
            path = run.work_dir / f"soak-{k}-ids.txt"
            path.write_text("".join(f"{i}\n" for i in ids[ends_sent:ends_sent + ends]))
        else:
            path = all_ids  # read, not ended
        say(f"  soak: {requests:,} requests, {mix} mix ({ends:,} of them ends)")
        markers = str(run.work_dir / f"soak-{k}")
        t0 = time.monotonic()
        process = run.wrk_start(f"soak-{k}-{name}", SOAK_LUA, base, SOAK_CONNECTIONS, [str(path), str(WRK_THREADS), str(requests), markers, mix])
        if limited:
            wrk = run.wrk_stop(process, markers=markers, timeout=fast_deadline - time.monotonic(), must_finish=False)
            cut = wrk["sent"] < requests
        else:
            wrk = run.wrk_stop(process, markers=markers, timeout=max(600, requests / 100))
        seconds = time.monotonic() - t0
        # wrk stops with its last requests still queued in the API (waitress cancels queued
        # requests when it is stopped): wait until each end sent has queued its charge (an end
        # that failed shows as fewer pending charges, after a while).
        ends_sent += wrk["ends"]
        deadline = time.monotonic() + 15
        while watch.execute(PENDING).fetchone()[0] < ends_sent and time.monotonic() < deadline:
            time.sleep(0.05)
        readings.append({
            "phase": name, "mix": mix, "requests": wrk["sent"], "ends": wrk["ends"], "seconds": round(seconds, 1),
            "requests_per_second": round(wrk["sent"] / seconds, 1), "errors": wrk_figures(wrk)["errors"],
            "rss_kb_after": proc_status_kb(api.pid, "VmRSS"), "wrk": wrk,
        })
        readings[-1]["requests_so_far"] = sum(r["requests"] for r in readings)
        say(f"    {seconds:.0f} s ({readings[-1]['requests_per_second']:,.0f} req/s), RSS {readings[-1]['rss_kb_after'] / 1024:.1f} MB "
            f"after {readings[-1]['requests_so_far']:,} requests" + (" (stopped: --budget-seconds)" if cut else ""))
    run.retire("api-soak", "api", api)
    watch.close()
    with psycopg.connect(conn_url, autocommit=True) as conn:
        pending = conn.execute(PENDING).fetchone()[0]
        # Every copy then starts from the same visibility map and statistics, and no autovacuum
        # of these tables falls into a measurement.
        conn.execute("VACUUM (ANALYZE) appointments, billing_queue, billing_entries")
    baseline_reading = next(r for r in readings if r["requests_so_far"] >= min(args.soak_baseline, args.soak_requests))
    report["sections"]["6_memory"] = {
        "soak": {"phases": readings, "total_requests": sum(r["requests"] for r in readings), "connections": SOAK_CONNECTIONS,
                 "requests_asked": args.soak_requests,
                 "stopped_by_budget": cut,
                 "budget": {"budget_seconds": args.budget_seconds, "reserve_after_soak_seconds": round(reserve, 1),
                            "fast_part_deadline_s": None if fast_deadline == math.inf else round(fast_deadline - run.began, 1)},
                 "baseline_requests": baseline_reading["requests_so_far"],
                 "baseline_rss_kb": baseline_reading["rss_kb_after"],
                 "errors": sum(r["errors"] for r in readings),
                 "mix": {
                     "ends": f"until the backlog's ends are all sent (the first {math.ceil(args.backlog / SOAK_ENDS_SHARE):,} requests at most): "
                             f"{SOAK_ENDS_SHARE:.0%} of the requests are the backlog's ends, spread evenly; the rest GET /appointments/{{id}} "
                             "and POST /appointments, 3:1",
                     "fast": "then: 1 in 20 POST /appointments; of the rest, 1 in 3 GET /appointments/{id}, 2 in 3 GET /health",
                 },
                 "backlog_pending_after": pending},
    }
    if pending != args.backlog:
        raise BenchError(f"the soak left {pending} pending charges, not {args.backlog}: some ends failed (see {run.work_dir / 'api-soak.log'})")
    return pending


# ---------------------------------------------------------------------------------------------
# 3: drain


def ledger_check(url: str, charges: int) -> dict:
    with psycopg.connect(url, autocommit=True) as conn:
        found = ledger_counts(conn)
    ok = (found["entries"] == found["ended"] and found["pending"] == 0 and found["failed"] == 0
          and found["not_billed_once"] == 0 and found["status_mismatch"] == 0 and found["wrong_total"] == 0)
    return {"charges": charges, **found, "billed_once": found["ended"] - found["not_billed_once"], "ok": ok}


def once_workers(run: Run, dbname: str, count: int, tag: str) -> dict:
    """`count` `billing_worker.py --once` started together; wall time until the last exits, and
    the CPU they and the PostgreSQL server spent meanwhile."""
    t0, server_cpu = time.monotonic(), cluster_cpu(run.cluster)
    started = [run.start_worker(f"once-{tag}-{k + 1}", dbname, "--once")[0] for k in range(count)]
    exits, summaries, batches, cpu = [], [], [], 0.0
    for k, process in enumerate(started):
        ended, peak, process_cpu_seconds = run.reap(process, timeout=600)
        run.processes.stop(process)
        run.memory.append({"process": f"once-{tag}-{k + 1}", "kind": "worker", "peak_rss_kb": peak})
        exits.append(ended)
        cpu += process_cpu_seconds
        text = process.log_path.read_text(errors="replace")
        if process.returncode != 0:
            raise BenchError(f"billing_worker.py --once exited with {process.returncode}:\n{text[-3000:]}")
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "billed" in record and "event" not in record:
                summaries.append(record)
            elif isinstance(record, dict) and record.get("event") == "batch" and record.get("rows"):
                batches.append(record)
    return {"wall_seconds": max(exits) - t0, "billed": sum(s["billed"] for s in summaries), "summaries": summaries,
            "log_drain_seconds": batch_span(batches), "cpu_seconds": {"workers": round(cpu, 3),
                                                                       "postgresql": round(cluster_cpu(run.cluster) - server_cpu, 3)}}


def batch_span(batches: list[dict]) -> float | None:
    """From the first batch's start to the last batch's end, by the workers' own log lines (ts is
    written when a batch has finished, duration_ms is its length); None when they say otherwise."""
    try:
        ends = [dt.datetime.fromisoformat(b["ts"]).timestamp() for b in batches]
        starts = [e - b["duration_ms"] / 1000 for e, b in zip(ends, batches)]
        return round(max(ends) - min(starts), 3) if batches else None
    except (KeyError, TypeError, ValueError):
        return None


def drains(run: Run, report: dict, charges: int) -> None:
    startup, cells = {}, {}
    for workers in DRAIN_WORKERS:
        # Two processes starting together take longer than one (2 cores, both importing): each
        # drain is net of the start-up of as many processes, measured alike; so is its CPU.
        runs = [once_workers(run, "bench", workers, f"empty{workers}-{k + 1}") for k in range(STARTUP_RUNS)]
        startup[workers] = {
            "median_seconds": round(statistics.median(r["wall_seconds"] for r in runs), 3),
            "runs_seconds": [round(r["wall_seconds"], 3) for r in runs],
            "median_cpu_seconds": {part: round(statistics.median(r["cpu_seconds"][part] for r in runs), 3) for part in ("workers", "postgresql")},
        }
        say(f"  start-up of {workers} x --once on an empty queue: {startup[workers]['median_seconds']:.2f} s (median of {STARTUP_RUNS})")
    for workers in DRAIN_WORKERS:
        name = f"drain_{workers}"
        url = run.create_database(name, template="backlog")
        say(f"  {charges:,} charges, {workers} x billing_worker.py --once")
        once = once_workers(run, name, workers, str(workers))
        net = once["wall_seconds"] - startup[workers]["median_seconds"]
        by_log = round(charges / once["log_drain_seconds"], 1) if once["log_drain_seconds"] else None
        # A drain of under a second (a smoke run's 2,000 charges) is within the start-up's own
        # spread (about 0.1 s), even below zero net: the workers' batch log lines say how long
        # it took instead.
        if net >= MIN_NET_DRAIN_SECONDS or by_log is None:
            rate, method = (round(charges / net, 1) if net > 0 else None), "wall time net of start-up"
        else:
            rate, method = by_log, "batch log lines"
        net_cpu = {part: once["cpu_seconds"][part] - startup[workers]["median_cpu_seconds"][part] for part in ("workers", "postgresql")}
        cells[workers] = {
            "workers": workers, "charges": charges, **once, "net_seconds": round(net, 3),
            "charges_per_second": rate, "charges_per_second_method": method, "charges_per_second_by_log": by_log,
            "cpu_us_per_charge": {part: round(1e6 * seconds / charges, 1) for part, seconds in net_cpu.items()},
            "ledger": ledger_check(url, charges),
        }
        say(f"    {once['wall_seconds']:.2f} s in all, {fmt(rate)} charges/s by {method} ({fmt(by_log)} by the batch log lines); "
            f"CPU per charge, net of start-up: workers {cells[workers]['cpu_us_per_charge']['workers']} µs, "
            f"PostgreSQL {cells[workers]['cpu_us_per_charge']['postgresql']} µs")
        run.drop_database(name)
    url = run.create_database("drain_sql", template="backlog")
    say(f"  ceiling: plain SQL on {charges:,} charges in one transaction")
    with psycopg.connect(run.url("drain_sql", ROLES["worker"]), autocommit=True) as conn:
        t0, server_cpu = time.monotonic(), cluster_cpu(run.cluster)
        with conn.transaction():
            for statement in DRAIN_SQL:
                conn.execute(statement)
        seconds, server_cpu = time.monotonic() - t0, cluster_cpu(run.cluster) - server_cpu
    sql_cell = {"charges": charges, "seconds": round(seconds, 3), "charges_per_second": round(charges / seconds, 1),
                "cpu_us_per_charge": {"postgresql": round(1e6 * server_cpu / charges, 1)},
                "statements": [" ".join(s.split()) for s in DRAIN_SQL], "ledger": ledger_check(url, charges)}
    say(f"    {seconds:.2f} s, {sql_cell['charges_per_second']:,.0f} charges/s")
    run.drop_database("drain_sql")
    report["sections"]["3_drain"] = {
        "backlog": charges, "startup": startup,
        "one_worker": cells[1], "two_workers": cells[2], "four_workers": cells[4],
        "two_workers_how": "two (four) `billing_worker.py --once` processes started together",
        "cpu_how": "workers: their own CPU (wait4), PostgreSQL: the whole server's (its processes and those it reaped); "
                   "each net of the median of the start-up runs",
        "sql_ceiling": sql_cell,
    }


# ---------------------------------------------------------------------------------------------
# 5: interference


def interference(run: Run, report: dict, charges: int) -> None:
    """One wrk run of POST /appointments over a copy of the backlog: WARMUP, an idle window of
    --seconds, then a worker starts and drains; the latencies of each window from the records."""
    name = "interference"
    url = run.create_database(name, template="backlog")
    api, base = run.start_api("api-interference", name)
    records = run.work_dir / "interference.txt"
    process = run.wrk_start("interference", TIMED_START_LUA, base, INTERFERENCE_CONNECTIONS, [str(records)])
    t_start = time.monotonic()
    time.sleep(run.args.warmup + run.args.seconds)
    t_worker = time.monotonic()
    worker, _ = run.start_worker("worker-interference", name)
    with psycopg.connect(url, autocommit=True) as conn:
        wait_drained(conn, 600, "the interference drain", interval=0.2)  # lightly: it runs inside the measurement
        t_drained = time.monotonic()
        time.sleep(0.2)
        wrk = run.wrk_stop(process)
        run.retire("worker-interference", "worker", worker)
        first, last = conn.execute(DRAIN_SPAN).fetchone()
    run.retire("api-interference", "api", api)
    # The drain: from the first batch's transaction start (its entries' created_at, on the wall
    # clock, put on the records' monotonic clock) until the harness saw no charge pending (within
    # 0.2 s of the last batch's end).
    offset = time.time() - time.monotonic()
    drain_from, drain_to = first - offset, t_drained
    rows = [tuple(map(float, line.split())) for line in records.read_text().splitlines()]

    def window(since: float, until: float) -> dict:
        inside = [(sent, answered, status) for sent, answered, status in rows if since <= sent < until]
        return {
            "from_s": round(since - t_start, 3), "to_s": round(until - t_start, 3),
            **latency_summary([(answered - sent) * 1000 for sent, answered, _ in inside]),
            "requests_per_second": round(len(inside) / (until - since), 1) if until > since else None,
            "errors": sum(1 for *_, status in inside if not 200 <= status < 300),
        }

    idle, draining = window(t_start + run.args.warmup, t_worker), window(drain_from, drain_to)
    say(f"    idle p99 {idle['p99_ms']} ms, during the drain p99 {draining['p99_ms']} ms ({draining['n']} requests)")
    report["sections"]["5_interference"] = {
        "charges": charges, "connections": INTERFERENCE_CONNECTIONS, "idle": idle, "draining": draining,
        "drain_seconds": round(last - first, 3), "wrk": wrk, "ledger": ledger_check(url, charges),
    }
    run.drop_database(name)


# ---------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass
class Row:
    section: int
    figure: str
    value: float | None
    show: str
    ceiling_name: str | None = None
    ceiling: float | None = None
    ceiling_show: str = ""
    also_name: str | None = None  # a second ceiling (the database's, for section 2)
    also: float | None = None
    also_show: str = ""
    target: str = "-"
    ok: bool | None = None
    result: str | None = None  # instead of PASS / MISS (NO EFFECT)
    floor_name: str | None = None  # the design floor, for section 2's starts (not a target)
    floor: float | None = None
    floor_show: str = ""

    @staticmethod
    def _ratio(value, ceiling):
        return round(value / ceiling, 3) if value is not None and ceiling not in (None, 0) else None

    def as_dict(self) -> dict:
        return {
            "section": self.section, "figure": self.figure, "value": self.value,
            "ceiling": None if self.ceiling_name is None else {"name": self.ceiling_name, "value": self.ceiling},
            "ratio": self._ratio(self.value, self.ceiling),
            "design_floor": None if self.floor_name is None else {"name": self.floor_name, "value": self.floor},
            "design_floor_ratio": self._ratio(self.value, self.floor),
            "database_ceiling": None if self.also_name is None else {"name": self.also_name, "value": self.also},
            "database_ratio": self._ratio(self.value, self.also),
            "target": self.target, "result": self.verdict(),
        }

    def verdict(self) -> str:
        if self.result:
            return self.result
        return "-" if self.ok is None else ("PASS" if self.ok else "MISS")

    def cells(self) -> list[str]:
        ratio, also_ratio = self._ratio(self.value, self.ceiling), self._ratio(self.value, self.also)
        floor_ratio = self._ratio(self.value, self.floor)
        return [
            f"{self.section}. {self.figure}", self.show,
            f"{self.ceiling_name} {self.ceiling_show}" if self.ceiling_name else "(the ceiling)",
            f"{ratio:.2f}x" if ratio is not None else "-",
            f"{self.floor_show} ({floor_ratio:.2f}x)" if self.floor_name and floor_ratio is not None else "-",
            f"{self.also_name} {self.also_show} ({also_ratio:.2f}x)" if self.also_name and also_ratio is not None else "-",
            self.target, self.verdict(),
        ]


def lat(cell: dict) -> str:
    return f"{cell['p50_ms']:.1f}/{cell['p99_ms']:.1f}/{cell['max_ms']:.0f}"


def floor_of(value: float, show: str) -> dict:
    return {"floor_name": "design floor", "floor": value, "floor_show": show}


def table_rows(report: dict) -> list[Row]:
    s = report["sections"]
    rows: list[Row] = []
    for fw in s["1_framework_ceiling"]["cells"]:
        c = fw["connections"]
        rows.append(Row(1, f"framework JSON POST c={c} req/s", fw["requests_per_second"], f"{fw['requests_per_second']:,.0f}"))
        rows.append(Row(1, f"framework JSON POST c={c} p50/p99/max ms", fw["p99_ms"], lat(fw)))
    api = s["2_api"]
    floors = api["design_floor"]["cells"]
    for fl, fw in zip(floors, s["1_framework_ceiling"]["cells"]):
        c, rps = fl["connections"], fl["requests_per_second"]
        errors = f" ({fl['errors']:,} errors)" if fl["errors"] else ""
        rows.append(Row(2, f"design floor: JSON POST + INSERT c={c} req/s", rps, f"{rps:,.0f}{errors}", "framework", fw["requests_per_second"],
                        f"{fw['requests_per_second']:,.0f}"))
        rows.append(Row(2, f"design floor: JSON POST + INSERT c={c} p50/p99/max ms", fl["p99_ms"], lat(fl), "framework", fw["p99_ms"], lat(fw)))
    for kind, label, pg_kind, want in (("start", "POST /appointments", "pgbench_start", TARGET_START_VS_FRAMEWORK),
                                       ("end", "POST /appointments/{id}/end", "pgbench_end", TARGET_END_VS_FRAMEWORK)):
        for cell, fw, pg, fl in zip(api[kind], s["1_framework_ceiling"]["cells"], api[pg_kind], floors):
            c = cell["connections"]
            rps = cell["requests_per_second"]
            start = kind == "start"  # the design floor is the start's (one INSERT); an end has none
            rows.append(Row(2, f"{label} c={c} req/s", rps, f"{rps:,.0f}", "framework", fw["requests_per_second"], f"{fw['requests_per_second']:,.0f}",
                            "pgbench", pg["transactions_per_second"], f"{pg['transactions_per_second']:,.0f}",
                            f">= {want}x framework", rps >= want * fw["requests_per_second"],
                            **(floor_of(fl["requests_per_second"], f"{fl['requests_per_second']:,.0f}") if start else {})))
            at64 = c == 64
            rows.append(Row(2, f"{label} c={c} p50/p99/max ms", cell["p99_ms"], lat(cell), "framework", fw["p99_ms"], lat(fw),
                            "pgbench", pg["p99_ms"], f"{pg['p50_ms']:.1f}/{pg['p99_ms']:.1f}/{pg['max_ms']:.0f}",
                            f"max <= {TARGET_MAX_MS_AT_64} ms" if at64 else "-", cell["max_ms"] <= TARGET_MAX_MS_AT_64 if at64 else None,
                            **(floor_of(fl["p99_ms"], lat(fl)) if start else {})))
            rows.append(Row(2, f"{label} c={c} errors", cell["errors"], str(cell["errors"]), "framework", fw["errors"], str(fw["errors"]),
                            "pgbench", pg["errors"], str(pg["errors"]), "0" if at64 else "-", cell["errors"] == 0 if at64 else None))
    d = s["3_drain"]
    sql_rate = d["sql_ceiling"]["charges_per_second"]
    one, two = d["one_worker"], d["two_workers"]
    rows.append(Row(3, f"drain {d['backlog']:,}, 1 worker charges/s", one["charges_per_second"], fmt(one["charges_per_second"]),
                    "plain SQL", sql_rate, f"{sql_rate:,.0f}", target=f">= {TARGET_DRAIN_VS_SQL}x SQL",
                    ok=one["charges_per_second"] is not None and one["charges_per_second"] >= TARGET_DRAIN_VS_SQL * sql_rate))
    rows.append(Row(3, f"drain {d['backlog']:,}, 2 workers charges/s", two["charges_per_second"], fmt(two["charges_per_second"]),
                    "1 worker", one["charges_per_second"], fmt(one["charges_per_second"]), "plain SQL", sql_rate, f"{sql_rate:,.0f}",
                    f">= {TARGET_TWO_VS_ONE}x 1 worker",
                    None if None in (one["charges_per_second"], two["charges_per_second"]) else two["charges_per_second"] >= TARGET_TWO_VS_ONE * one["charges_per_second"]))
    four = d["four_workers"]
    rows.append(Row(3, f"drain {d['backlog']:,}, 4 workers charges/s", four["charges_per_second"], fmt(four["charges_per_second"]),
                    "2 workers", two["charges_per_second"], fmt(two["charges_per_second"]), "plain SQL", sql_rate, f"{sql_rate:,.0f}"))
    cpu = [cell["cpu_us_per_charge"] for cell in (one, two, four)]
    sql_cpu = d["sql_ceiling"]["cpu_us_per_charge"]["postgresql"]
    rows.append(Row(3, "CPU per charge µs, 1 / 2 / 4 workers: PostgreSQL (the workers')", cpu[0]["postgresql"],
                    " / ".join(f"{c['postgresql']:.0f}" for c in cpu) + " (" + " / ".join(f"{c['workers']:.1f}" for c in cpu) + ")",
                    "plain SQL", sql_cpu, f"{sql_cpu:.0f}"))
    for label, check in (("1 worker", one["ledger"]), ("2 workers", two["ledger"]), ("4 workers", four["ledger"]),
                         ("plain SQL", d["sql_ceiling"]["ledger"])):
        rows.append(Row(3, f"ledger after {label}: charges billed once", check["billed_once"], f"{check['billed_once']:,}",
                        "charges", check["charges"], f"{check['charges']:,}", target="all, once", ok=check["ok"]))
    e = s["4_end_to_charge"]
    ceilings = {c["rate"]: c for c in e["cells"] if c["tag"] == "ceiling"}
    poll_ms = e["poll_seconds"] * 1000
    for cell in e["cells"]:
        if cell["tag"] == "ceiling":
            continue
        lat_e = cell["end_to_charge"]
        rate = cell["rate"]
        figure = f"end->charge {cell['tag']} {rate}/s (sent {cell['sent_per_second'] or 0:.0f}/s) p50/p99/max ms"
        show = f"{lat_e['p50_ms']:.1f}/{lat_e['p99_ms']:.1f}/{lat_e['max_ms']:.0f}" if lat_e["n"] else "none seen"
        if cell["tag"] == "notify":
            ceiling = ceilings.get(rate, {}).get("end_to_charge", {})
            targeted = rate == TARGET_NOTIFY_RATE
            rows.append(Row(4, figure, lat_e["p99_ms"], show, "bare LISTEN loop", ceiling.get("p99_ms"),
                            f"{ceiling['p50_ms']:.1f}/{ceiling['p99_ms']:.1f}/{ceiling['max_ms']:.0f}" if ceiling.get("n") else "-",
                            target=f"p99 <= {TARGET_NOTIFY_P99_MS} ms" if targeted else "-",
                            ok=(lat_e["p99_ms"] is not None and lat_e["p99_ms"] <= TARGET_NOTIFY_P99_MS and not lat_e["not_seen"]) if targeted else None))
        else:
            rows.append(Row(4, figure, lat_e["p99_ms"], show, "poll interval", poll_ms, f"{poll_ms:.0f}",
                            target=f"p99 <= {poll_ms + TARGET_POLL_MARGIN_S * 1000:.0f} ms",
                            ok=lat_e["p99_ms"] is not None and lat_e["p99_ms"] <= poll_ms + TARGET_POLL_MARGIN_S * 1000 and not lat_e["not_seen"],
                            result=None if e["listen_off_honoured"] else "NO EFFECT"))
    f = s["5_interference"]
    idle, draining = f["idle"], f["draining"]
    rows.append(Row(5, f"POST /appointments c={f['connections']} p99 ms, {f['charges']:,} draining", draining["p99_ms"],
                    f"{draining['p99_ms']:.1f}" if draining["p99_ms"] is not None else "-", "idle p99", idle["p99_ms"], f"{idle['p99_ms']:.1f}",
                    target=f"<= {TARGET_INTERFERENCE}x idle",
                    ok=None if None in (draining["p99_ms"], idle["p99_ms"]) else draining["p99_ms"] <= TARGET_INTERFERENCE * idle["p99_ms"]))
    rows.append(Row(5, "ledger after the drain: charges billed once", f["ledger"]["billed_once"], f"{f['ledger']['billed_once']:,}",
                    "charges", f["ledger"]["charges"], f"{f['ledger']['charges']:,}", target="all, once", ok=f["ledger"]["ok"]))
    m = s["6_memory"]
    floor_mb = m["floor_peak_rss_mb"]
    for kind in ("api", "worker"):
        peak = m["peak_rss_mb"][kind]
        rows.append(Row(6, f"peak RSS {kind} MB (max of {m['processes'][kind]} processes)", peak, f"{peak:.1f}", "Falcon+waitress", floor_mb, f"{floor_mb:.1f}",
                        target=f"<= {TARGET_PEAK_RSS_MB} MB", ok=peak <= TARGET_PEAK_RSS_MB))
    soak_ = m["soak"]
    growth = m["rss_growth_mb"]
    rows.append(Row(6, f"API RSS growth MB, {soak_['baseline_requests']:,} -> {soak_['total_requests']:,} requests", growth,
                    f"{growth:+.1f}", "no growth", 0.0, "0.0", target=f"<= {TARGET_RSS_GROWTH_MB} MB", ok=growth <= TARGET_RSS_GROWTH_MB))
    o = s["7_overload"]
    for mode in ("edge", "direct"):
        cells = {c["connections"]: c for c in o["modes"][mode]["cells"]}
        base = cells[16]["goodput"]
        for c, cell in cells.items():
            want = TARGET_GOODPUT_VS_16.get(c) if mode == "edge" else None
            rows.append(Row(7, f"{mode} c={c} goodput 2xx/s (503/s {cell['shed_per_second']:,.0f})", cell["goodput"], f"{cell['goodput']:,.0f}",
                            f"{mode} c=16", base, f"{base:,.0f}", target=f">= {want}x c=16" if want else "-",
                            ok=cell["goodput"] >= want * base if want else None))
            bad = cell["not_2xx_or_503"] + cell["503_without_retry_after"] + cell["closed_connections"] + cell["socket_errors"]
            judged = mode == "edge"
            rows.append(Row(7, f"{mode} c={c} p50/p99/max ms; answers not 2xx or 503+Retry-After, closed, socket errors",
                            cell["p99_ms"], f"{cell['p50_ms']:.0f}/{cell['p99_ms']:.0f}/{cell['max_ms']:.0f}; {bad}",
                            target=f"p99 <= {TARGET_OVERLOAD_P99_MS} ms, 0" if judged else "-",
                            ok=cell["p99_ms"] <= TARGET_OVERLOAD_P99_MS and bad == 0 if judged else None))
        for path, row in o["modes"][mode]["probes"].items():
            rows.append(Row(7, f"{mode}: the API's {path} p99 ms (max) throughout", row["p99_ms"], f"{row['p99_ms']} ({row['max_ms']})",
                            target=f"<= {TARGET_PROBE_P99_MS} ms" if mode == "edge" else "-",
                            ok=row["p99_ms"] is not None and row["p99_ms"] <= TARGET_PROBE_P99_MS and not row["not_200"] if mode == "edge" else None))
    edge16 = {c["connections"]: c for c in o["modes"]["edge"]["cells"]}[16]
    if "edge_cpu_us_per_request" in edge16:
        rows.append(Row(7, "CPU per request at c=16, edge µs", edge16["edge_cpu_us_per_request"], f"{edge16['edge_cpu_us_per_request']:.0f}",
                        "API", edge16["api_cpu_us_per_request"], f"{edge16['api_cpu_us_per_request']:.0f}"))
    h = s["8_hung_database"]
    limit = h["request_timeout_seconds"] + TARGET_DEADLINE_MARGIN_S
    rows.append(Row(8, f"frozen {h['freeze_seconds']:g} s: longest call s ({h['calls']:,} calls)", h["longest_call_s"], f"{h['longest_call_s']:.2f}",
                    "deadline", h["request_timeout_seconds"], f"{h['request_timeout_seconds']:g}", target=f"<= {limit:g} s", ok=h["longest_call_s"] <= limit))
    for service, paths in h["probes_while_frozen"].items():
        for path, row in paths.items():
            rows.append(Row(8, f"frozen: {service} {path} p99 ms (max)", row["p99_ms"], f"{row['p99_ms']} ({row['max_ms']})",
                            target=f"<= {TARGET_PROBE_P99_MS} ms",
                            ok=row["p99_ms"] is not None and row["p99_ms"] <= TARGET_PROBE_P99_MS and not row["not_200"]))
    first = h["first_2xx_after_thaw_s"]
    rows.append(Row(8, "first 2xx after the thaw s", first, "none" if first is None else f"{first:.2f}",
                    target=f"<= {TARGET_FIRST_2XX_AFTER_THAW_S:g} s", ok=first is not None and first <= TARGET_FIRST_2XX_AFTER_THAW_S))
    wrong = h["lost"] + h["wrong_total"] + h["unexpected"]
    rows.append(Row(8, f"acknowledged ends billed once ({h['ends_acknowledged']:,}); lost, wrong or unexpected", wrong, str(wrong),
                    target="0", ok=wrong == 0 and h["clients_finished"]))
    b = s["9_backups"]
    size = f"{b['appointments']:,} appointments, {b['database_mb']:,.0f} MB"
    rows.append(Row(9, f"full backup under load s ({size}; {b['full_backup_repository_mb']:,.0f} MB stored)", b["full_backup_s"],
                    f"{b['full_backup_s']:.1f}"))
    rows.append(Row(9, "data directory lost: RTO s (restore + replay and promotion + first 2xx end)", b["rto_s"],
                    f"{b['rto_s']:.1f} ({b['restore_s']:.1f} + {b['replay_and_promote_s']:.1f})"))
    rows.append(Row(9, f"RPO: oldest acknowledged end lost, s old ({b['lost']} of {b['ends_acknowledged']:,} lost)", b["loss_window_s"],
                    f"{b['loss_window_s']:.2f}", target=f"<= {TARGET_RPO_S:g} s", ok=b["loss_window_s"] <= TARGET_RPO_S))
    wrong = b["lost_older_than_rpo"] + b["wrong_total"] + b["unexpected"] + b["feed_repeated"] + b["feed_missed"] + (b["reconcile_exit"] != 0)
    rows.append(Row(9, "restored: lost older than the RPO, wrong, unexpected, feed repeated or missed, reconcile", wrong, str(wrong),
                    target="0", ok=wrong == 0))
    sc = s["10_scale_out"]
    cells = {(c["api_processes"], c["kind"], c["connections"]): c for c in sc["cells"]}
    for kind, label in (("start", "POST /appointments"), ("end", "POST /appointments/{id}/end")):
        straight = {c["connections"]: c for c in s["2_api"][kind]}
        for c in sc["connections"]:
            one, two = cells[(1, kind, c)], cells[(2, kind, c)]
            alone = straight.get(c)
            rows.append(Row(10, f"{label} c={c} via the edge, 1 API process req/s", one["requests_per_second"], f"{one['requests_per_second']:,.0f}",
                            *(("straight at it (2)", alone["requests_per_second"], f"{alone['requests_per_second']:,.0f}") if alone else ())))
            rows.append(Row(10, f"{label} c={c} via the edge, 2 API processes req/s", two["requests_per_second"], f"{two['requests_per_second']:,.0f}",
                            "1 API process", one["requests_per_second"], f"{one['requests_per_second']:,.0f}"))
            rows.append(Row(10, f"{label} c={c} via the edge, 1 -> 2 processes: p50/p99/max ms; errors", two["p99_ms"],
                            f"{lat(one)} -> {lat(two)}; {one['errors'] + two['errors']}", "1 API process", one["p99_ms"], lat(one)))
            cpu1, cpu2 = one["cpu_us_per_request"], two["cpu_us_per_request"]
            rows.append(Row(10, f"{label} c={c} CPU per request µs, API / edge / PostgreSQL, 1 -> 2 processes", cpu2["api"],
                            f"{cpu1['api']:.0f}/{cpu1['edge']:.0f}/{cpu1['postgresql']:.0f} -> {cpu2['api']:.0f}/{cpu2['edge']:.0f}/{cpu2['postgresql']:.0f}",
                            "1 API process", cpu1["api"], f"{cpu1['api']:.0f}"))
    li = s["11_listings"]
    for route in li["routes"]:
        buffers = route["buffers"]
        rows.append(Row(11, f"{route['route']}: page {li['deep_page']} ms (by OFFSET in SQL)", route["deep_page_ms"],
                        f"{route['deep_page_ms']:.2f} ({route['offset_ms']:.1f})", "page 1", route["first_page_ms"], f"{route['first_page_ms']:.2f}"))
        rows.append(Row(11, f"{route['route']}: shared buffers, page {li['deep_page']} (by OFFSET)", buffers["deep_page"],
                        f"{buffers['deep_page']:,} ({buffers['offset']:,})", "page 1", buffers["first_page"], f"{buffers['first_page']:,}"))
    return rows


def memory_floor_kb() -> int:
    done = subprocess.run([sys.executable, "-c", MEMORY_FLOOR, str(web.THREADS)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BenchError(f"the memory floor failed: {done.stderr}")
    return int(done.stdout.strip())


def memory_summary(run: Run, report: dict, ceiling_peak_kb: int | None) -> None:
    m = report["sections"]["6_memory"]
    m["processes_peak_rss_kb"] = run.memory
    m["ceiling_app_peak_rss_mb"] = round((ceiling_peak_kb or 0) / 1024, 1)  # imports web.py
    m["floor_peak_rss_mb"] = round(memory_floor_kb() / 1024, 1)
    m["floor"] = "Python with falcon and waitress imported and a waitress server made (MEMORY_FLOOR)"
    m["peak_rss_mb"], m["processes"] = {}, {}
    for kind in ("api", "worker"):
        peaks = [p["peak_rss_kb"] for p in run.memory if p["kind"] == kind and p["peak_rss_kb"]]
        m["peak_rss_mb"][kind] = round(max(peaks) / 1024, 1)
        m["processes"][kind] = len(peaks)
    soak_ = m["soak"]
    m["rss_growth_mb"] = round((soak_["phases"][-1]["rss_kb_after"] - soak_["baseline_rss_kb"]) / 1024, 2)


# ---------------------------------------------------------------------------------------------
# 7 and 8: overload, and a database that hangs


def edge_cpu(edge: Edge) -> float:
    """CPU seconds of HAProxy: its master (-W) and the worker that serves."""
    return sum(process_cpu(pid) or 0.0 for pid in (edge.popen.pid, *children(edge.popen.pid)))


def overload_cell(run: Run, url: str, connections: int, warmup: bool = True) -> dict:
    """A warm-up, then the measured run of bench_overload.lua (support.run_wrk: -t2, --timeout 10s)."""
    if warmup and run.args.warmup:
        run_wrk(url, connections, run.args.warmup, OVERLOAD_LUA, WRK_THREADS, run.auth)
    wrk = run_wrk(url, connections, run.args.seconds, OVERLOAD_LUA, WRK_THREADS, run.auth)
    seconds = wrk["duration_us"] / 1e6
    return {
        "connections": connections,
        "goodput": round(wrk["ok"] / seconds, 1),
        "shed_per_second": round(wrk["shed"] / seconds, 1),
        "p50_ms": wrk["p50_us"] / 1000, "p99_ms": wrk["p99_us"] / 1000, "max_ms": wrk["max_us"] / 1000,
        "not_2xx_or_503": wrk["other"], "503_without_retry_after": wrk["no_retry"], "without_request_id": wrk["no_id"],
        "closed_connections": wrk["closed"],
        "socket_errors": wrk["errors_connect"] + wrk["errors_read"] + wrk["errors_write"] + wrk["errors_timeout"],
        "requests": wrk["requests"],
    }


def overload(run: Run, report: dict) -> None:
    """Section 7: each --overload-connections through the edge in front of a fresh API process,
    then straight at another fresh one (after thousands of connections straight at it, a process
    takes seconds to recover, and its /ready fails the edge's health check meanwhile), the
    probes read meanwhile."""
    section: dict = {"connections": run.args.overload_connections, "modes": {}}
    for mode in ("edge", "direct"):
        api, base = run.start_api(f"api-overload-{mode}", "bench")
        try:
            with contextlib.ExitStack() as stack:
                edge = stack.enter_context(Edge(base, run.work_dir)) if mode == "edge" else None
                if edge is not None:
                    section["edge_settings"] = {k: v for k, v in edge.env.items() if k.startswith("CLINIC_")}
                url = edge.url if edge is not None else base
                probes = Probes([base])
                probes.start()
                cells = []
                try:
                    for connections in run.args.overload_connections:
                        if run.args.warmup:
                            run_wrk(url + "/appointments", connections, run.args.warmup, OVERLOAD_LUA, WRK_THREADS, run.auth)
                        cpu = {"api": process_cpu(api.pid), "edge": edge_cpu(edge) if edge is not None else None}
                        cell = overload_cell(run, url + "/appointments", connections, warmup=False)
                        if connections == 16:  # what each spends per request at the base load
                            cell["api_cpu_us_per_request"] = round(1e6 * (process_cpu(api.pid) - cpu["api"]) / cell["requests"], 1)
                            if edge is not None:
                                cell["edge_cpu_us_per_request"] = round(1e6 * (edge_cpu(edge) - cpu["edge"]) / cell["requests"], 1)
                        cells.append(cell)
                finally:
                    probes.stop()
                section["modes"][mode] = {"cells": cells, "probes": probes.summary()[base]}
        finally:
            # Not in section 6's peak: thousands of connections are not what it measures.
            run.retire(f"api-overload-{mode}", "api-overload", api)
    report["sections"]["7_overload"] = section


def hung_database(run: Run, report: dict) -> None:
    """Section 8: the server frozen under load for --freeze-seconds, then thawed."""
    run.create_database("hung")
    api, base = run.start_api("api-hung", "hung")
    worker, port = run.start_worker("worker-hung", "hung")
    worker_base = f"http://127.0.0.1:{port}"
    wait_http(worker_base + "/ready", worker)
    load = Load(base, seed=8, clients=8, timeout=(2, 60), headers={"Authorization": f"Bearer {run.token}"})
    probes = Probes([base, worker_base], paths=("/health", "/metrics"))
    try:
        load.start()
        probes.start()
        time.sleep(2)
        frozen_at = time.monotonic()
        pids = freeze(run.cluster.postmaster_pid())
        try:
            time.sleep(run.args.freeze_seconds)
        finally:
            thawed_at = time.monotonic()
            thaw(pids)
            # runuser, the postmaster's parent here, stopped itself when its child stopped (su's
            # job control) and stays stopped until told to go on.
            run.cluster.process.send_signal(signal.SIGCONT)
        time.sleep(3)
        finished = load.stop(timeout=90)
        probes.stop()
        with psycopg.connect(run.url("hung"), autocommit=True) as conn:
            wait_drained(conn, 60, "the hung section's charges")
            billed = {r[0]: r[1] for r in conn.execute("SELECT appointment_id::text, total_price FROM billing_entries")}
            count = ledger_counts(conn)
    finally:
        run.retire("worker-hung", "worker-hung", worker)
        run.retire("api-hung", "api-hung", api)
    with load.lock:
        attempts = list(load.attempts)
    acked = [a for a in load.appointments.values() if a.end_acked]
    longest = max((a.done - a.sent for a in attempts), default=0.0)
    after = [a.done for a in attempts if a.outcome == "acked" and a.done >= thawed_at]
    probes_frozen = probes.summary(frozen_at, thawed_at)
    report["sections"]["8_hung_database"] = {
        "freeze_seconds": run.args.freeze_seconds,
        "request_timeout_seconds": config.Config.request_timeout,
        "clients_finished": finished,
        "calls": len(attempts),
        "outcomes": dict(collections.Counter(f"{a.kind}_{a.outcome}" for a in attempts)),
        "longest_call_s": round(longest, 2),
        "first_2xx_after_thaw_s": round(min(after) - thawed_at, 3) if after else None,
        "probes_while_frozen": {"api": probes_frozen[base], "worker": probes_frozen[worker_base]},
        "ends_acknowledged": len(acked),
        "lost": sum(1 for a in acked if a.id not in billed),
        "wrong_total": sum(1 for a in acked if a.id in billed and billed[a.id] != expected_price(a.minutes)),
        "unexpected": sum(1 for i in billed if i not in load.appointments or not load.appointments[i].end_sent),
        "ledger": count,
    }


# ---------------------------------------------------------------------------------------------
# 9: backups


class BackupBenchCluster(BenchCluster):
    """Section 9's cluster: archiving with pgBackRest; every start (the drill restarts it after
    the restore) a child of this script like BenchCluster's, stopped with pg_ctl."""

    def __init__(self, processes: Processes):
        super().__init__()
        self.processes = processes

    def start(self) -> None:
        self.start_in(self.processes)


def backups(run: Run, report: dict) -> None:
    """Section 9: the restore drill of tests/test_backup.py on --backup-appointments ended and
    billed appointments: a full backup under load, the data directory lost, the latest restored."""
    cluster = BackupBenchCluster(run.cluster_processes)
    api = worker = None
    try:
        repo = start_archiving(cluster)
        create_database(cluster.url, "backups")
        url = psycopg.conninfo.make_conninfo(cluster.url, dbname="backups")
        apply_schema(url)
        t0 = time.monotonic()
        with psycopg.connect(url, autocommit=True) as conn:
            with conn.transaction():
                make_backlog(conn, run.args.backup_appointments)
                for statement in DRAIN_SQL:
                    conn.execute(statement)
            conn.execute("VACUUM ANALYZE")
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        made_s = time.monotonic() - t0
        say(f"    {run.args.backup_appointments:,} billed appointments made in {made_s:.0f} s: {size / 2**20:,.0f} MB")
        api_port, worker_port = free_port(), free_port()
        api = run.processes.start("api-backups", [sys.executable, "appointments.py"],
                                  run.service_env(as_role(url, "appointments.py"), APPOINTMENTS_PORT=str(api_port)))
        worker = run.processes.start("worker-backups", [sys.executable, "billing_worker.py"],
                                     run.service_env(as_role(url, "billing_worker.py"), BILLING_PORT=str(worker_port), **Drill.WORKER_SETTINGS))
        api_url, worker_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{worker_port}"
        wait_http(api_url + "/ready", api)
        wait_http(worker_url + "/ready", worker)
        drill = Drill(cluster, repo, url, api_url, worker_url, seed=9, headers={"Authorization": f"Bearer {run.token}"},
                      load_seconds=run.args.backup_load_seconds)
        drill.load_with_a_backup_in_the_middle()
        lost_at = lose_the_volume_under_load(drill)
        times = drill.restore()
        figures = drill.check(lost_at)
        backup = repo.info()["backup"][-1]
    finally:
        for name, process in (("worker-backups", worker), ("api-backups", api)):
            if process is not None:
                run.retire(name, name, process)
        cluster.destroy()
    report["sections"]["9_backups"] = {
        "appointments": run.args.backup_appointments,
        "database_mb": round(size / 2**20, 1),
        "archive_timeout": archive_timeout(),
        "load_seconds_before_and_after_the_backup": run.args.backup_load_seconds,
        "full_backup_s": round(drill.backup_s, 2),
        "full_backup_repository_mb": round(backup["info"]["repository"]["delta"] / 2**20, 1),
        **times,
        **{k: v for k, v in figures.items() if k != "reconcile_output"},
    }


# ---------------------------------------------------------------------------------------------
# 10: one and two API processes behind the edge


class TwoProcessEdge(Edge):
    """support.Edge with two server slots (CLINIC_API_SLOTS=2), one for each of two API processes.
    deploy/haproxy/haproxy.cfg gives every slot the one address of CLINIC_API_SERVERS (compose's is
    a name that Docker's DNS resolves to each replica); on one machine the processes differ by port,
    so the second slot is moved to the second process through the edge's runtime API, as an
    operator would ("set server")."""

    def __init__(self, first: str, second: str, log_dir: Path):
        super().__init__(first, log_dir, CLINIC_API_SLOTS="2")
        self.second = second.removeprefix("http://")

    def _serving(self) -> bool:  # both slots up (on the first process until __enter__ moves one)
        if self.popen.poll() is not None:
            raise BenchError(f"haproxy exited with {self.popen.returncode}: {tail(self.log_path)}")
        try:
            return 'haproxy_backend_active_servers{proxy="api"} 2' in self.metrics()
        except OSError:  # requests' errors are OSErrors
            return False

    def __enter__(self) -> TwoProcessEdge:
        super().__enter__()
        try:
            host, port = self.second.rsplit(":", 1)
            self.admin(f"set server api/api2 addr {host} port {port}")
            deadline = time.monotonic() + 20
            while (state := self.server_state("api2")) != (self.second, "UP"):
                if time.monotonic() > deadline:
                    raise BenchError(f"the edge's api2 is {state}, not ({self.second!r}, 'UP'), 20 s after set server:\n{tail(self.log_path)}")
                time.sleep(0.1)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.env["CLINIC_EDGE_ADMIN_SOCKET"])
            s.sendall(command.encode() + b"\n")
            return s.makefile(errors="replace").read()

    def server_state(self, server: str) -> tuple[str, str] | None:
        """(address, status) of one of the api backend's servers, from "show stat"."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",") if lines else []
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "api" and row.get("svname") == server:
                return row.get("addr"), row.get("status")
        return None


def cpu_per_request(cell: dict) -> dict:
    """µs of CPU per measured request: the API processes together and each, the edge, the server."""
    cpu, n = cell["cpu_seconds"], max(cell["requests"], 1)
    each = [seconds for part, seconds in sorted(cpu.items()) if part.startswith("api_")]
    return {"api": round(1e6 * sum(each) / n, 1), "each_api_process": [round(1e6 * s / n, 1) for s in each],
            "edge": round(1e6 * cpu["edge"] / n, 1), "postgresql": round(1e6 * cpu["postgresql"] / n, 1)}


def scale_out(run: Run, report: dict) -> None:
    """Section 10: POST /appointments and POST /appointments/{id}/end through the edge in front of
    one API process, then of two (the first and another, both fresh, on a database of their own),
    at each --scale-connections: what section 2 measures, and the CPU the API processes, the edge
    and the PostgreSQL server each spend per request."""
    name = "scale_out"
    url = run.create_database(name)
    apis = [run.start_api(f"api-scale-{k}", name) for k in (1, 2)]
    cells = []
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for count in (1, 2):
                bases = [base for _, base in apis[:count]]
                with (Edge(bases[0], run.work_dir) if count == 1 else TwoProcessEdge(*bases, run.work_dir)) as edge:
                    def meter(edge=edge, serving=apis[:count]) -> dict:
                        return {**{f"api_{k}": process_cpu(p.pid) for k, (p, _) in enumerate(serving, 1)},
                                "edge": edge_cpu(edge), "postgresql": cluster_cpu(run.cluster)}

                    for connections in run.args.scale_connections:
                        start = http_cell(run, START_LUA, edge.url + "/appointments", connections, meter=meter)
                        end = end_cell(run, edge.url, connections, start["requests_per_second"], meter=meter, conn=conn)
                        for kind, cell in (("start", start), ("end", end)):
                            cell.update(api_processes=count, kind=kind, cpu_us_per_request=cpu_per_request(cell))
                            cells.append(cell)
                            cpu = cell["cpu_us_per_request"]
                            say(f"  {count} API process{'es' if count > 1 else ''}, {kind}, c={connections}: {cell['requests_per_second']:,.0f} req/s, "
                                f"p99 {cell['p99_ms']:.1f} ms; CPU µs per request: API {cpu['api']:.0f} {cpu['each_api_process']}, "
                                f"edge {cpu['edge']:.0f}, PostgreSQL {cpu['postgresql']:.0f}")
    finally:
        for k, (process, _) in enumerate(apis, 1):
            run.retire(f"api-scale-{k}", "api-scale-out", process)  # not in section 6's peak: a figure of its own
    run.drop_database(name)
    report["sections"]["10_scale_out"] = {
        "connections": run.args.scale_connections, "cells": cells,
        "edge": "deploy/haproxy/haproxy.cfg (support.Edge); two processes: CLINIC_API_SLOTS=2, the second slot moved to the "
                "second process's port through the runtime API (TwoProcessEdge)",
        "cpu": "utime + stime from /proc over the measured run: each API process, HAProxy (master and worker), the PostgreSQL "
               "server (every process, and the backends it reaped meanwhile)",
    }


# ---------------------------------------------------------------------------------------------
# 11: listings, a first page against a deep one


LISTINGS_PAGE = 100
LISTINGS_DEEP_PAGE = 500  # the page measured against page 1, at most: rows 49,901-50,000

# The row just before a deep page in each order, by OFFSET: its cursor is the one that page's Link carries.
APPOINTMENTS_ORDER = "SELECT start_date, id FROM appointments ORDER BY start_date DESC, id DESC OFFSET %(skipped)s LIMIT 1"
PHYSICIAN_ORDER = """
SELECT start_date, id FROM appointments WHERE physician_id = %(physician_id)s
ORDER BY start_date DESC, id DESC OFFSET %(skipped)s LIMIT 1
"""
ENTRIES_ORDER = "SELECT created_at, appointment_id FROM billing_entries ORDER BY created_at DESC, appointment_id DESC OFFSET %(skipped)s LIMIT 1"
FEED_ORDER = "SELECT txid::text AS txid, appointment_id FROM billing_entries ORDER BY txid, appointment_id OFFSET %(skipped)s LIMIT 1"
# support.load_listings' busy physician (a tenth of the appointments), and how many are theirs.
BUSY_PHYSICIAN = "SELECT md5('physician 0')::uuid AS u"
PHYSICIAN_ROWS = "SELECT count(*) AS n FROM appointments WHERE physician_id = %(physician_id)s"


def listings_deep_page(rows: int) -> int:
    """The deep page: LISTINGS_DEEP_PAGE, or fewer when the busy physician (a tenth of the rows)
    has fewer pages."""
    return min(LISTINGS_DEEP_PAGE, rows // 10 // LISTINGS_PAGE)


def listings(run: Run, report: dict) -> None:
    """Section 11: support.load_listings' data set, --listing-rows of it, in a database of its own;
    then listings_pages()."""
    rows = run.args.listing_rows
    url = run.create_database("listings")
    t0 = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        # Loading only: no wait for the WAL flush at each of the ledger's commits.
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '256MB'")
        load_listings(conn, rows)
    load_seconds = time.monotonic() - t0
    say(f"  {rows:,} appointments loaded in {load_seconds:.0f} s")
    deep = listings_deep_page(rows)
    routes = listings_pages(url, deep, run.args.listing_repeats)
    run.drop_database("listings")
    report["sections"]["11_listings"] = {
        "rows": rows, "open": LISTINGS_OPEN, "load_seconds": round(load_seconds, 1), "page_size": LISTINGS_PAGE,
        "deep_page": deep, "repeats": run.args.listing_repeats, "routes": routes,
        "how": "each page asked in turn, after 6 untimed rounds, through the services' own apps (falcon.testing over "
               "appointments.create_app and ledger.create_app, real pools as clinic_api and clinic_worker, request log lines "
               "off): the median of the repeats; the deep page by the cursor its Link would carry; OFFSET: the same page by "
               "OFFSET in SQL, EXPLAIN (ANALYZE, TIMING OFF), median of 3; buffers: shared buffers (hit + read) each page's SQL touches",
    }


def listings_pages(url: str, deep: int, repeats: int) -> list[dict]:
    """Page 1 and page `deep` of each listing and of the change feed (`deep` pages in), through
    the real code path; the same deep page by OFFSET in SQL, for contrast."""
    skipped, feed_skipped = (deep - 1) * LISTINGS_PAGE, deep * LISTINGS_PAGE
    observer = psycopg.connect(url, autocommit=True, row_factory=dict_row)
    busy = observer.execute(BUSY_PHYSICIAN).fetchone()["u"]
    busy_rows = observer.execute(PHYSICIAN_ROWS, {"physician_id": busy}).fetchone()["n"]

    def nth(query: str, **params):
        row = observer.execute(query, params).fetchone()
        if row is None:
            raise BenchError(f"too few rows for page {deep}: {query}")
        return row

    last_before = nth(APPOINTMENTS_ORDER, skipped=skipped - 1)
    last_busy = nth(PHYSICIAN_ORDER, physician_id=busy, skipped=skipped - 1)
    last_entry = nth(ENTRIES_ORDER, skipped=skipped - 1)
    last_fed = nth(FEED_ORDER, skipped=feed_skipped - 1)

    def appointments_cursor(row) -> str:
        return paging.list_cursor("appointments", paging.ListPosition(row["start_date"], row["id"]))

    # The services' own roles and session settings, as their main() makes them.
    api_config = config.Config(database_url=psycopg.conninfo.make_conninfo(url, user=ROLES["api"]))
    worker_config = config.Config(database_url=psycopg.conninfo.make_conninfo(url, user=ROLES["worker"]))
    api_pool = make_pool(api_config, "bench-appointments")
    worker_pool = make_pool(worker_config, "bench-billing", max_size=4, **billing_worker.WORKER_SESSION)
    results = []
    with api_pool, worker_pool:
        api_pool.wait(timeout=10)
        worker_pool.wait(timeout=10)
        api = falcon.testing.TestClient(appointments.create_app(api_config, api_pool))
        billing = falcon.testing.TestClient(ledger.create_app(worker_config, worker_pool))
        listing = {"physician_id": None, "patient_id": None, "before_at": None, "before_id": None, "limit": LISTINGS_PAGE + 1}
        busy_listing = {**listing, "physician_id": busy}
        entry = paging.ListPosition(last_entry["created_at"], last_entry["appointment_id"])
        fed = {"txid": last_fed["txid"], "appointment_id": last_fed["appointment_id"]}
        page = str(LISTINGS_PAGE)
        # (route, client, path, page 1's query string, the deep page's, and the SQL of page 1,
        # of the deep page by cursor and of the deep page by OFFSET)
        routes = [
            (
                "GET /appointments",
                api, "/appointments", {"limit": page}, {"limit": page, "before": appointments_cursor(last_before)},
                (appointments.list_query([]), listing),
                (appointments.list_query(["before"]), {**listing, "before_at": last_before["start_date"], "before_id": last_before["id"]}),
                (with_offset(appointments.list_query([])), {**listing, "offset": skipped}),
            ),
            (
                f"GET /appointments?physician_id= ({busy_rows:,} rows)",
                api, "/appointments", {"physician_id": str(busy), "limit": page},
                {"physician_id": str(busy), "limit": page, "before": appointments_cursor(last_busy)},
                (appointments.list_query(["physician_id"]), busy_listing),
                (appointments.list_query(["physician_id", "before"]), {**busy_listing, "before_at": last_busy["start_date"], "before_id": last_busy["id"]}),
                (with_offset(appointments.list_query(["physician_id"])), {**busy_listing, "offset": skipped}),
            ),
            (
                "GET /billing-entries",
                billing, "/billing-entries", {"limit": page}, {"limit": page, "before": paging.list_cursor("entries", entry)},
                (ledger.LIST_ENTRIES, {"limit": LISTINGS_PAGE + 1}),
                (ledger.LIST_ENTRIES_BEFORE, {"limit": LISTINGS_PAGE + 1, "before_at": entry.at, "before_id": entry.id}),
                (with_offset(ledger.LIST_ENTRIES), {"limit": LISTINGS_PAGE + 1, "offset": skipped}),
            ),
            (
                f"GET /billing-entries/changes (after {feed_skipped:,})",
                billing, "/billing-entries/changes", {"limit": page},
                {"limit": page, "after": paging.feed_cursor(paging.FeedPosition(int(last_fed["txid"]), last_fed["appointment_id"]))},
                (ledger.FEED_FROM_START, {"limit": LISTINGS_PAGE}),
                (ledger.FEED_AFTER, {"limit": LISTINGS_PAGE, **fed}),
                (with_offset(ledger.FEED_FROM_START), {"limit": LISTINGS_PAGE, "offset": feed_skipped}),
            ),
        ]
        for label, client, path, first, deep_params, first_sql, deep_sql, offset_sql in routes:
            say(f"  timing {label}")
            # The deep page by cursor is the page OFFSET gives: the figures are of the right rows.
            by_cursor = client.simulate_get(path, params=deep_params).json
            by_cursor = by_cursor["entries"] if isinstance(by_cursor, dict) else by_cursor
            key = "id" if path == "/appointments" else "appointment_id"
            by_offset = observer.execute(*offset_sql).fetchall()[:LISTINGS_PAGE]
            if [item[key] for item in by_cursor] != [str(row[key]) for row in by_offset]:
                raise BenchError(f"{label}: page {deep} by its cursor is not the page OFFSET gives")
            first_ms, deep_ms = median_ms(client, path, [first, deep_params], repeats)
            _, _, first_buffers = explain_ms(observer, *first_sql)
            _, _, deep_buffers = explain_ms(observer, *deep_sql)
            offset_ms, offset_plan, offset_buffers = explain_ms(observer, *offset_sql)
            results.append({"route": label, "first_page_ms": rounded(first_ms), "deep_page_ms": rounded(deep_ms), "offset_ms": rounded(offset_ms),
                            "buffers": {"first_page": first_buffers, "deep_page": deep_buffers, "offset": offset_buffers},
                            "offset_plan": offset_plan})
    observer.close()
    return results


def median_ms(client: falcon.testing.TestClient, path: str, pages: list[dict[str, str]], repeats: int) -> list[float]:
    """The median time of each page's `repeats` requests, asked in turn (page 1, the deep page,
    page 1, ...) so that whatever else the machine does weighs on both alike; after a few untimed
    rounds (which also let psycopg prepare the statements, as in a long-running service)."""
    def get(params):
        result = client.simulate_get(path, params=params)
        if result.status_code != 200:
            raise BenchError(f"GET {path} {params}: {result.status_code} {result.text}")
        return result

    for params in pages:
        for _ in range(6):
            body = get(params).json
        items = body["entries"] if isinstance(body, dict) else body
        if len(items) != LISTINGS_PAGE:
            raise BenchError(f"GET {path} {params}: {len(items)} items, not {LISTINGS_PAGE}")
    times: list[list[float]] = [[] for _ in pages]
    for _ in range(repeats):
        for params, taken in zip(pages, times):
            started = time.perf_counter()
            get(params)
            taken.append((time.perf_counter() - started) * 1000)
    return [statistics.median(taken) for taken in times]


def explain_ms(conn: psycopg.Connection, query, args: dict) -> tuple[float, str, int]:
    """Of three EXPLAIN (ANALYZE, TIMING OFF) runs (no per-node clock reads inflating the OFFSET's
    tens of thousands of rows): the median execution time in ms, the plan's top nodes in short and
    the shared buffers the last run read."""
    query = sql.SQL(query) if isinstance(query, str) else query
    runs = []
    for _ in range(3):
        plan = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, FORMAT JSON) ") + query, args).fetchone()["QUERY PLAN"][0]
        runs.append(plan["Execution Time"])
    top = plan["Plan"]
    return statistics.median(runs), plan_shape(top) + (", JIT" if "JIT" in plan else ""), top["Shared Hit Blocks"] + top["Shared Read Blocks"]


def plan_shape(node: dict) -> str:
    """A plan in a few words: its scans, joins and sorts, e.g. 'Sort(Hash Join (Left)(Seq Scan appointments, Seq Scan billing_queue))'."""
    kids = [plan_shape(child) for child in node.get("Plans", [])]
    name = node["Node Type"]
    if name in ("Limit", "Gather", "Gather Merge", "Hash", "Materialize") and len(kids) == 1:
        return kids[0]
    if "Join Type" in node:
        name = f"{name} ({node['Join Type']})"
    if node.get("Parent Relationship") == "InitPlan":
        return ""
    if "Index Name" in node:
        name = f"{name} {node['Index Name']}"
    elif "Relation Name" in node:
        name = f"{name} {node['Relation Name']}"
    kids = [kid for kid in kids if kid]
    return f"{name}({', '.join(kids)})" if kids else name


def with_offset(query) -> sql.Composable:
    query = sql.SQL(query) if isinstance(query, str) else query
    return query + sql.SQL(" OFFSET %(offset)s")


# ---------------------------------------------------------------------------------------------
# Machine facts


def machine_facts(run: Run) -> dict:
    conn = run.conn

    def first_line(argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return None
        return ((done.stdout or done.stderr).strip().splitlines() or [None])[0]

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    packages = {}
    for name in ("falcon", "waitress", "psycopg", "psycopg-binary", "psycopg-pool", "structlog", "orjson", "fastjsonschema",
                 "jsonschema", "prometheus-client", "PyYAML"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    settings = {name: (value, source) for name, value, source in conn.execute(CHANGED_SETTINGS, {"names": KEY_SETTINGS}).fetchall()}
    data_dir = conn.execute("SHOW data_directory").fetchone()[0]
    fs = first_line(["stat", "-f", "-c", "%T", data_dir])
    return {
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), None),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": packages,
        "postgresql": conn.execute("SELECT version()").fetchone()[0],
        "postgresql_settings": {name: {"value": value, "source": source} for name, (value, source) in settings.items()},
        "postgresql_data": {"file_system": fs, "cluster": "a cluster of this run's own (initdb), BenchCluster.SETTINGS on top of PostgreSQL's defaults"},
        "wrk": first_line(["wrk", "-v"]),
        "pgbench": first_line(["pgbench", "--version"]),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_start": loadavg(),
    }


# ---------------------------------------------------------------------------------------------


def execute(run: Run, report: dict) -> None:
    with run.timed("cluster and databases", "cluster: initdb, start (fsync on)"):
        run.cluster = BenchCluster()
        run.cluster.start_in(run.cluster_processes)
        run.create_database("bench")
        run.create_database("backlog")
        run.conn = psycopg.connect(run.url("bench"), autocommit=True)
        report["machine"] = machine_facts(run)

    with run.timed("1-2. framework ceiling, design floor, API, pgbench"):
        ceiling_port = floor_port = free_port()
        while floor_port == ceiling_port:
            floor_port = free_port()
        ceiling_app = run.processes.start("ceiling-app", [sys.executable, str(CEILING_APP), str(ceiling_port)], dict(os.environ))
        floor_env = {**os.environ, "DATABASE_URL": run.url("bench", ROLES["api"])}
        floor_app = run.processes.start("floor-app", [sys.executable, str(CEILING_APP), str(floor_port), "--with-insert"], floor_env)
        ceiling, floor = f"http://127.0.0.1:{ceiling_port}", f"http://127.0.0.1:{floor_port}"
        wait_http(ceiling + "/health", ceiling_app)
        wait_http(floor + "/health", floor_app)
        api, base = run.start_api("api", "bench")
        api_sections(run, report, base, ceiling, floor)
        ceiling_peak_kb = proc_status_kb(ceiling_app.pid, "VmHWM")
        report["sections"]["2_api"]["design_floor"]["peak_rss_mb"] = round((proc_status_kb(floor_app.pid, "VmHWM") or 0) / 1024, 1)
        run.processes.stop(ceiling_app)
        run.processes.stop(floor_app)

    with run.timed("4. end to charge"):
        end_to_charge(run, report, base)
        run.retire("api", "api", api)

    with run.timed("10. one and two API processes behind the edge"):
        scale_out(run, report)

    with run.timed("11. listings", f"11. listings: {run.args.listing_rows:,} appointments, page 1 against page {listings_deep_page(run.args.listing_rows)}"):
        listings(run, report)

    with run.timed("6. soak (makes the backlog)", "6. soak (it makes the backlog of 3 and 5)"):
        charges = soak(run, report)

    with run.timed("3. drain"):
        drains(run, report, charges)

    with run.timed("5. interference"):
        interference(run, report, charges)

    with run.timed("7. overload", "7. overload, straight at the API and through the edge"):
        overload(run, report)

    with run.timed("8. hung database"):
        hung_database(run, report)

    with run.timed("9. backups", f"9. backups: {run.args.backup_appointments:,} appointments, a full backup under load, the data directory lost, restored"):
        backups(run, report)

    with run.timed("6. memory floor", heading=None):
        memory_summary(run, report, ceiling_peak_kb)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4, help="measured seconds of each wrk and pgbench cell (default 4)")
    parser.add_argument("--warmup", type=int, default=WARMUP_SECONDS, help=f"warm-up seconds before each wrk cell (default {WARMUP_SECONDS})")
    parser.add_argument("--connections", default="4,16,64", help="wrk connections and pgbench clients of sections 1-2 (default 4,16,64)")
    parser.add_argument("--backlog", type=int, default=100_000, help="charges of the drains, sections 3 and 5 (default 100,000)")
    parser.add_argument("--e2c-rates", default="200,500", help="ends per second of section 4 (default 200,500)")
    parser.add_argument("--e2c-seconds", type=float, default=10, help="seconds of each section 4 run (default 10)")
    parser.add_argument("--e2c-ceiling-seconds", type=float, default=5, help="seconds of each run of section 4's ceiling (default 5)")
    parser.add_argument("--poll-seconds", type=float, help="BILLING_POLL_SECONDS of the polling-only worker (default: the worker's own, 10)")
    parser.add_argument("--soak-requests", type=int, default=500_000, help="requests of the soak, section 6 (default 500,000)")
    parser.add_argument("--budget-seconds", type=float, default=840,
                        help="the soak's fast part stops early should the run otherwise take longer than this (default 840: 14 minutes; "
                             "the table says the count reached); 0: no limit")
    parser.add_argument("--soak-baseline", type=int, default=10_000, help="requests after which the soak's first RSS is read (default 10,000)")
    parser.add_argument("--overload-connections", default="16,256,1000,4000",
                        help="wrk connections of section 7, straight and through the edge (default 16,256,1000,4000; 16 is the ratios' base)")
    parser.add_argument("--freeze-seconds", type=float, default=12, help="how long section 8 freezes the server (default 12)")
    parser.add_argument("--backup-appointments", type=int, default=1_000_000,
                        help="ended and billed appointments in section 9's database (default 1,000,000)")
    parser.add_argument("--backup-load-seconds", type=float, default=4, help="section 9's load before and after its backup (default 4)")
    parser.add_argument("--scale-connections", default="64", help="wrk connections of section 10, through the edge (default 64)")
    parser.add_argument("--listing-rows", type=int, default=1_000_000, help="appointments of section 11's listings (default 1,000,000)")
    parser.add_argument("--listing-repeats", type=int, default=100, help="timed requests of each page in section 11 (default 100)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (1 s cells, 16 connections, backlog 2,000, soak 4,000, polling every 1 s, overload at 16 and 256, "
                             "a 3 s freeze, 2,000 appointments backed up, listings of 10,000): the harness runs, its figures mean little")
    parser.add_argument("--out", help="the JSON file (default bench/results/bench-<UTC yyyymmdd-hhmmss>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (services' logs, wrk output)")
    parser.add_argument("--bare-worker", metavar="URL", help=argparse.SUPPRESS)  # section 4's ceiling, run by the harness
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.connections, args.backlog = 1, 0, "16", 2_000
        args.e2c_seconds, args.e2c_ceiling_seconds, args.poll_seconds = 1, 1, args.poll_seconds or 1.0
        args.soak_requests, args.soak_baseline = 4_000, 1_000
        args.overload_connections, args.freeze_seconds = "16,256", 3
        args.backup_appointments, args.backup_load_seconds = 2_000, 2
        args.scale_connections, args.listing_rows, args.listing_repeats = "16", 10_000, 5
    args.connections = [int(x) for x in args.connections.split(",")]
    args.scale_connections = [int(x) for x in args.scale_connections.split(",")]
    args.overload_connections = [int(x) for x in args.overload_connections.split(",")]
    if 16 not in args.overload_connections:
        parser.error("--overload-connections: 16 must be one of them (the ratios' base)")
    args.e2c_rates = [int(x) for x in args.e2c_rates.split(",")]
    if any(c < WRK_THREADS for c in args.connections + args.scale_connections):
        parser.error(f"--connections, --scale-connections: at least {WRK_THREADS} (wrk's threads)")
    if listings_deep_page(args.listing_rows) < 2:
        parser.error(f"--listing-rows: at least {20 * LISTINGS_PAGE:,} (the busy physician's tenth must fill 2 pages)")
    if args.listing_repeats < 1:
        parser.error("--listing-repeats: at least 1")
    if args.soak_requests < args.backlog + args.soak_baseline:
        parser.error("--soak-requests must cover --backlog (the soak makes the backlog's ends) and --soak-baseline")
    if not args.bare_worker:
        for tool in ("wrk", "pgbench", "setpriv", "haproxy", "pgbackrest"):
            if shutil.which(tool) is None:
                parser.error(f"{tool} is not on the PATH (Debian: apt-get install wrk postgresql-client util-linux haproxy pgbackrest; "
                             "make bench installs wrk, haproxy and pgbackrest)")
    return args


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = "  ".join(["{:<%d}" % widths[0]] + ["{:>%d}" % w for w in widths[1:]])
    return "\n".join([line.format(*header), line.format(*("-" * w for w in widths)), *(line.format(*row) for row in rows)])


def print_table(report: dict, rows: list[Row], out: Path) -> None:
    header = ["figure", "value", "ceiling", "ratio", "vs design floor (ratio)", "vs database (ratio)", "target", "result"]
    print()
    print(fmt_table(header, [row.cells() for row in rows]))
    m = report["machine"]
    passed = sum(1 for r in rows if r.verdict() == "PASS")
    judged = sum(1 for r in rows if r.verdict() in ("PASS", "MISS"))
    print(f"\n{passed} of {judged} targets met. Latencies p50/p99/max in ms; ratios are value / ceiling (for latency rows, of p99).")
    print("Design floor: bench/ceiling_app.py --with-insert, the framework ceiling's app plus appointments.INSERT_APPOINTMENT through "
          "db.make_pool (one round trip, nothing else); the start's ratio to it is shown, its target stays the framework's.")
    mem = report["sections"]["6_memory"]
    print(f"Memory floor: Python with falcon and waitress imported, a waitress server made: {mem['floor_peak_rss_mb']:.1f} MB; "
          f"the ceiling app (it imports web.py, and so psycopg, jsonschema, yaml ...): {mem['ceiling_app_peak_rss_mb']:.1f} MB.")
    e = report["sections"]["4_end_to_charge"]
    if not e["listen_off_honoured"]:
        print("NO EFFECT: with BILLING_LISTEN=off the worker still LISTENed (or billed far quicker than its poll): the polling figures are NOTIFY's.")
    soak_ = mem["soak"]
    print(f"Soak: {soak_['total_requests']:,} requests at {soak_['connections']} connections, "
          + "; ".join(f"{p['requests']:,} {p['mix']} mix in {p['seconds']:.0f} s ({p['requests_per_second']:,.0f}/s)" for p in soak_["phases"])
          + f". Mixes: {soak_['mix']['ends']}; {soak_['mix']['fast']}."
          + (f" STOPPED at --budget-seconds {soak_['budget']['budget_seconds']:.0f}: {soak_['total_requests']:,} of the {soak_['requests_asked']:,} asked."
             if soak_["stopped_by_budget"] else ""))
    total = round(report["duration_seconds"])
    print(f"Wall time: {total} s ({total // 60} min {total % 60:02d} s) to this table; by part: "
          + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report["section_seconds"].items()) + ".")
    print(f"{m['cpu']}, {m['cores']} cores, {m['kernel']}, {m['postgresql'].split(' on ')[0]}, Python {m['python']}; "
          f"commit {m['git_commit'][:10]}{' (uncommitted changes)' if m['git_dirty'] else ''}; "
          f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def main(argv: list[str] | None = None) -> int:
    clock = time.monotonic()  # the run's wall time counts from here
    args = parse_args(argv)
    if args.bare_worker:
        return bare_worker(args.bare_worker)

    def on_term(signum, frame):
        raise KeyboardInterrupt  # unwinds to the finally below: every process stopped, the cluster gone

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    setup_logging("bench", "WARNING", "json")  # the apps section 11 runs in process: no line per request
    began = dt.datetime.now(dt.timezone.utc)
    stamp = f"{began:%Y%m%d-%H%M%S}"
    if args.out:
        out = Path(args.out).resolve()
    elif args.smoke:
        out = Path(tempfile.gettempdir()) / f"bench-smoke-{stamp}.json"
    else:
        out = ROOT / "bench" / "results" / f"bench-{stamp}.json"
    work_dir = Path(tempfile.mkdtemp(prefix="clinic-bench-"))
    run = Run(args, work_dir)
    run.began = clock
    try:
        # Built first, so that SQL the harness cannot follow fails it before any load.
        scripts = {kind: pgbench_script(kind) for kind in PGBENCH_SCRIPTS}
    except BenchError as exc:
        say(f"bench: {exc}")
        return 2
    run.pgbench_scripts = {kind: script for kind, (script, _) in scripts.items()}
    run.pgbench_statements = {kind: names for kind, (_, names) in scripts.items()}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "bare_worker", "keep")}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": began.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "settings": {**settings, "wrk_threads": WRK_THREADS, "paced_connections": PACED_CONNECTIONS,
                     "soak_connections": SOAK_CONNECTIONS, "interference_connections": INTERFERENCE_CONNECTIONS,
                     "cluster_settings": BenchCluster.SETTINGS, "service_settings": "defaults, but ports, DATABASE_URL (own role) and API_TOKENS (one token)"},
        "sections": {},
    }
    ok = False
    try:
        execute(run, report)
        report["duration_seconds"] = round(time.monotonic() - clock, 1)  # from main() to here: all but the table and the clean-up
        report["section_seconds"] = {**run.section_seconds,
                                     "other (start-up, checks)": max(0.0, round(report["duration_seconds"] - sum(run.section_seconds.values()), 1))}
        report["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        report["load_average_at_end"] = loadavg()
        rows = table_rows(report)
        report["table"] = [row.as_dict() for row in rows]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print_table(report, rows, out)
        ok = True
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except BenchError as exc:
        say(f"bench: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not stop the clean-up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        run.processes.stop_all()
        if run.conn is not None:
            run.conn.close()
        if run.cluster is not None:
            run.cluster.destroy()
        run.cluster_processes.stop_all()
        if ok and not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            say(f"logs and wrk output kept in {work_dir}")
        say(f"processes stopped, cluster removed: {time.monotonic() - clock:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
