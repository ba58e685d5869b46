"""Billing worker: turns every queued charge into exactly one billing entry; its command line.

    python billing_worker.py            # work forever; HTTP on BILLING_PORT (default 8081): the
                                        # ledger's entries, listings and change feed (ledger.py)
    python billing_worker.py --once     # bill everything that is due, print a summary, exit 0
    python billing_worker.py requeue    # make failed charges pending again
    python billing_worker.py reconcile  # check the ledger against the appointments; exit 1 on a mismatch

Exactly once: a charge is claimed, written and marked billed in one transaction (one statement,
CLAIM_AND_BILL). It commits whole or not at all: a worker that dies before the commit leaves the
rows pending for the next pass, and one that dies just after (or while the statement runs on, the
server finishing it) leaves them billed, once, only not logged by that worker. The primary key of
billing_entries is the last line of defence.

Between passes it waits for a NOTIFY from the end's transaction (db.Listen), or the poll interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import threading
import time

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

import auth
import db
import ledger
import reconcile
from config import load_config_or_exit
from db import make_pool
from telemetry import WorkerMetrics, get_logger, setup_logging
from web import make_server, on_stop_signals, serve_in_thread

log = get_logger("clinic.billing")

CHANNEL = "billing_queue"
# A worker frozen inside a transaction (SIGSTOP, a stuck VM) loses its session after this long,
# which rolls its batch back and frees the rows for the other workers. The fast path is a single
# statement, never idle in a transaction; this bounds the row-by-row path, which holds one open
# between its savepoints.
WORKER_SESSION = {"idle_in_transaction_session_timeout": "5s", "statement_timeout": "60s"}
# A batch ends within this long on our side of the socket, also on a server that does not answer
# (db.within): the fast path's one statement takes a fraction of a second for 5,000 rows. A batch cut short
# may have committed or not; either way each of its charges is billed once (the module's
# docstring). The row-by-row path, after a row's error, takes at most ROW_BY_ROW_BATCH rows, a
# savepoint and a statement each, within ROW_BY_ROW_DEADLINE_SECONDS: small enough to finish on a
# slow or distant server, so that the bad row gets its attempt counted and its backoff, and the
# next fast batch steps past it (cut short, the attempt would roll back, and the same row would
# send every pass down the slow path again).
BATCH_DEADLINE_SECONDS = 10
ROW_BY_ROW_BATCH = 500
ROW_BY_ROW_DEADLINE_SECONDS = 60
MAX_BACKOFF_SECONDS = 3600
# A failed pass (no database, no leader) is tried again after 0.25 s, then 0.5, 1, 2 s at most.
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.25, 2.0
HTTP_THREADS = 4

# Due rows, oldest first; rows another worker holds are skipped, not waited for. The index
# billing_queue_due serves it.
CLAIM = """
SELECT appointment_id, total_price, request_id
FROM billing_queue
WHERE status = 'pending' AND available_at <= now()
ORDER BY available_at, appointment_id
LIMIT %(batch_size)s
FOR UPDATE SKIP LOCKED
"""

# The fast path: claim, charge and mark a whole batch in one statement, so in one transaction.
CLAIM_AND_BILL = f"""
WITH due AS ({CLAIM}), charged AS (
    INSERT INTO billing_entries (appointment_id, total_price)
    SELECT appointment_id, total_price FROM due
    ON CONFLICT (appointment_id) DO NOTHING
)
UPDATE billing_queue q
SET status = 'billed', processed_at = now(), attempts = q.attempts + 1
FROM due
WHERE q.appointment_id = due.appointment_id
RETURNING q.appointment_id, q.request_id
"""

# The slow path, after the fast one failed: CLAIM, then each row on its own savepoint so that
# one bad row cannot hold back the rest.
BILL_ONE = """
WITH charged AS (
    INSERT INTO billing_entries (appointment_id, total_price)
    VALUES (%(appointment_id)s, %(total_price)s)
    ON CONFLICT (appointment_id) DO NOTHING
)
UPDATE billing_queue
SET status = 'billed', processed_at = now(), attempts = attempts + 1
WHERE appointment_id = %(appointment_id)s
"""

# Exponential backoff (2, 4, 8 ... s, at most an hour); after max_attempts the row is 'failed'.
RECORD_FAILURE = """
UPDATE billing_queue
SET attempts = attempts + 1,
    last_error = %(error)s,
    available_at = now() + least(power(2, attempts + 1), %(max_backoff)s) * interval '1 second',
    status = CASE WHEN attempts + 1 >= %(max_attempts)s THEN 'failed' ELSE 'pending' END
