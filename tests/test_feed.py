"""The ledger's change feed, GET /billing-entries/changes: every entry once, in order, from any cursor on.

The trap it exists for: workers commit batches concurrently, so entries become visible in commit
order, not in the order of their created_at. A consumer paging by created_at skips a batch that
commits after younger ones. These tests make that happen (real worker processes, a deliberately
slow one, a transaction held open by hand), show that a created_at consumer does skip, and check
that the feed consumer ends with exactly the ledger.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import subprocess
import threading
import time
import uuid

import falcon.testing
import psycopg
import pytest
import requests
from psycopg.rows import dict_row

import billing_worker
import ledger
import paging
from config import Config
from db import make_pool
from support import (
    Service,
    TempCluster,
    apply_schema,
    as_role,
    assert_billed_exactly_once,
    assert_problem,
    create_database,
    drop_database,
    free_port,
    make_backlog,
    run_worker_command,
    server_bindir,
    wait_until,
)

# A PostgreSQL cluster of this module's own (admin_url below): the processes tier.
pytestmark = pytest.mark.processes

CHANGES = "/billing-entries/changes"

# The feed's order, read straight from the table: what a consumer must end up with.
FEED_ORDER = "SELECT appointment_id::text AS id FROM billing_entries ORDER BY txid, appointment_id"

COUNTS = """
SELECT (SELECT count(*) FROM billing_queue WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM billing_queue) AS queued,
       (SELECT count(*) FROM billing_entries) AS entries
"""

# The trap, as a consumer falls into it: the next page is what comes after the last entry seen
# in (created_at, appointment_id) order.
NAIVE_PAGE = """
SELECT appointment_id::text AS id, created_at
FROM billing_entries
WHERE (created_at, appointment_id) > (%(at)s, %(id)s)
ORDER BY created_at, appointment_id
LIMIT 1000
"""
NAIVE_START = (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc), uuid.UUID(int=0))


# Every committed entry is below the horizon: the feed hands all of them out. The horizon is the
# oldest transaction still running on the whole server, so a write anywhere (another database,
# another test run on the same server) holds fresh entries back for its duration: a test that reads
# without waiting and expects entries waits for this first.
ALL_RELEASED = "SELECT NOT EXISTS (SELECT 1 FROM billing_entries WHERE txid >= pg_snapshot_xmin(pg_current_snapshot())) AS ok"


def released(conn, timeout: float = 10) -> None:
    wait_until(lambda: conn.execute(ALL_RELEASED).fetchone()["ok"], timeout, what="every entry below the feed's horizon")


def feed_order(conn) -> list[str]:
    return [row["id"] for row in conn.execute(FEED_ORDER).fetchall()]


def counts(conn) -> dict:
    return conn.execute(COUNTS).fetchone()


def assert_no_duplicates(ids: list[str]) -> None:
    doubled = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    assert not doubled, f"{len(doubled)} entries handed out more than once, e.g. {doubled[:5]}"


def naive_page(conn, last):
    return conn.execute(NAIVE_PAGE, {"at": last[0], "id": last[1]}).fetchall()


def bill_once(url: str) -> subprocess.CompletedProcess:
    """python billing_worker.py --once, as the worker's database role."""
    return run_worker_command(url, "--once")


# --- a server of this module's own -------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_url(admin_url, databases):
    """A PostgreSQL cluster for these tests alone (the suite's server when none can be started).

    The feed's horizon is the oldest transaction running on the whole server: on a server that
    other test runs or benchmarks share, their long transactions would hold these tests' entries
    back for seconds, and timing assertions would fail for reasons that are not the feed's."""
    if server_bindir() is None:
        yield admin_url
        return
    cluster = TempCluster()
    try:
        cluster.start()
        yield cluster.url
    finally:
        databases.forget(cluster.url)
        cluster.destroy()


# --- in-process clients ---------------------------------------------------------------------------


@pytest.fixture
def bell(pool):
    """The feed's LISTEN connection, closed before the test's database is dropped."""
    bell = ledger.LedgerBell(pool)
    yield bell
    bell.close()


@pytest.fixture
def feed_api(config, pool, bell):
    return falcon.testing.TestClient(ledger.create_app(config, pool, bell=bell))


def changes(client, **params):
    """One GET of the feed through a falcon TestClient; None values are left out."""
    return client.simulate_get(CHANGES, params={k: str(v) for k, v in params.items() if v is not None})


def follow(client, after=None, limit=100):
    """Pages until an empty one: (the appointment ids in the order handed out, the last cursor)."""
    ids, cursor = [], after
    for _ in range(10_000):
        page = changes(client, after=cursor, limit=limit)
        assert page.status_code == 200, page.text
        if not page.json["entries"]:
            assert page.json["cursor"] == (cursor or paging.FEED_START)
            return ids, page.json["cursor"]
        assert len(page.json["entries"]) <= limit
        ids += [entry["appointment_id"] for entry in page.json["entries"]]
        cursor = page.json["cursor"]
    raise AssertionError("the feed never ran dry")


