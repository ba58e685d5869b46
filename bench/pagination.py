"""Keyset pagination, measured: page 1 against page 500 of each listing, and the same page by OFFSET.

    .venv/bin/python bench/pagination.py [--rows 1000000] [--database-url postgresql://postgres@127.0.0.1:5432/postgres]

Makes a scratch database on that server (a superuser's URL), applies schema.sql and roles.sql,
loads --rows appointments in SQL (four on each minute; every 10th is one busy physician's, the rest
spread over 997 physicians and 1009 patients; the newest 300 open, the others ended, billed, and in
the ledger in worker-sized transactions of 500 entries), VACUUM ANALYZE, then times requests
through the real code path: falcon.testing.TestClient over appointments.create_app and
billing_worker.create_app, each with a real pool logged in as its service's role. Page 500 is
asked for with the cursor its Link would carry (paging.list_cursor / feed_cursor of the row just
before it); the OFFSET column is the same page read by OFFSET in SQL, timed by EXPLAIN ANALYZE.
Prints one table and the machine; drops the scratch database at the end, also on Ctrl-C, SIGTERM
or an error.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

import falcon.testing
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import appointments  # noqa: E402
import billing_worker  # noqa: E402
import feed  # noqa: E402
import paging  # noqa: E402
from config import Config  # noqa: E402
from db import apply_schema, make_pool  # noqa: E402
from telemetry import setup_logging  # noqa: E402

OPEN = 300
BATCH = 500  # entries per ledger transaction, as a worker writes them
PAGE = 100
DEEP_PAGE = 500  # the page measured against page 1: rows 49,901..50,000
SKIPPED = (DEEP_PAGE - 1) * PAGE  # rows before it
FEED_SKIPPED = 50_000  # the change feed: a cursor 50,000 entries in
REPEATS = 100  # timed requests per page (after warming up)

LOAD_APPOINTMENTS = """
INSERT INTO appointments (id, physician_id, patient_id, start_date, end_date, hourly_rate, price)
SELECT md5('appointment ' || g)::uuid,
       md5('physician ' || CASE WHEN g %% 10 = 0 THEN 0 ELSE g %% 997 + 1 END)::uuid,
       md5('patient ' || (g %% 1009))::uuid,
       s.start,
       CASE WHEN g <= %(ended)s THEN s.start + make_interval(mins => g %% 90 + 1) END,
       200.00,
       CASE WHEN g <= %(ended)s THEN round(200.00 * (g %% 90 + 1) / 60, 2) END
FROM generate_series(1, %(rows)s) g,
     LATERAL (SELECT timestamptz '2020-01-01 00:00:00+00' + (g / 4) * interval '1 minute' AS start) s
"""

LOAD_QUEUE = """
INSERT INTO billing_queue (appointment_id, total_price, status, attempts, processed_at)
SELECT id, price, 'billed', 1, now() FROM appointments WHERE end_date IS NOT NULL
"""

# One transaction per batch, in the order the appointments ended: each batch gets its own txid
# (the feed's position) and created_at (shared by its 500 entries, as a worker's batch shares it).
LOAD_ENTRIES = """
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

APPOINTMENTS_ORDER = "SELECT start_date, id FROM appointments WHERE {} ORDER BY start_date DESC, id DESC OFFSET %s LIMIT 1"
ENTRIES_ORDER = "SELECT created_at, appointment_id FROM billing_entries ORDER BY created_at DESC, appointment_id DESC OFFSET %s LIMIT 1"
FEED_ORDER = "SELECT txid::text AS txid, appointment_id FROM billing_entries ORDER BY txid, appointment_id OFFSET %s LIMIT 1"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def step(conn, label: str, query, args=None) -> None:
    started = time.perf_counter()
    conn.execute(query, args)
    say(f"  {label}: {time.perf_counter() - started:.1f} s")


