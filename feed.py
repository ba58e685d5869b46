"""The ledger's change feed: every billing entry once, in a stable order, from any cursor on.

Reading: an entry's position is (txid, appointment_id), and a page holds only entries whose txid
is below the xmin of the reading statement's snapshot: every transaction with a smaller id has
ended, so nothing can appear later below a position already handed out (schema.sql, "The change
feed", says why ordering by time or a sequence would skip entries).

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

import psycopg
from psycopg.rows import dict_row

import db
from paging import FeedPosition
from telemetry import get_logger
from web import Problem

log = get_logger("clinic.feed")

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
    """One LISTEN connection per process on CHANNEL; any number of threads wait for it to ring.

    ``generation`` goes up at every notification, at every fresh LISTEN (entries may have been
    committed while nobody listened) and, while there is no connection, once a second, so that
    waiting requests fall back to reading once a second instead of waiting for nothing. The
    connection is the pool's (db.LeaderPool.connect_unpooled): cut when the pool's monitor finds
    the server not answering, so that it LISTENs again, on the new leader after a failover.
    """

    RECONNECT_EVERY = 1.0
    CONNECT_DEADLINE_SECONDS = 5

    def __init__(self, pool: db.LeaderPool):
        self._pool = pool
        self._ringing = threading.Condition()
        self._generation = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        return self._generation

    def wait(self, seen: int, timeout: float) -> None:
        """Until the bell rang after ``seen`` was read, ``timeout`` passed, or the bell closed."""
        self._start()
        with self._ringing:
            self._ringing.wait_for(lambda: self._generation != seen or self._stopping, timeout)

    @property
    def closed(self) -> bool:
        return self._stopping

    def close(self) -> None:
        with self._ringing:
            self._stopping = True
            self._ringing.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _start(self) -> None:
        with self._ringing:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._listen, name="ledger-bell", daemon=True)
                self._thread.start()

    def _ring(self) -> None:
        with self._ringing:
            self._generation += 1
            self._ringing.notify_all()

    def _listen(self) -> None:
        while not self._stopping:
            try:
                with db.within(self.CONNECT_DEADLINE_SECONDS):
                    conn = self._pool.connect_unpooled("billing-feed-listen")
                with conn:
                    with db.within(self.CONNECT_DEADLINE_SECONDS):
                        conn.execute(f"LISTEN {CHANNEL}")
                    self._ring()
                    while not self._stopping:
                        # Short slices, so that close() is honoured within half a second.
                        if any(True for _ in conn.notifies(timeout=0.5, stop_after=1)):
                            for _ in conn.notifies(timeout=0):
                                pass  # one ring serves every notification already queued
                            self._ring()
            except psycopg.Error as exc:
                log.warning("feed_listen_connection_lost_polling", error=str(exc).strip())
            except Exception:  # noqa: BLE001 - this thread must outlive anything; waiters poll meanwhile
                log.exception("feed_listen_failed_polling")
            deadline = time.monotonic() + self.RECONNECT_EVERY
            while not self._stopping and time.monotonic() < deadline:
                time.sleep(0.05)
            self._ring()


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