WHERE appointment_id = %(appointment_id)s
RETURNING status, attempts
"""

REQUEUE_FAILED = """
UPDATE billing_queue
SET status = 'pending', attempts = 0, available_at = now()
WHERE status = 'failed'
"""



# SQLSTATE classes that mean the data of a row is at fault: 22 data exception, 23 integrity
# constraint violation, P0001 raised by a trigger. Anything else (connection lost, session ended by
# idle_in_transaction_session_timeout, a missing table or privilege after a bad deploy, a read-only
# server) is the system's fault: the whole pass is retried later and no row spends an attempt.
ROW_FAULT_SQLSTATES = ("22", "23", "P0001")


def is_row_error(conn: psycopg.Connection, exc: psycopg.Error) -> bool:
    """Whether retrying row by row, and counting an attempt against each row, makes sense."""
    sqlstate = exc.sqlstate or ""
    return not conn.closed and sqlstate.startswith(ROW_FAULT_SQLSTATES)


@dataclasses.dataclass
class Tally:
    billed: int = 0
    retried: int = 0
    failed: int = 0

    def add(self, other: Tally) -> None:
        self.billed += other.billed
        self.retried += other.retried
        self.failed += other.failed


class Biller:
    """Runs batches against the database; knows nothing of signals, LISTEN or HTTP."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, batch_size: int, max_attempts: int, metrics: WorkerMetrics | None = None):
        self._pool = pool
        self._batch_size = batch_size
        self._max_attempts = max_attempts
        self._metrics = metrics or WorkerMetrics()

    def batch(self, conn: psycopg.Connection, reason: str = "poll") -> tuple[int, Tally, bool]:
        """One transaction: (rows claimed, what became of them, whether it claimed all it asked
        for, so that more may be due); ``reason`` is why its pass started."""
        started = time.perf_counter()
        claimed, tally, full = self._batch(conn)
        seconds = time.perf_counter() - started
        self._count(tally, seconds)
        log.log(logging.INFO if claimed else logging.DEBUG, "batch", rows=claimed, wake_reason=reason,
                duration_ms=round(seconds * 1000, 3), **dataclasses.asdict(tally))
        return claimed, tally, full

    def _batch(self, conn: psycopg.Connection) -> tuple[int, Tally, bool]:
        try:
            # One statement on an autocommit connection is one transaction, without the round
            # trips of a BEGIN and a COMMIT.
            with db.within(BATCH_DEADLINE_SECONDS):
                billed = conn.execute(CLAIM_AND_BILL, {"batch_size": self._batch_size}).fetchall()
            if log.is_enabled_for(logging.DEBUG):
                for appointment_id, request_id in billed:
                    log.debug("charge_billed", appointment_id=str(appointment_id), request_id=request_id)
            return len(billed), Tally(billed=len(billed)), len(billed) == self._batch_size
        except psycopg.Error as exc:
            if not is_row_error(conn, exc):
                raise  # connection or server trouble: nothing was billed, the rows stay pending
            log.warning("batch_failed_billing_row_by_row", error=exc.__class__.__name__)
            limit = min(self._batch_size, ROW_BY_ROW_BATCH)
            with db.within(ROW_BY_ROW_DEADLINE_SECONDS):
                claimed, tally = self._row_by_row(conn, limit)
            return claimed, tally, claimed == limit

    def _count(self, tally: Tally, seconds: float) -> None:
        m = self._metrics
        m.batch_duration.observe(seconds)
        for outcome, n in dataclasses.asdict(tally).items():
            if n:
                m.charges.labels(outcome).inc(n)
        m.last_pass.set_to_current_time()

    def _row_by_row(self, conn: psycopg.Connection, limit: int) -> tuple[int, Tally]:
        tally = Tally()
        with conn.transaction():
            rows = conn.cursor(row_factory=dict_row).execute(CLAIM, {"batch_size": limit}).fetchall()
            for row in rows:
                try:
                    with conn.transaction():  # a savepoint
                        conn.execute(BILL_ONE, row)
                    tally.billed += 1
                    log.debug("charge_billed", appointment_id=str(row["appointment_id"]), request_id=row["request_id"])
                except psycopg.Error as exc:
                    if not is_row_error(conn, exc):
                        raise
                    self._record_failure(conn, row, exc, tally)
        return len(rows), tally

    def _record_failure(self, conn, row, exc: psycopg.Error, tally: Tally) -> None:
        error = f"{exc.__class__.__name__}: {str(exc).strip()}"[:2000]
        status, attempts = conn.execute(
            RECORD_FAILURE,
            {
                "appointment_id": row["appointment_id"],
                "error": error,
                "max_attempts": self._max_attempts,
                "max_backoff": MAX_BACKOFF_SECONDS,
            },
        ).fetchone()
        charge = {"appointment_id": str(row["appointment_id"]), "request_id": row["request_id"], "attempts": attempts, "error": error}
        if status == "failed":
            tally.failed += 1
            log.error("charge_failed_needs_attention", **charge)
        else:
            tally.retried += 1
            log.warning("charge_failed_will_retry", max_attempts=self._max_attempts, **charge)

    def drain(self, stop: threading.Event | None = None, reason: str = "poll") -> Tally:
        """Batches until nothing is due (or stop is set); ``reason`` is why this pass started."""
        total = Tally()
        with self._pool.connection(timeout=2) as conn:
            while stop is None or not stop.is_set():
                _, tally, full = self.batch(conn, reason)
                total.add(tally)
                if not full:
                    break
        return total

    def requeue(self) -> int:
        with self._pool.connection() as conn, conn.transaction():
            return conn.execute(REQUEUE_FAILED).rowcount