def load(url: str, rows: int) -> None:
    ended = rows - OPEN
    with psycopg.connect(url, autocommit=True) as conn:
        # Loading only: no foreign-key checks and no NOTIFY (the rows are consistent by
        # construction), no wait for the WAL flush at each of the ledger's commits.
        conn.execute("SET session_replication_role = replica")
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '256MB'")
        step(conn, f"{rows:,} appointments", LOAD_APPOINTMENTS, {"rows": rows, "ended": ended})
        step(conn, f"{ended:,} billing_queue rows", LOAD_QUEUE)
        step(conn, f"{ended:,} billing_entries in {-(-ended // BATCH):,} transactions", LOAD_ENTRIES.format(ended=int(ended), batch=BATCH))
        conn.execute("RESET session_replication_role")
        step(conn, "VACUUM ANALYZE", "VACUUM ANALYZE")


def median_ms(client: falcon.testing.TestClient, path: str, pages: list[dict[str, str]], expect: int) -> list[float]:
    """The median time of each page's REPEATS requests, asked in turn (page 1, page 500, page 1,
    ...) so that whatever else the machine does weighs on both alike; after a few untimed rounds
    (which also let psycopg prepare the statements, as in a long-running service)."""
    def get(params):
        result = client.simulate_get(path, params=params)
        assert result.status_code == 200, result.text
        return result

    for params in pages:
        for _ in range(6):
            body = get(params).json
        items = body["entries"] if isinstance(body, dict) else body
        assert len(items) == expect, (path, params, len(items))
    times: list[list[float]] = [[] for _ in pages]
    for _ in range(REPEATS):
        for params, taken in zip(pages, times):
            started = time.perf_counter()
            get(params)
            taken.append((time.perf_counter() - started) * 1000)
    return [statistics.median(taken) for taken in times]


def explain_ms(conn, query, args: dict) -> tuple[float, str, int]:
    """Of three EXPLAIN (ANALYZE, TIMING OFF) runs (no per-node clock reads inflating the
    OFFSET's tens of thousands of rows): the median execution time in ms, the plan's top nodes
    (in short) and the shared buffers the last run read."""
    query = sql.SQL(query) if isinstance(query, str) else query
    runs = []
    for _ in range(3):
        plan = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, FORMAT JSON) ") + query, args).fetchone()["QUERY PLAN"][0]
        runs.append(plan["Execution Time"])
    top = plan["Plan"]
    return statistics.median(runs), shape(top) + (", JIT" if "JIT" in plan else ""), top["Shared Hit Blocks"] + top["Shared Read Blocks"]


def shape(node: dict) -> str:
    """The plan in a few words: its scans, joins and sorts, e.g. 'Sort(Hash Join (Left)(Seq Scan appointments, Seq Scan billing_queue))'."""
    kids = [shape(child) for child in node.get("Plans", [])]
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


