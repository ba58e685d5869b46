"""What the billing service serves over HTTP: the ledger's entries, one by one and newest first,
and its change feed, every entry once, in a stable order, from any cursor on. ``create_app`` builds
the service's Falcon app; billing_worker.py runs it beside the worker loop.

The change feed's reading: an entry's position is (txid, appointment_id), and a page holds only
entries whose txid is below the xmin of the reading statement's snapshot: every transaction with a
smaller id has ended, so nothing can appear later below a position already handed out (schema.sql,
"The change feed", says why ordering by time or a sequence would skip entries).

Waiting (``wait`` > 0 and nothing new): a request holds neither a pool connection nor a database
session while it waits. One LISTEN connection per process (``LedgerBell``, started by the first
waiting request) hears the NOTIFY that billing_entries' trigger sends at each commit and wakes the
waiting requests, which read again. At most ``max_waiters`` requests wait at once, so that the
waitress threads left over keep serving everything else; one more is answered 503 at once. The
request's deadline (web.Deadlines) is moved later by ``wait``: the wait is not the database's time.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import falcon
import psycopg_pool
from psycopg.rows import dict_row

import auth
import db
import paging
from config import Config
from paging import FeedPosition
from telemetry import WorkerMetrics, get_logger
from web import Problem, base_app, format_timestamp, money, parse_uuid, send

log = get_logger("clinic.ledger")

CHANNEL = "billing_entries"
# Entries committed but held behind an older transaction still running: no NOTIFY says when it
# ends (it may not even write to the ledger), so a waiting request looks again this often.
HELD_RECHECK_SECONDS = 0.1

_COLUMNS = "appointment_id, total_price, created_at, txid::text AS position_txid"

# Served by billing_entries_feed: one index range, in order, up to the horizon.
FEED_FROM_START = f"""
SELECT {_COLUMNS}
FROM billing_entries
WHERE txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY txid, appointment_id
LIMIT %(limit)s
"""

FEED_AFTER = f"""
SELECT {_COLUMNS}
FROM billing_entries
WHERE (txid, appointment_id) > (%(txid)s::xid8, %(appointment_id)s)
  AND txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY txid, appointment_id
LIMIT %(limit)s
"""

# A cursor is good when it names an entry the feed has handed out: one that exists and is below
# the horizon. Entries are never removed, so a cursor that once was good stays good.
POSITION = """
SELECT txid < pg_snapshot_xmin(pg_current_snapshot()) AS released,
       txid >= pg_snapshot_xmax(pg_current_snapshot()) AS ahead
FROM billing_entries
WHERE txid = %(txid)s::xid8 AND appointment_id = %(appointment_id)s
"""

# After an empty page: are entries committed above the horizon (held back by an older transaction
# still running), and are any beyond what this server's transactions can have written (a pg_dump
# restored into a new cluster: the guard trigger in schema.sql)? Both index probes.
BEYOND_HORIZON = """
SELECT EXISTS (SELECT 1 FROM billing_entries WHERE txid >= pg_snapshot_xmin(pg_current_snapshot())) AS held,
       EXISTS (SELECT 1 FROM billing_entries WHERE txid >= pg_snapshot_xmax(pg_current_snapshot())) AS ahead