def problem(response, status: int) -> str:
    """The detail of an answer that must be problem details with this status."""
    return assert_problem(response, status)["detail"]


# --- consumers and a clinic, run as threads next to real processes ---------------------------------


class FeedConsumer(threading.Thread):
    """Follows a worker's feed over HTTP, page after page with a long poll, as a downstream system does.

    After ``drained`` is set, the first empty page it asked for after that ends it."""

    def __init__(self, base_url: str, limit: int = 37, wait: int = 1):
        super().__init__(daemon=True, name=f"feed-consumer-{limit}")
        self.url, self.limit, self.wait = base_url + CHANGES, limit, wait
        self.ids: list[str] = []
        self.received_at: dict[str, float] = {}
        self.cursor: str | None = None
        self.live = 0  # entries received before the ledger was drained
        self.drained = threading.Event()
        self.errors: list[str] = []

    def run(self):
        try:
            with requests.Session() as http:
                while True:
                    final = self.drained.is_set()
                    params = {"limit": self.limit, "wait": self.wait, **({"after": self.cursor} if self.cursor else {})}
                    page = http.get(self.url, params=params, timeout=self.wait + 20)
                    if page.status_code != 200:
                        self.errors.append(f"{page.status_code} {page.text}")
                        return
                    body, now = page.json(), time.time()
                    if not body["entries"] and body["cursor"] != (self.cursor or paging.FEED_START):
                        self.errors.append(f"an empty page moved the cursor: {body}")
                        return
                    for entry in body["entries"]:
                        self.ids.append(entry["appointment_id"])
                        self.received_at.setdefault(entry["appointment_id"], now)
                    self.cursor = body["cursor"]
                    if not final:
                        self.live = len(self.ids)
                    elif not body["entries"]:
                        return
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(exc))


class NaiveConsumer(threading.Thread):
    """The negative control: reads billing_entries in (created_at, appointment_id) order, every 20 ms."""

    def __init__(self, url: str):
        super().__init__(daemon=True, name="naive-consumer")
        self.url = url
        self.seen: list[tuple[str, dt.datetime, float]] = []  # (id, created_at, when it was read)
        self.drained = threading.Event()
        self.errors: list[str] = []

    def run(self):
        try:
            with psycopg.connect(self.url, autocommit=True, row_factory=dict_row) as conn:
                last = NAIVE_START
                while True:
                    final = self.drained.is_set()
                    rows = naive_page(conn, last)
                    now = time.time()
                    self.seen += [(row["id"], row["created_at"], now) for row in rows]
                    if rows:
                        last = (rows[-1]["created_at"], uuid.UUID(rows[-1]["id"]))
                    elif final:
                        return
                    else:
                        time.sleep(0.02)
        except Exception as exc:  # noqa: BLE001
            self.errors.append(repr(exc))


class Clinic:
    """Threads that start and end appointments through a real appointments.py until stopped."""

    def __init__(self, base_url: str, threads: int = 2):
        self.base_url = base_url
        self.ended: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        with requests.Session() as http:
            while not self._stop.is_set():
                try:
                    body = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": "2020-12-01 13:00:00"}
                    started = http.post(self.base_url + "/appointments", json=body, timeout=10)
                    assert started.status_code == 201, started.text
                    end_url = f"{self.base_url}/appointments/{started.json()['id']}/end"
                    ended = http.post(end_url, json={"end_date": "2020-12-01 13:20:00"}, timeout=10)
                    assert ended.status_code == 200, ended.text
                    self.ended.append(started.json()["id"])
                except Exception as exc:  # noqa: BLE001
                    self.failures.append(repr(exc))
                    return

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture
def slow_workers(tmp_path):
    """Starts tests/slow_worker.py processes (as the worker's role); all stopped when the test ends."""
    started: list[Service] = []

    def start(database_url: str, **env) -> Service:
        env = {
            "DATABASE_URL": as_role(database_url, "billing_worker.py"),
            "BILLING_PORT": str(free_port()),
            **{k: str(v) for k, v in env.items()},
        }
        service = Service("tests/slow_worker.py", env, log_dir=tmp_path)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop(timeout=5)


def drain_and_follow(db, clinic: Clinic, consumers, backlog: int, tail: float = 2.0, timeout: float = 120):
    """Waits for the backlog to be billed while the clinic ends more, lets the clinic go on for
    ``tail`` seconds (its charges billed one or two at a time, with the consumers at the head of
    the feed), stops it, waits for the ledger to hold every charge, then lets the consumers read
    to an empty page."""
    try:
        wait_until(lambda: counts(db)["entries"] >= backlog, timeout, interval=0.2, what=f"{backlog} entries billed")
        time.sleep(tail)
        clinic.stop()
        assert not clinic.failures, clinic.failures[:3]
        wait_until(lambda: (c := counts(db))["pending"] == 0 and c["entries"] == c["queued"], 30, interval=0.1, what="the ledger drained")
        released(db)  # from here on, an empty page means the consumer has read everything
    finally:
        clinic.stop()
        for consumer in consumers:
            consumer.drained.set()
        for consumer in consumers:
            consumer.join(timeout=60)
    for consumer in consumers:
        assert not consumer.is_alive(), f"{consumer.name} did not finish"
        assert not consumer.errors, consumer.errors[:3]