def measure(url: str) -> list[tuple]:
    observer = psycopg.connect(url, autocommit=True, row_factory=dict_row)
    busy = observer.execute("SELECT md5('physician 0')::uuid AS u").fetchone()["u"]
    busy_rows = observer.execute("SELECT count(*) AS n FROM appointments WHERE physician_id = %s", [busy]).fetchone()["n"]

    def nth(query: str, *args):
        row = observer.execute(query, [*args]).fetchone()
        if row is None:
            raise SystemExit(f"too few rows for page {DEEP_PAGE}: use --rows of at least {(SKIPPED + PAGE) * 10:,}")
        return row

    last_before = nth(APPOINTMENTS_ORDER.format("TRUE"), SKIPPED - 1)
    last_busy = nth(APPOINTMENTS_ORDER.format("physician_id = %s"), busy, SKIPPED - 1)
    last_entry = nth(ENTRIES_ORDER, SKIPPED - 1)
    last_fed = nth(FEED_ORDER, FEED_SKIPPED - 1)

    def appointments_cursor(row) -> str:
        return paging.list_cursor("appointments", paging.ListPosition(row["start_date"], row["id"]))

    # The services' own roles and session settings, as their main() makes them.
    api_config = Config(database_url=psycopg.conninfo.make_conninfo(url, user="clinic_api"))
    worker_config = Config(database_url=psycopg.conninfo.make_conninfo(url, user="clinic_worker"))
    api_pool = make_pool(api_config, "bench-appointments")
    worker_pool = make_pool(worker_config, "bench-billing", max_size=4, **billing_worker.WORKER_SESSION)
    results = []
    with api_pool, worker_pool:
        api_pool.wait(timeout=10)
        worker_pool.wait(timeout=10)
        api = falcon.testing.TestClient(appointments.create_app(api_config, api_pool))
        worker = falcon.testing.TestClient(billing_worker.create_app(worker_config, worker_pool))
        listing = {"physician_id": None, "patient_id": None, "before_at": None, "before_id": None, "limit": PAGE + 1}
        busy_id = str(busy)
        busy_listing = {**listing, "physician_id": busy}
        entry = paging.ListPosition(last_entry["created_at"], last_entry["appointment_id"])
        fed = {"txid": last_fed["txid"], "appointment_id": last_fed["appointment_id"]}
        # (label, client, path, page 1's query string, page 500's, and the SQL each of the
        # three runs: page 1, page 500 by cursor, page 500 by OFFSET)
        routes = [
            (
                "GET /appointments",
                api, "/appointments", {"limit": str(PAGE)},
                {"limit": str(PAGE), "before": appointments_cursor(last_before)},
                (appointments.list_query([]), listing),
                (appointments.list_query(["before"]), {**listing, "before_at": last_before["start_date"], "before_id": last_before["id"]}),
                (with_offset(appointments.list_query([])), {**listing, "offset": SKIPPED}),
            ),
            (
                f"GET /appointments?physician_id= ({busy_rows:,} rows)",
                api, "/appointments", {"physician_id": busy_id, "limit": str(PAGE)},
                {"physician_id": busy_id, "limit": str(PAGE), "before": appointments_cursor(last_busy)},
                (appointments.list_query(["physician_id"]), busy_listing),
                (appointments.list_query(["physician_id", "before"]), {**busy_listing, "before_at": last_busy["start_date"], "before_id": last_busy["id"]}),
                (with_offset(appointments.list_query(["physician_id"])), {**busy_listing, "offset": SKIPPED}),
            ),
            (
                "GET /billing-entries",
                worker, "/billing-entries", {"limit": str(PAGE)},
                {"limit": str(PAGE), "before": paging.list_cursor("entries", entry)},
                (billing_worker.LIST_ENTRIES, {"limit": PAGE + 1}),
                (billing_worker.LIST_ENTRIES_BEFORE, {"limit": PAGE + 1, "before_at": entry.at, "before_id": entry.id}),
                (with_offset(billing_worker.LIST_ENTRIES), {"limit": PAGE + 1, "offset": SKIPPED}),
            ),
            (
                f"GET /billing-entries/changes (after {FEED_SKIPPED:,})",
                worker, "/billing-entries/changes", {"limit": str(PAGE)},
                {"limit": str(PAGE), "after": paging.feed_cursor(paging.FeedPosition(int(last_fed["txid"]), last_fed["appointment_id"]))},
                (feed.FEED_FROM_START, {"limit": PAGE}),
                (feed.FEED_AFTER, {"limit": PAGE, **fed}),
                (with_offset(feed.FEED_FROM_START), {"limit": PAGE, "offset": FEED_SKIPPED}),
            ),
        ]
        for label, client, path, first, deep, first_sql, deep_sql, offset_sql in routes:
            say(f"  timing {label}")
            # The deep page by cursor is the page OFFSET gives: the bench measures the right rows.
            by_cursor = client.simulate_get(path, params=deep).json
            by_cursor = by_cursor["entries"] if isinstance(by_cursor, dict) else by_cursor
            key = "id" if path == "/appointments" else "appointment_id"
            by_offset = observer.execute(*offset_sql).fetchall()[:PAGE]
            assert [item[key] for item in by_cursor] == [str(row[key]) for row in by_offset], label
            first_ms, deep_ms = median_ms(client, path, [first, deep], PAGE)
            _, _, first_buffers = explain_ms(observer, *first_sql)
            _, _, deep_buffers = explain_ms(observer, *deep_sql)
            offset_ms, offset_plan, offset_buffers = explain_ms(observer, *offset_sql)
            results.append((label, first_ms, deep_ms, offset_ms, first_buffers, deep_buffers, offset_buffers, offset_plan))
    observer.close()
    return results