"""


class LedgerBell:
    """One LISTEN connection per process on CHANNEL (db.Listen); any number of threads wait for it
    to ring.

    ``generation`` goes up at every notification, at every fresh LISTEN (entries may have been
    committed while nobody listened) and, while there is no connection, once a second, so that
    waiting requests fall back to reading once a second instead of waiting for nothing.
    """

    RECONNECT_EVERY = 1.0

    def __init__(self, pool: db.LeaderPool):
        self._pool = pool
        self._ringing = threading.Condition()
        self._generation = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        return self._generation

    def wait(self, seen: int, timeout: float) -> None:
        """Until the bell rang after ``seen`` was read, ``timeout`` passed, or the bell closed."""
        self._start()
        with self._ringing:
            self._ringing.wait_for(lambda: self._generation != seen or self._stop.is_set(), timeout)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        with self._ringing:
            self._stop.set()
            self._ringing.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _start(self) -> None:
        with self._ringing:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._listen, name="ledger-bell", daemon=True)
                self._thread.start()

    def _ring(self) -> None:
        with self._ringing:
            self._generation += 1
            self._ringing.notify_all()

    def _listen(self) -> None:
        listen = db.Listen(self._pool, CHANNEL, "billing-feed-listen", self.RECONNECT_EVERY, self._stop)
        try:
            while not self._stop.is_set():
                try:
                    why = listen.wait(self.RECONNECT_EVERY)
                except Exception:  # noqa: BLE001 - this thread must outlive anything; waiters poll meanwhile
                    log.exception("feed_listen_failed_polling")
                    listen.close()
                    self._stop.wait(self.RECONNECT_EVERY)
                    why = "timeout"
                if why in ("notify", "listen") or (why == "timeout" and not listen.listening):
                    self._ring()
        finally:
            listen.close()


class Feed:
    """Pages of the change feed, read through the pool; waits on the bell without a connection."""

    def __init__(self, pool: db.LeaderPool, bell: LedgerBell, max_waiters: int):
        self._pool = pool
        self._bell = bell
        self._max_waiters = max_waiters
        self._waiters = threading.BoundedSemaphore(max_waiters) if max_waiters else None

    def read(self, after: FeedPosition | None, limit: int, wait: float) -> list[dict[str, Any]]:
        """The entries past ``after`` (the start when None), at most ``limit``; when there are none
        and ``wait`` > 0, the first that commit within ``wait`` seconds ([] if none do)."""
        with db.extend_deadline(wait):
            return self._read(after, limit, wait)

    def _read(self, after: FeedPosition | None, limit: int, wait: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + wait
        seen = self._bell.generation  # before reading: a ring after this is never missed
        rows, held = self._page(after, limit, check_cursor=True)
        if rows or wait <= 0:
            return rows
        if self._waiters is None or not self._waiters.acquire(blocking=False):
            raise Problem(
                503,
                f"wait: {self._max_waiters} requests are waiting for new entries already, the most this service holds; "
                "retry shortly, or poll with wait=0",
                {"Retry-After": "1"},
            )
        try:
            while not self._bell.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._bell.wait(seen, min(remaining, HELD_RECHECK_SECONDS) if held else remaining)
                seen = self._bell.generation
                rows, held = self._page(after, limit)
                if rows:
                    return rows
            return []
        finally:
            self._waiters.release()

    def _page(self, after: FeedPosition | None, limit: int, check_cursor: bool = False) -> tuple[list[dict[str, Any]], bool]:
        """(rows, whether entries are committed but held back above the horizon)."""
        with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            if after is None:
                rows = cur.execute(FEED_FROM_START, {"limit": limit}).fetchall()
            else:
                position = {"txid": str(after.txid), "appointment_id": after.appointment_id}
                if check_cursor:
                    found = cur.execute(POSITION, position).fetchone()
                    if found is not None and found["ahead"]:
                        raise positions_ahead()  # the cursor is good; the server is not
                    if found is None or not found["released"]:
                        raise Problem(
                            400,
                            "after: no entry of this ledger is at that position: the cursor comes from another "
                            "ledger, or from its future (was the database restored from an older backup?)",
                        )
                rows = cur.execute(FEED_AFTER, {**position, "limit": limit}).fetchall()
            if rows:
                return rows, False
            beyond = cur.execute(BEYOND_HORIZON).fetchone()
        if beyond["ahead"]:
            raise positions_ahead()
        return rows, beyond["held"]


def positions_ahead() -> Problem:
    """The ledger holds entries no transaction of this server can have written (a dump restored
    into a new cluster): no answer would be right until the server's counter is moved past them."""
    log.error("feed_positions_ahead_of_the_server")
    return Problem(
        503,
        "the ledger holds positions ahead of this server's transaction ids (a dump restored into a new cluster?); "
        "see docs/operations.md, Loading a dump",
        {"Retry-After": "60"},
    )


def last_position(rows: list[dict[str, Any]]) -> FeedPosition:
    last = rows[-1]
    return FeedPosition(int(last["position_txid"]), last["appointment_id"])


# ---------------------------------------------------------------------------------------------
# The HTTP resources, read-only.

# One entry by its key (the primary key).
SELECT_ENTRY = """
SELECT appointment_id, total_price, created_at FROM billing_entries WHERE appointment_id = %(id)s
"""