def assert_followed_exactly(consumer: FeedConsumer, ledger_order: list[str]) -> None:
    assert_no_duplicates(consumer.ids)
    missed = set(ledger_order) - set(consumer.ids)
    assert not missed, f"{len(missed)} entries the feed never handed out to {consumer.name}, e.g. {sorted(missed)[:3]}"
    assert consumer.ids == ledger_order
    assert consumer.live > 0, f"{consumer.name} followed the feed while billing went on"


# --- 1 and 2: real processes under load -------------------------------------------------------------

WORKER_ENV = {"BILLING_POLL_SECONDS": "0.2", "BILLING_BATCH_SIZE": "50"}


def test_consumers_following_the_feed_while_3_workers_drain_20000_and_ends_keep_coming_get_every_entry_once(
    services, db_url, db
):
    """One consumer in pages of 37 (behind, crossing many page boundaries), one in pages of 1000
    (at the head, where commits race it), each from another worker process."""
    api = services("appointments.py", db_url).wait_healthy()
    workers = [services("billing_worker.py", db_url, **WORKER_ENV) for _ in range(3)]
    for worker in workers:
        worker.wait_healthy()
    consumers = [FeedConsumer(workers[0].base_url, limit=37, wait=1), FeedConsumer(workers[1].base_url, limit=1000, wait=1)]
    for consumer in consumers:
        consumer.start()
    make_backlog(db, 20000)  # no NOTIFY: the workers' poll finds it
    with Clinic(api.base_url, threads=2) as clinic:
        drain_and_follow(db, clinic, consumers, backlog=20000)

    ledger_order = feed_order(db)
    assert len(ledger_order) > 20000 and set(clinic.ended) <= set(ledger_order), "ends kept arriving"
    assert_billed_exactly_once(db, ended=len(ledger_order))
    for consumer in consumers:
        assert_followed_exactly(consumer, ledger_order)
    for worker in workers:
        assert worker.popen.poll() is None, worker.output()[-2000:]


def test_a_batch_committing_after_younger_ones_is_skipped_by_a_created_at_consumer_but_not_by_the_feed(
    services, slow_workers, db_url, db, tmp_path
):
    """Two normal workers and one whose every other batch sleeps 1 s before its commit."""
    api = services("appointments.py", db_url).wait_healthy()
    slow_log = tmp_path / "slowed.jsonl"
    workers = [services("billing_worker.py", db_url, **WORKER_ENV) for _ in range(2)]
    workers.append(slow_workers(db_url, SLOW_WORKER_LOG=slow_log, SLOW_WORKER_SECONDS="1.0", **WORKER_ENV))
    for worker in workers:
        worker.wait_healthy()
    consumers = [FeedConsumer(workers[0].base_url, limit=37, wait=1), FeedConsumer(workers[1].base_url, limit=1000, wait=1)]
    naive = NaiveConsumer(db_url)
    for consumer in (*consumers, naive):
        consumer.start()
    make_backlog(db, 6000)
    with Clinic(api.base_url, threads=1) as clinic:
        drain_and_follow(db, clinic, [*consumers, naive], backlog=6000)

    ledger_order = feed_order(db)
    assert_billed_exactly_once(db, ended=len(ledger_order))
    for consumer in consumers:
        assert_followed_exactly(consumer, ledger_order)

    # The trap was there: batches of the slow worker committed after younger entries (a later
    # created_at) had been read by the created_at consumer, which therefore never saw them.
    slowed = [json.loads(line) for line in slow_log.read_text().splitlines()]
    assert slowed, "the slow worker billed no batch"
    rows = db.execute("SELECT appointment_id::text AS id, created_at, txid::text::bigint AS txid FROM billing_entries").fetchall()
    created, txid = {r["id"]: r["created_at"] for r in rows}, {r["id"]: r["txid"] for r in rows}
    naive_ids = [seen[0] for seen in naive.seen]
    assert_no_duplicates(naive_ids)
    skipped = set(ledger_order) - set(naive_ids)
    trapped = []
    for batch in slowed:
        batch_created, batch_txid = min(created[i] for i in batch["ids"]), txid[batch["ids"][0]]
        younger = {i for i, at, read_at in naive.seen if at > batch_created and txid[i] > batch_txid and read_at < batch["committed_at"]}
        if younger and set(batch["ids"]) <= skipped:
            trapped.append((batch, younger))
    assert trapped, f"no slowed batch was skipped by the created_at consumer ({len(slowed)} slowed, {len(skipped)} skipped)"
    # The feed met it: the consumer at its head got those younger entries, committed before the
    # slowed batch, only once the slowed batch had committed too (and never lost the batch).
    head = consumers[1]
    held_back = [
        batch for batch, younger in trapped
        if all(head.received_at[i] >= batch["committed_at"] - 0.05 for i in younger)
    ]
    assert held_back, "the feed handed out younger entries while an older batch was still open"