def machine(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        version = conn.execute("SELECT version()").fetchone()[0]
        settings = dict(conn.execute("SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN ('shared_buffers', 'work_mem', 'jit')").fetchall())
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{n:.1f}" for n in os.getloadavg())
    return [
        f"machine: nproc {cpus}, {platform.machine()}, Linux {platform.release()}, Python {platform.python_version()}; "
        f"load average {load} (anything else running shows here)",
        f"PostgreSQL: {version}",
        f"  shared_buffers {int(settings['shared_buffers'].removesuffix('8kB')) * 8 // 1024} MB, work_mem {settings['work_mem']}, jit {settings['jit']}",
    ]


def table(rows: int, results: list[tuple]) -> str:
    header = ("route", "first page ms", f"page {DEEP_PAGE} ms", "OFFSET ms", "buffers: first", f"page {DEEP_PAGE}", "OFFSET")
    lines = [
        (label, f"{first:.2f}", f"{deep:.2f}", f"{offset:.1f}", f"{first_b:,}", f"{deep_b:,}", f"{offset_b:,}")
        for label, first, deep, offset, first_b, deep_b, offset_b, _ in results
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    fmt = "  ".join(["{:<%d}" % widths[0]] + ["{:>%d}" % w for w in widths[1:]])
    out = [
        f"{rows:,} appointments; pages of {PAGE}; page {DEEP_PAGE} by its cursor (rows {SKIPPED + 1:,}-{SKIPPED + PAGE:,}; "
        f"the feed: entries {FEED_SKIPPED + 1:,}-{FEED_SKIPPED + PAGE:,}), median of {REPEATS} requests through the app "
        "(falcon TestClient, real pool, request log lines off);",
        f"OFFSET: the same page by OFFSET {SKIPPED:,} ({FEED_SKIPPED:,} for the feed) in SQL, EXPLAIN (ANALYZE, TIMING OFF), median of 3;",
        "buffers: shared buffers (hit + read) each page's SQL touches, from EXPLAIN (ANALYZE, BUFFERS)",
        "",
        fmt.format(*header),
        fmt.format(*("-" * w for w in widths)),
        *(fmt.format(*line) for line in lines),
        "",
        "the OFFSET plans:",
        *(f"  {label}: {plan}" for label, *_, plan in results),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="appointments to load (default 1,000,000)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="a superuser's connection string; the scratch database is made on that server")
    parser.add_argument("--keep", action="store_true", help="leave the scratch database for a look (prints its name)")
    args = parser.parse_args(argv)
    if args.rows < (SKIPPED + PAGE) * 10 + OPEN:
        parser.error(f"--rows must be at least {(SKIPPED + PAGE) * 10 + OPEN:,}: the busy physician (a tenth of the rows) needs {DEEP_PAGE} pages")

    def on_term(signum, frame):
        raise KeyboardInterrupt  # unwinds to the finally below, which drops the database

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (a background job)
    # Warnings only: not a JSON line per request on the terminal (the README puts that line at
    # about 9 µs of the request's time).
    setup_logging("bench", "WARNING", "json")
    name = f"clinic_bench_{uuid.uuid4().hex[:10]}"
    admin = args.database_url
    url = psycopg.conninfo.make_conninfo(admin, dbname=name)
    started = time.perf_counter()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        say(f"scratch database {name}")
        apply_schema(url)
        load(url, args.rows)
        loaded = time.perf_counter()
        results = measure(url)
        print("\n".join(machine(url)))
        print(table(args.rows, results))
        print(f"(load {loaded - started:.0f} s, measurements {time.perf_counter() - loaded:.0f} s)")
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not stop the clean-up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if args.keep:
            say(f"kept {name}: DROP DATABASE {name} when done")
        else:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            say(f"dropped {name}")


if __name__ == "__main__":
    sys.exit(main())