# Newest first, one more row than the page shows (there is a next page when it comes); served by
# the index billing_entries_newest, read from the cursor on (keyset, never OFFSET).
LIST_ENTRIES = """
SELECT appointment_id, total_price, created_at
FROM billing_entries
ORDER BY created_at DESC, appointment_id DESC
LIMIT %(limit)s
"""

LIST_ENTRIES_BEFORE = """
SELECT appointment_id, total_price, created_at
FROM billing_entries
WHERE (created_at, appointment_id) < (%(before_at)s, %(before_id)s)
ORDER BY created_at DESC, appointment_id DESC
LIMIT %(limit)s
"""


def entry_representation(row, config: Config) -> dict:
    return {
        "appointment_id": str(row["appointment_id"]),
        "total_price": money(row["total_price"]),
        "created_at": format_timestamp(row["created_at"], config.timezone),
    }


class BillingEntries:
    """/billing-entries"""

    def __init__(self, pool: psycopg_pool.ConnectionPool, config: Config):
        self._pool, self._config = pool, config

    def on_get(self, req, resp):
        params = paging.query_params(req.params, ("limit", "before"))
        limit = paging.limit_param(params)
        query, args = LIST_ENTRIES, {"limit": limit + 1}
        if "before" in params:
            before = paging.parse_list_cursor("entries", params["before"])
            query, args = LIST_ENTRIES_BEFORE, {**args, "before_at": before.at, "before_id": before.id}
        with self._pool.connection() as conn:
            rows = conn.cursor(row_factory=dict_row).execute(query, args).fetchall()
        if len(rows) > limit:
            rows = rows[:limit]
            cursor = paging.list_cursor("entries", paging.ListPosition(rows[-1]["created_at"], rows[-1]["appointment_id"]))
            resp.set_header("Link", paging.next_link(req.path, {"limit": limit, "before": cursor}))
        send(resp, 200, [entry_representation(row, self._config) for row in rows])

    on_head = on_get


class BillingEntryChanges:
    """/billing-entries/changes"""

    def __init__(self, ledger_feed: Feed, config: Config):
        self._feed, self._config = ledger_feed, config

    def on_get(self, req, resp):
        params = paging.query_params(req.params, ("after", "limit", "wait"))
        after = paging.parse_feed_cursor(params["after"]) if "after" in params else None
        limit = paging.limit_param(params)
        wait = paging.whole_number(params, "wait", 0, 0, 30, unit=" of seconds")
        rows = self._feed.read(after, limit, wait)
        if rows:
            cursor = paging.feed_cursor(last_position(rows))
        else:  # nothing new: the cursor that was sent, as it was sent
            cursor = params.get("after", paging.FEED_START)
        send(resp, 200, {"entries": [entry_representation(row, self._config) for row in rows], "cursor": cursor})

    on_head = on_get


class BillingEntry:
    """/billing-entries/{appointment_id}"""

    def __init__(self, pool: psycopg_pool.ConnectionPool, config: Config):
        self._pool, self._config = pool, config

    def on_get(self, req, resp, appointment_id):
        key = parse_uuid(appointment_id, "appointment_id")
        with self._pool.connection() as conn:
            row = conn.cursor(row_factory=dict_row).execute(SELECT_ENTRY, {"id": key}).fetchone()
        if row is None:
            raise Problem(404, f"appointment_id: no billing entry for {key} (not ended, or not billed yet)")
        send(resp, 200, entry_representation(row, self._config))

    on_head = on_get


def create_app(
    config: Config, pool: psycopg_pool.ConnectionPool, metrics: WorkerMetrics | None = None, bell: LedgerBell | None = None
) -> falcon.App:
    """``bell`` starts its LISTEN connection only when a request first waits on the change feed;
    whoever made it closes it (one made here, when none is given, lives as long as the process)."""
    app = base_app(pool, metrics or WorkerMetrics(pool, config.poll_seconds), auth.guards(config.api_token_hashes), config.request_timeout)
    ledger_feed = Feed(pool, bell or LedgerBell(pool), config.feed_max_waiters)
    app.add_route("/billing-entries", BillingEntries(pool, config))
    app.add_route("/billing-entries/changes", BillingEntryChanges(ledger_feed, config))
    app.add_route("/billing-entries/{appointment_id}", BillingEntry(pool, config))
    return app