# --- 3: the trap, deterministic ----------------------------------------------------------------------


def test_an_open_batch_holds_back_younger_entries_and_the_feed_hands_out_all_of_them_once_it_commits(
    feed_api, biller, db, db_url
):
    """A batch left open while younger ones commit; a created_at consumer beside it skips it."""
    make_backlog(db, 10)
    biller.drain()
    released(db)
    first, cursor = follow(feed_api, limit=4)
    assert sorted(first) == sorted(feed_order(db)) and len(first) == 10
    naive_seen = naive_page(db, NAIVE_START)
    assert len(naive_seen) == 10
    naive_last = (naive_seen[-1]["created_at"], uuid.UUID(naive_seen[-1]["id"]))
    naive_ids = [row["id"] for row in naive_seen]

    make_backlog(db, 55)
    with psycopg.connect(db_url) as slow:  # not autocommit: the batch stays open
        slow_ids = {str(row[0]) for row in slow.execute(billing_worker.CLAIM_AND_BILL, {"batch_size": 5}).fetchall()}
        assert len(slow_ids) == 5
        assert biller.drain().billed == 50  # younger transactions, committed first
        younger = set(feed_order(db)) - set(first)
        assert len(younger) == 50 and not younger & slow_ids  # committed and visible to everyone

        held = changes(feed_api, after=cursor)
        assert held.status_code == 200 and held.json == {"entries": [], "cursor": cursor}
        started = time.monotonic()
        held = changes(feed_api, after=cursor, wait=1)
        assert held.json == {"entries": [], "cursor": cursor} and time.monotonic() - started >= 0.9
        assert [e["appointment_id"] for e in changes(feed_api).json["entries"]] == first

        # The created_at consumer reads the 50 younger entries now and moves past the open batch.
        naive_seen = naive_page(db, naive_last)
        assert {row["id"] for row in naive_seen} == younger
        naive_last = (naive_seen[-1]["created_at"], uuid.UUID(naive_seen[-1]["id"]))
        naive_ids += [row["id"] for row in naive_seen]
        slow.commit()

    released(db)
    rest, end = follow(feed_api, after=cursor, limit=7)
    assert_no_duplicates(rest)
    assert set(rest) == younger | slow_ids
    assert first + rest == feed_order(db)
    assert set(rest[:5]) == slow_ids, "the older transaction's entries come first"
    assert end != cursor
    # The negative control: the created_at consumer reads on and never sees the open batch's
    # entries, which are in the ledger, behind where it is.
    naive_ids += [row["id"] for row in naive_page(db, naive_last)]
    assert set(feed_order(db)) - set(naive_ids) == slow_ids


# --- 4: long polls ---------------------------------------------------------------------------------


class LongPoll(threading.Thread):
    def __init__(self, client, **params):
        super().__init__(daemon=True)
        self.client, self.params = client, params
        self.response = None
        self.returned_at = None

    def run(self):
        self.response = changes(self.client, **self.params)
        self.returned_at = time.monotonic()


def test_a_long_poll_returns_as_soon_as_an_entry_is_billed(feed_api, biller, db):
    make_backlog(db, 1)
    biller.drain()
    released(db)
    _, cursor = follow(feed_api)
    poll = LongPoll(feed_api, after=cursor, wait=10)
    started = time.monotonic()
    poll.start()
    time.sleep(0.5)
    assert poll.is_alive()
    make_backlog(db, 1)
    biller.drain()
    billed_at = time.monotonic()
    new = set(feed_order(db)[1:])
    poll.join(timeout=12)
    assert not poll.is_alive()
    assert poll.response.status_code == 200
    assert {e["appointment_id"] for e in poll.response.json["entries"]} == new and len(new) == 1
    assert poll.response.json["cursor"] != cursor
    assert poll.returned_at - billed_at < 2, "woken by the commit, not by the end of the wait"
    assert poll.returned_at - started < 5


def test_a_long_poll_with_nothing_new_returns_after_its_wait_with_the_same_cursor(feed_api, biller, db):
    make_backlog(db, 2)
    biller.drain()
    released(db)
    _, cursor = follow(feed_api)
    started = time.monotonic()
    page = changes(feed_api, after=cursor, wait=1)
    elapsed = time.monotonic() - started
    assert page.status_code == 200 and page.json == {"entries": [], "cursor": cursor}
    assert 0.95 <= elapsed < 2.5
    started = time.monotonic()
    page = changes(feed_api, wait=1)
    assert page.json["cursor"] != paging.FEED_START and len(page.json["entries"]) == 2  # entries: no wait
    assert time.monotonic() - started < 0.9