# After a failover, LISTEN on the new leader within a fraction of a second of it taking writes: as
# often as the pool retries (db.LeaderPool.RETRY_SPACING).
LISTEN_RECONNECT_SECONDS = 0.25


def work(biller: Biller, listen: db.Listen | None, poll_seconds: float, stop: threading.Event, metrics: WorkerMetrics) -> None:
    """Drain, then wait for a NOTIFY or the poll interval; until stop is set. ``listen`` None:
    never LISTEN, every wait lasts the poll interval (BILLING_LISTEN=off)."""
    reason = "poll"  # the first pass, at start, is the poll that finds what waited meanwhile
    retry_in = RETRY_FIRST_SECONDS
    while not stop.is_set():
        metrics.wakeups.labels(reason).inc()
        try:
            biller.drain(stop, reason)
        except psycopg.Error as exc:  # PoolTimeout too
            # The database went away (a failover: soon back on the new leader), our session was
            # ended, or the schema is not applied yet: nothing was billed by the failed
            # transaction; stay up and try again, soon at first, then less often.
            log.warning("billing_pass_failed_will_retry", error=f"{exc.__class__.__name__}: {str(exc).strip()}", retry_in_s=round(retry_in, 2))
            # Its LISTEN connection may lead to the server that just failed (one frozen after a
            # failover, say, that the pool's monitor did not cut): LISTEN afresh.
            if listen is not None:
                listen.close()
            stop.wait(retry_in * random.uniform(0.8, 1.2))
            retry_in = min(retry_in * 2, RETRY_MAX_SECONDS)
            reason = "poll"
            continue
        retry_in = RETRY_FIRST_SECONDS
        if listen is None:
            stop.wait(poll_seconds)
            reason = "poll"
        else:  # a fresh LISTEN ("listen") looks too: rows may have come while nobody listened
            why = listen.wait(poll_seconds)
            reason = "poll" if why in (None, "timeout") else why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="clinic-billing worker")
    parser.add_argument("command", nargs="?", choices=["work", "requeue", "reconcile"], default="work")
    parser.add_argument("--once", action="store_true", help="bill everything due, print a summary and exit")
    args = parser.parse_args(argv)
    stop = threading.Event()
    # First, so that even a SIGTERM during start-up exits cleanly. Set from another thread: the
    # handler runs in the main thread, which may hold the Event's lock inside stop.wait().
    on_stop_signals(lambda: threading.Thread(target=stop.set).start())
    config = load_config_or_exit()
    setup_logging("billing-worker", config.log_level, config.log_format)
    one_shot = args.command != "work" or args.once
    if args.command == "reconcile":
        # Whole-table reads on a connection of its own, without the statement_timeout that the
        # worker's role and sessions carry: a large ledger is read to the end.
        pool = make_pool(config, "billing-reconcile", max_size=1, monitor=False, statement_timeout="0", idle_in_transaction_session_timeout="0")
    else:
        pool = make_pool(config, "billing-worker", max_size=4, monitor=not one_shot, **WORKER_SESSION)
    metrics = WorkerMetrics(pool, config.poll_seconds)
    biller = Biller(pool, config.batch_size, config.max_attempts, metrics)

    if one_shot:
        return run_command(args.command, biller, pool, stop)

    pool.open(wait=False)
    bell = ledger.LedgerBell(pool)
    # Requests waiting on the feed each hold a thread: HTTP_THREADS more serve everything else.
    server = make_server(ledger.create_app(config, pool, metrics, bell), config.billing_port, threads=HTTP_THREADS + config.feed_max_waiters)
    serve_in_thread(server)
    listen = db.Listen(pool, CHANNEL, "billing-worker-listen", LISTEN_RECONNECT_SECONDS, stop) if config.listen else None
    log.info("billing_worker_up", port=config.billing_port, poll_seconds=config.poll_seconds, listen=config.listen)
    auth.warn_if_open(log, config.api_token_hashes)
    try:
        work(biller, listen, config.poll_seconds, stop, metrics)
    finally:
        if listen is not None:
            listen.close()
        bell.close()  # waiting requests answer now, with what they have
        server.task_dispatcher.shutdown(timeout=1)
        pool.close()
    log.info("billing_worker_stopped")
    return 0


def run_command(command: str, biller: Biller, pool: psycopg_pool.ConnectionPool, stop: threading.Event) -> int:
    """requeue, reconcile or --once: prints one JSON object. Exit 0; 1 when reconcile found a
    mismatch; 2 when the database is unavailable or refused the work (nothing printed on stdout)."""
    exit_code = 0
    try:
        pool.open(wait=True, timeout=10)
        if command == "requeue":
            result = {"requeued": biller.requeue()}
        elif command == "reconcile":
            result = reconcile.reconcile(pool)
            exit_code = 1 if reconcile.mismatched(result) else 0
        else:
            result = dataclasses.asdict(biller.drain(stop))
    except psycopg.OperationalError as exc:
        print(f"database unavailable: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:  # a missing table, a missing privilege
        print(f"database error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        pool.close()
    print(json.dumps(result, indent=2 if command == "reconcile" else None))
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