def test_a_long_poll_held_back_by_an_older_unrelated_write_transaction_returns_the_entry_when_it_ends(
    feed_api, biller, db, db_url
):
    make_backlog(db, 1)
    biller.drain()
    released(db)
    _, cursor = follow(feed_api)
    poll = LongPoll(feed_api, after=cursor, wait=15)
    poll.start()
    with psycopg.connect(db_url) as older:  # BEGIN; INSERT ...: it has a transaction id, older than the batch's
        older.execute(
            "INSERT INTO appointments (id, physician_id, patient_id, start_date, hourly_rate) "
            "VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), now()::timestamptz(0), 200)"
        )
        assert older.execute("SELECT pg_current_xact_id_if_assigned() IS NOT NULL").fetchone()[0]
        make_backlog(db, 1)
        assert biller.drain().billed == 1
        assert len(feed_order(db)) == 2  # committed, visible
        time.sleep(1.5)
        assert poll.is_alive(), f"handed out while an older transaction ran: {poll.response and poll.response.json}"
        older.rollback()
        ended = time.monotonic()
    poll.join(timeout=5)
    assert not poll.is_alive()
    assert poll.response.status_code == 200
    assert [e["appointment_id"] for e in poll.response.json["entries"]] == feed_order(db)[1:]
    assert poll.returned_at - ended < 1.0


# --- 5: waiting requests on a real worker -------------------------------------------------------


def test_waiting_long_polls_hold_no_database_connection_and_leave_the_worker_serving(services, db_url, db):
    """6 waiters (the pool has 4 connections); normal reads stay prompt; a 7th waiter gets 503."""
    make_backlog(db, 3)
    worker = services("billing_worker.py", db_url, BILLING_POLL_SECONDS="60", BILLING_FEED_MAX_WAITERS="6").wait_healthy()
    wait_until(lambda: counts(db)["entries"] == 3, 10, what="the first pass to bill the backlog")
    released(db)
    base = worker.base_url
    first = requests.get(base + CHANGES, params={"limit": 1000}, timeout=5).json()
    assert len(first["entries"]) == 3
    cursor = first["cursor"]

    results: dict[int, tuple[requests.Response, float]] = {}

    def long_poll(i):
        response = requests.get(base + CHANGES, params={"after": cursor, "wait": 20}, timeout=40)
        results[i] = (response, time.monotonic())

    waiters = [threading.Thread(target=long_poll, args=(i,), daemon=True) for i in range(6)]
    for thread in waiters:
        thread.start()
    activity = (
        "SELECT application_name, state, count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name IN ('billing-worker', 'billing-feed-listen') "
        "GROUP BY 1, 2 ORDER BY 1, 2"
    )
    wait_until(lambda: any(r["application_name"] == "billing-feed-listen" for r in db.execute(activity).fetchall()), 10, what="the feed's LISTEN")
    time.sleep(1.0)  # each waiter read its page and waits now
    assert not results and all(thread.is_alive() for thread in waiters)

    entry_id = first["entries"][0]["appointment_id"]
    for path in ("/billing-entries?limit=2", f"/billing-entries/{entry_id}", "/ready", "/metrics", CHANGES):
        started = time.monotonic()
        response = requests.get(base + path, timeout=10)
        assert response.status_code == 200, (path, response.text)
        assert time.monotonic() - started < 2, f"{path} waited behind the long polls"

    started = time.monotonic()
    seventh = requests.get(base + CHANGES, params={"after": cursor, "wait": 5}, timeout=10)
    assert seventh.status_code == 503 and seventh.json()["detail"].startswith("wait:"), seventh.text
    assert seventh.headers["Retry-After"].isdigit()
    assert time.monotonic() - started < 2

    # One LISTEN session for all six; the pool's sessions (4 at most, fewer than the waiters, which
    # is why the reads above could only be prompt if no waiter held one) all idle.
    rows = db.execute(activity).fetchall()
    listen = [r for r in rows if r["application_name"] == "billing-feed-listen"]
    pooled = [r for r in rows if r["application_name"] == "billing-worker"]
    assert sum(r["n"] for r in listen) == 1, rows
    assert {r["state"] for r in pooled} == {"idle"}, f"a pooled session busy while only long polls wait: {rows}"
    assert not results and all(thread.is_alive() for thread in waiters)

    # One charge billed wakes all six with it.
    make_backlog(db, 1)
    db.execute("NOTIFY billing_queue")
    notified = time.monotonic()
    for thread in waiters:
        thread.join(timeout=10)
    assert len(results) == 6
    new = feed_order(db)[3:]
    for response, returned_at in results.values():
        assert response.status_code == 200, response.text
        assert [e["appointment_id"] for e in response.json()["entries"]] == new and len(new) == 1
        assert returned_at - notified < 3
    # Their places are free again.
    assert requests.get(base + CHANGES, params={"after": cursor, "wait": 1}, timeout=10).status_code == 200


# --- 6: the query ----------------------------------------------------------------------------------


def test_an_empty_ledger_answers_no_entries_and_the_start_cursor_and_nothing_new_answers_the_same_cursor(feed_api, biller, db):
    empty = changes(feed_api)
    assert empty.status_code == 200 and empty.json == {"entries": [], "cursor": paging.FEED_START}
    assert changes(feed_api, after=paging.FEED_START).json == {"entries": [], "cursor": paging.FEED_START}
    make_backlog(db, 3)
    biller.drain()
    released(db)
    page = changes(feed_api, after=paging.FEED_START, limit=2)
    assert len(page.json["entries"]) == 2
    assert set(page.json["entries"][0]) == {"appointment_id", "total_price", "created_at"}
    last = changes(feed_api, after=page.json["cursor"])
    assert len(last.json["entries"]) == 1
    again = changes(feed_api, after=last.json["cursor"])
    assert again.json == {"entries": [], "cursor": last.json["cursor"]}


def test_bad_cursors_limits_waits_and_parameters_are_400_naming_the_parameter(feed_api, biller, db, admin_url, databases):
    make_backlog(db, 2)
    biller.drain()
    released(db)
    page = changes(feed_api, limit=1).json
    good = page["cursor"]
    assert changes(feed_api, after=good).status_code == 200

    listing = paging.list_cursor("entries", paging.ListPosition(dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), uuid.uuid4()))
    for malformed in ("nope", "", good + "A", good[:-1], good + "=", paging.FEED_START + "x", listing, "f" * 65):
        detail = problem(changes(feed_api, after=malformed), 400)
        assert detail.startswith("after:"), (malformed, detail)

    future = paging.feed_cursor(paging.FeedPosition(10**12, uuid.uuid4()))
    assert problem(changes(feed_api, after=future), 400).startswith("after:")
    # A real entry's txid with another appointment id is not a position of this ledger either.
    txid = int(db.execute("SELECT max(txid)::text::bigint AS t FROM billing_entries").fetchone()["t"])
    assert problem(changes(feed_api, after=paging.feed_cursor(paging.FeedPosition(txid, uuid.uuid4()))), 400).startswith("after:")

    # A cursor that another database's feed really issued.
    name = f"clinic_test_{uuid.uuid4().hex[:12]}"
    other_url = create_database(admin_url, name, template=databases.template(admin_url))
    try:
        other_config = Config(database_url=other_url, poll_seconds=0.2, batch_size=50, max_attempts=3)
        other_pool = make_pool(other_config, "tests-other")
        other_pool.open(wait=True, timeout=10)
        try:
            with other_pool.connection() as conn:
                make_backlog(conn, 1)
            billing_worker.Biller(other_pool, 50, 3).drain()
            with other_pool.connection() as conn:
                released(conn.cursor(row_factory=dict_row))
            other_bell = ledger.LedgerBell(other_pool)
            try:
                other = falcon.testing.TestClient(ledger.create_app(other_config, other_pool, bell=other_bell))
                foreign = changes(other).json["cursor"]
                assert foreign != paging.FEED_START and changes(other, after=foreign).status_code == 200
            finally:
                other_bell.close()
        finally:
            other_pool.close()
    finally:
        drop_database(admin_url, name)
    assert problem(changes(feed_api, after=foreign), 400).startswith("after:")

    out_of_range = [("limit", "0"), ("limit", "1001"), ("limit", "x"), ("limit", "-1"), ("wait", "31"), ("wait", "-1"), ("wait", "1.5"), ("wait", "x")]
    for name, bad in out_of_range:
        detail = problem(changes(feed_api, after=good, **{name: bad}), 400)
        assert detail.startswith(f"{name}:"), (name, bad, detail)
    assert changes(feed_api, limit=1000, wait=0).status_code == 200

    detail = problem(feed_api.simulate_get(CHANGES, query_string="afterr=" + good), 400)
    assert "afterr" in detail
    detail = problem(feed_api.simulate_get(CHANGES, query_string=f"after={good}&after={good}"), 400)
    assert detail.startswith("after:")
    detail = problem(feed_api.simulate_get(CHANGES, query_string="limit=1&limit=1"), 400)
    assert detail.startswith("limit:")


# --- 7: upgrade from the version without the feed -----------------------------------------------------


def test_after_an_upgrade_old_entries_come_first_at_txid_0_and_a_consumer_continues_with_new_ones(feed_api, biller, db, db_url):
    make_backlog(db, 30)
    biller.drain()
    # The previous version's ledger: no txid column, no feed index, none of the feed's triggers.
    db.execute("DROP TRIGGER billing_entries_positions_follow_the_server ON billing_entries")
    db.execute("DROP TRIGGER billing_entries_ring_the_feed ON billing_entries")
    db.execute("DROP INDEX billing_entries_feed")
    db.execute("ALTER TABLE billing_entries DROP COLUMN txid")
    make_backlog(db, 20)
    assert bill_once(db_url).returncode == 0  # the old schema still bills
    old = sorted(row["id"] for row in db.execute("SELECT appointment_id::text AS id FROM billing_entries"))
    assert len(old) == 50

    apply_schema(db_url)
    positions = "SELECT appointment_id::text AS id, txid::text AS txid FROM billing_entries ORDER BY appointment_id"
    after_first = db.execute(positions).fetchall()
    apply_schema(db_url)  # again: nothing changes
    assert db.execute(positions).fetchall() == after_first
    assert {row["txid"] for row in after_first} == {"0"}
    default = db.execute(
        "SELECT pg_get_expr(d.adbin, d.adrelid) AS d FROM pg_attrdef d JOIN pg_attribute a ON (a.attrelid, a.attnum) = (d.adrelid, d.adnum) "
        "WHERE d.adrelid = 'billing_entries'::regclass AND a.attname = 'txid' AND NOT a.attisdropped"
    ).fetchone()
    assert default["d"] == "pg_current_xact_id()"
    triggers = {r["tgname"] for r in db.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'billing_entries'::regclass AND NOT tgisinternal")}
    assert {"billing_entries_positions_follow_the_server", "billing_entries_ring_the_feed"} <= triggers

    read, cursor = follow(feed_api, limit=7)
    assert read == old, "old entries, all at txid 0, in appointment_id order"

    make_backlog(db, 25)
    assert bill_once(db_url).returncode == 0  # the new code, as its role, on the upgraded schema
    released(db)
    new_txids = db.execute("SELECT DISTINCT txid::text::bigint AS t FROM billing_entries WHERE txid <> '0'").fetchall()
    assert new_txids and all(r["t"] > 0 for r in new_txids)
    more, _ = follow(feed_api, after=cursor, limit=7)
    assert len(more) == 25 and not set(more) & set(old)
    assert read + more == feed_order(db)
    everything, _ = follow(feed_api, limit=1000)
    assert everything[:50] == old and everything[50:] == more


# --- 8: a ledger ahead of the server's transaction ids ------------------------------------------------


def test_an_entry_ahead_of_the_servers_transaction_ids_stops_billing_without_spending_attempts_and_the_feed_answers_503(
    feed_api, biller, db, db_url
):
    make_backlog(db, 1)
    biller.drain()
    released(db)
    page = changes(feed_api).json
    assert len(page["entries"]) == 1
    cursor = page["cursor"]

    # What a pg_dump restored into a new cluster leaves: a committed entry from the old cluster's future.
    ahead = uuid.uuid4()
    db.execute("INSERT INTO appointments (id, physician_id, patient_id, start_date, end_date, hourly_rate, price) "
               "VALUES (%s, gen_random_uuid(), gen_random_uuid(), '2020-12-01 13:00:00+00', '2020-12-01 14:00:00+00', 200, 200)", [ahead])
    db.execute("INSERT INTO billing_queue (appointment_id, total_price, status, attempts, processed_at) "
               "VALUES (%s, 200, 'billed', 1, now())", [ahead])
    db.execute("INSERT INTO billing_entries (appointment_id, total_price, txid) VALUES (%s, 200, '99999999999')", [ahead])

    make_backlog(db, 1)
    pending = db.execute("SELECT appointment_id FROM billing_queue WHERE status = 'pending'").fetchone()["appointment_id"]
    with pytest.raises(psycopg.Error) as refused:
        biller.drain()
    assert refused.value.sqlstate == "55000"
    assert "ahead" in str(refused.value)
    once = bill_once(db_url)  # the worker, as its role: the pass fails, exit 2
    assert once.returncode == 2 and "ahead of this server" in once.stderr, once.stderr
    row = db.execute("SELECT status, attempts, last_error FROM billing_queue WHERE appointment_id = %s", [pending]).fetchone()
    assert row == {"status": "pending", "attempts": 0, "last_error": None}
    assert db.execute("SELECT count(*) AS n FROM billing_entries").fetchone()["n"] == 2

    for params in ({"after": cursor}, {"after": cursor, "wait": 1}):
        refused_page = changes(feed_api, **params)
        assert refused_page.status_code == 503, refused_page.text
        assert refused_page.headers.get("Retry-After", "").isdigit()
        assert "ahead" in refused_page.json["detail"]
    # Entries below the horizon are still handed out; the page that would come next is refused.
    assert changes(feed_api, limit=1).json["cursor"] == cursor
    assert changes(feed_api, limit=2).status_code == 200


# --- 9: a real pg_dump restored into a new cluster --------------------------------------------------------

# docs/operations.md, Loading a dump: the epoch to give pg_resetwal -e, or no row when the counter is past.
EPOCH_TO_SET = """
SELECT floor(max(txid)::text::numeric / 4294967296)::bigint + 1 AS epoch FROM billing_entries
HAVING max(txid) >= pg_snapshot_xmax(pg_current_snapshot())
"""


@pytest.mark.slow
def test_a_dump_restored_into_a_new_cluster_is_refused_until_pg_resetwal_moves_its_epoch_past_the_ledger(
    db_url, db, biller, feed_api, tmp_path
):
    """docs/operations.md, Loading a dump, step by step: pg_dump, schema, pg_restore table by table, then
    pg_resetwal -e; an old consumer's cursor goes on where it was."""
    for _ in range(3000):  # this server's counter well ahead of a new cluster's, whatever ran before
        db.execute("SELECT pg_current_xact_id()")
    make_backlog(db, 40)
    biller.drain()
    make_backlog(db, 10)  # pending in the dump: billed after the restore
    released(db)
    read, _ = follow(feed_api, limit=1000)
    assert len(read) == 40
    consumed = read[:25]
    cursor = changes(feed_api, limit=25).json["cursor"]  # a consumer that got this far before the dump
    highest = int(db.execute("SELECT max(txid)::text AS t FROM billing_entries").fetchone()["t"])

    bindir = server_bindir()
    assert bindir, "the PostgreSQL server binaries (initdb, pg_resetwal) are needed for this test"
    dump = tmp_path / "clinic.dump"
    tables = ("appointments", "billing_queue", "billing_entries")
    done = subprocess.run(
        [os.path.join(bindir, "pg_dump"), "--format=custom", *(f"--table={t}" for t in tables), "-f", str(dump), db_url],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr

    cluster = TempCluster()  # a new cluster: its transaction counter starts low
    try:
        cluster.start()
        target = create_database(cluster.url, "clinic")
        apply_schema(target)
        for table in tables:
            restore = [os.path.join(bindir, "pg_restore"), "-d", target, "--data-only", "--exit-on-error", "--single-transaction"]
            done = subprocess.run([*restore, f"--table={table}", str(dump)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        with psycopg.connect(target, autocommit=True, row_factory=dict_row) as conn:
            assert feed_order(conn) == read
            assert counts(conn)["pending"] == 10
            assert int(conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text AS x").fetchone()["x"]) <= highest
            epoch = conn.execute(EPOCH_TO_SET).fetchone()["epoch"]
        assert epoch == (highest >> 32) + 1

        # The guard: the worker's batch is refused and nothing is billed; reconcile says why; the feed answers 503.
        once = run_worker_command(target, "--once")
        assert once.returncode == 2 and "ahead of this server" in once.stderr, once.stderr
        reconcile = run_worker_command(target, "reconcile")
        assert reconcile.returncode == 1 and len(json.loads(reconcile.stdout)["entry_position_ahead_of_server"]) == 40
        target_config = Config(database_url=target)
        target_pool = make_pool(target_config, "tests-restored")
        target_pool.open(wait=True, timeout=10)
        target_bell = ledger.LedgerBell(target_pool)
        try:
            restored = falcon.testing.TestClient(ledger.create_app(target_config, target_pool, bell=target_bell))
            from_start = changes(restored)
            assert from_start.status_code == 503, from_start.text
            # A good cursor gets the same 503: the server is at fault, not the consumer's cursor.
            resumed = changes(restored, after=cursor)
            assert resumed.status_code == 503 and "ahead of this server" in resumed.json["detail"], resumed.text
        finally:
            target_bell.close()
            target_pool.close()

        # The fix: a clean stop, pg_resetwal -e as the postgres OS user (as TempCluster runs initdb), start.
        cluster.stop()
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        resetwal = [*as_postgres, os.path.join(bindir, "pg_resetwal"), "-e", str(epoch), str(cluster.data)]
        done = subprocess.run(resetwal, capture_output=True, text=True)
        assert done.returncode == 0 and "Write-ahead log reset" in done.stdout, done.stdout + done.stderr
        cluster.start()

        with psycopg.connect(target, autocommit=True, row_factory=dict_row) as conn:
            assert conn.execute(EPOCH_TO_SET).fetchone() is None
        once = run_worker_command(target, "--once")
        assert once.returncode == 0 and json.loads(once.stdout)["billed"] == 10, once.stderr
        reconcile = run_worker_command(target, "reconcile")
        assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
        with psycopg.connect(target, autocommit=True, row_factory=dict_row) as conn:
            released(conn)
            order = feed_order(conn)
            new_txids = conn.execute("SELECT txid::text::numeric AS t FROM billing_entries WHERE txid > %s::text::xid8", [str(highest)]).fetchall()
        assert len(new_txids) == 10 and all(r["t"] >= epoch << 32 for r in new_txids)
        target_pool = make_pool(target_config, "tests-restored")
        target_pool.open(wait=True, timeout=10)
        target_bell = ledger.LedgerBell(target_pool)
        try:
            restored = falcon.testing.TestClient(ledger.create_app(target_config, target_pool, bell=target_bell))
            rest, _ = follow(restored, after=cursor, limit=7)
        finally:
            target_bell.close()
            target_pool.close()
        assert_no_duplicates(consumed + rest)
        assert consumed + rest == order
        assert rest[:15] == read[25:] and len(rest) == 25
    finally:
        cluster.destroy()
