"""A database that hangs instead of dying, under the running services.

The server is frozen (every PostgreSQL process SIGSTOPped: its sockets stay open and nothing
answers, as with a hung disk or a paused VM) while clients start and end appointments with ids of
their own, retrying unknown outcomes with the same body, and a consumer follows the change feed
with long polls. Then it is resumed. What must hold:

- no API call outlives REQUEST_TIMEOUT_SECONDS (8, the default) + 0.5 s, and no feed long poll
  its wait + 8 + 0.5 s (the pools' monitors find the server not answering within about 3 s
  and cut the waits on it short; the deadlines bound what they do not see);
- /health and /metrics of both services answer within 100 ms (p99) while the server hangs;
- the first 2xx comes within 1 s of the server answering again, and the worker LISTENs again
  (its poll interval is 60 s here, so only LISTEN bills within the drain's time);
- the ledger is exact: every acknowledged end billed once with the right total, nothing else,
  and the feed's consumer saw every entry once.

Then a server that answers while the services' own sessions hang (those backends frozen, the
monitors' not: a stuck disk read, a lock behind a frozen session), which only the deadline ends:
no call over 8.5 s, nothing lost. Its negative control is the same with a deadline of 60 s: the
calls in flight wait for the sessions, and the bound finds them.

Last, only the worker's session frozen in the middle of a batch: the batch's deadline ends the
worker's wait, it starts over, and when the session resumes and commits, every charge is still
billed once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import os
import signal
import threading
import time
import uuid

import psycopg
import pytest
import requests

from support import (
    Load,
    Probes,
    TempCluster,
    assert_billed_exactly_once,
    expected_price,
    freeze,
    fresh_database,
    ledger,
    make_backlog,
    thaw,
    wait_until,
)

pytestmark = pytest.mark.slow

DEADLINE = 8.0  # config.Config.request_timeout, the default the services run with here
FREEZE_SECONDS = 12
FEED_WAIT = 5
CLIENTS = 6


@pytest.fixture
def cluster():
    cluster = TempCluster()
    cluster.start()
    yield cluster
    cluster.destroy()  # resumes it first, should a test have left it frozen


class FeedFollower(threading.Thread):
    """Follows /billing-entries/changes with long polls (wait=FEED_WAIT), as a ledger consumer
    does: keeps its cursor, retries an unknown outcome from the same cursor."""

    def __init__(self, base_url: str):
        super().__init__(daemon=True)
        self.base_url = base_url
        self.halt = threading.Event()
        self.cursor: str | None = None
        self.entries: list[str] = []
        self.calls: list[tuple[float, float, int | None]] = []  # (sent, seconds, status)

    def run(self) -> None:
        session = requests.Session()
        while not self.halt.is_set():
            params = {"limit": 500, "wait": FEED_WAIT, **({"after": self.cursor} if self.cursor else {})}
            sent = time.monotonic()
            try:
                response = session.get(self.base_url + "/billing-entries/changes", params=params, timeout=60)
                status = response.status_code
            except requests.RequestException:
                response, status = None, None
            self.calls.append((sent, time.monotonic() - sent, status))
            if status == 200:
                page = response.json()
                self.entries += [e["appointment_id"] for e in page["entries"]]
                self.cursor = page["cursor"]
            else:
                self.halt.wait(0.2)


class HungRun:
    """The services on a cluster of their own, the load, the probes and the feed's consumer."""

    def __init__(self, cluster: TempCluster, services, request_timeout: float | None = None):
        self.cluster = cluster
        self.db_url = fresh_database(cluster.url)
        settings = {} if request_timeout is None else {"REQUEST_TIMEOUT_SECONDS": str(request_timeout)}
        self.api = services("appointments.py", self.db_url, **settings).wait_healthy()
        self.worker = services("billing_worker.py", self.db_url, BILLING_POLL_SECONDS="60", **settings).wait_healthy()
        for service in (self.api, self.worker):
            wait_until(lambda s=service: _status(s.base_url + "/ready") == 200, 20, what=f"{service.script} /ready")
        # The client waits longer than any deadline: what is measured is the service's answer.
        self.load = Load(self.api.base_url, seed=16, clients=CLIENTS, timeout=(2, 60))
        self.probes = Probes([self.api.base_url, self.worker.base_url], paths=("/health", "/metrics", "/ready"))
        self.feed = FeedFollower(self.worker.base_url)
        self.frozen_at = self.resumed_at = 0.0

    def run(self, freeze_seconds: float, sessions_only: bool = False) -> None:
        """Load, then the whole server frozen for freeze_seconds (``sessions_only``: only the
        services' pooled sessions), then thawed."""
        self.load.start()
        self.probes.start()
        self.feed.start()
        time.sleep(2)
        self.frozen_at = time.monotonic()
        pids = self._freeze_sessions() if sessions_only else freeze(self.cluster.postmaster_pid())
        try:
            time.sleep(freeze_seconds)
        finally:
            self.resumed_at = time.monotonic()
            thaw(pids)
        time.sleep(3)

    def _freeze_sessions(self) -> list[int]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            pids = [r[0] for r in conn.execute(SERVICE_SESSIONS)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    def finish(self) -> dict:
        finished = self.load.stop(timeout=90)
        self.probes.stop()
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            drained = _eventually(lambda: ledger(conn)["pending"] == 0, 20)
            billed = {r[0]: r[1] for r in conn.execute("SELECT appointment_id::text, total_price FROM billing_entries")}
            count = ledger(conn)
        caught_up = _eventually(lambda: len(self.feed.entries) >= len(billed), 20)
        self.feed.halt.set()
        self.feed.join(FEED_WAIT + DEADLINE + 5)
        with self.load.lock:
            attempts = list(self.load.attempts)
        acked = [a for a in self.load.appointments.values() if a.end_acked]
        after = [a.done for a in attempts if a.outcome == "acked" and a.done >= self.resumed_at]
        longest = max(attempts, key=lambda a: a.done - a.sent)
        feed_longest = max((s for _, s, _ in self.feed.calls), default=0.0)
        probes = self.probes.summary(self.frozen_at, self.resumed_at)
        return {
            "clients_finished": finished,
            "drained_without_the_poll": drained,
            "feed_caught_up": caught_up,
            "ends_acknowledged": len(acked),
            "lost": sum(1 for a in acked if a.id not in billed),
            "wrong_total": sum(1 for a in acked if a.id in billed and billed[a.id] != expected_price(a.minutes)),
            "unexpected": sum(1 for i in billed if i not in self.load.appointments or not self.load.appointments[i].end_sent),
            "ledger": count,
            "feed_entries": len(self.feed.entries),
            "feed_duplicated": len(self.feed.entries) - len(set(self.feed.entries)),
            "feed_missed": len(set(billed) - set(self.feed.entries)),
            "requests": dict(collections.Counter(f"{a.kind}_{a.outcome}" for a in attempts)),
            "longest_call_s": round(longest.done - longest.sent, 2),
            "calls_over_deadline": sum(1 for a in attempts if a.done - a.sent > DEADLINE + 0.5),
            "feed_longest_call_s": round(feed_longest, 2),
            "feed_statuses": dict(collections.Counter(str(st) for _, _, st in self.feed.calls)),
            "first_2xx_after_resume_s": round(min(after) - self.resumed_at, 3) if after else None,
            "probes_while_frozen": {base.rsplit(":", 1)[1]: paths for base, paths in probes.items()},
            "bad_responses": self.load.bad_responses,
        }


def _status(url: str) -> int | None:
    with contextlib.suppress(requests.RequestException):
        return requests.get(url, timeout=5).status_code
    return None


def _eventually(predicate, timeout: float) -> bool:
    with contextlib.suppress(AssertionError):
        return bool(wait_until(predicate, timeout, interval=0.2))
    return False


def test_a_frozen_database_costs_no_call_more_than_its_deadline_and_loses_nothing(cluster, services, capsys):
    run = HungRun(cluster, services)
    run.run(FREEZE_SECONDS)
    figures = run.finish()
    with capsys.disabled():
        print("\nfrozen database:", json.dumps(figures, indent=2, default=str))
    assert figures["clients_finished"] and figures["ends_acknowledged"] > 0
    assert figures["calls_over_deadline"] == 0 and figures["longest_call_s"] <= DEADLINE + 0.5, figures
    assert figures["feed_longest_call_s"] <= FEED_WAIT + DEADLINE + 0.5, figures
    assert figures["requests"].get("end_503", 0) > 0, "ends were tried while the server hung"
    assert not figures["bad_responses"], figures["bad_responses"]  # every 503 had its Retry-After
    for port, paths in figures["probes_while_frozen"].items():
        for path in ("/health", "/metrics"):
            row = paths[path]
            assert row["n"] >= 20 and row["not_200"] == 0 and row["p99_ms"] <= 100, (port, path, row)
        assert paths["/ready"]["max_ms"] <= 200, (port, paths["/ready"])
    assert figures["first_2xx_after_resume_s"] is not None and figures["first_2xx_after_resume_s"] <= 1.0, figures
    assert figures["drained_without_the_poll"], "the worker did not LISTEN again after the freeze"
    assert figures["lost"] == figures["wrong_total"] == figures["unexpected"] == 0, figures
    assert figures["feed_caught_up"] and figures["feed_duplicated"] == figures["feed_missed"] == 0, figures
    with psycopg.connect(run.db_url, autocommit=True) as conn:
        assert_billed_exactly_once(conn, ended=ledger(conn)["ended"])


# The services' pooled sessions; not their monitors' (…-monitor) nor their LISTENs (…-listen).
SERVICE_SESSIONS = "SELECT pid FROM pg_stat_activity WHERE application_name IN ('appointments', 'billing-worker')"


def _sessions_frozen(cluster, services, request_timeout: float | None, capsys, title: str) -> dict:
    run = HungRun(cluster, services, request_timeout=request_timeout)
    run.run(FREEZE_SECONDS, sessions_only=True)
    figures = run.finish()
    shown = ("longest_call_s", "calls_over_deadline", "first_2xx_after_resume_s", "requests", "lost", "wrong_total", "unexpected")
    with capsys.disabled():
        print(f"\n{title}:", {k: figures[k] for k in shown})
    return figures


def test_hung_sessions_on_an_answering_server_cost_no_call_more_than_its_deadline(cluster, services, capsys):
    """The services' sessions frozen, the server answering their monitors: only the request
    deadline ends the calls waiting on those sessions. None over 8.5 s; nothing lost."""
    figures = _sessions_frozen(cluster, services, None, capsys, "services' sessions frozen")
    assert figures["clients_finished"] and figures["ends_acknowledged"] > 0
    assert figures["calls_over_deadline"] == 0 and figures["longest_call_s"] <= DEADLINE + 0.5, figures
    assert figures["lost"] == figures["wrong_total"] == figures["unexpected"] == 0, figures


def test_negative_control_without_a_deadline_calls_wait_for_the_hung_sessions(cluster, services, capsys):
    """The same with a 60 s deadline: the calls in flight when the sessions froze last the whole
    freeze, which the bound above catches."""
    figures = _sessions_frozen(cluster, services, 60, capsys, "negative control (60 s deadline)")
    assert figures["calls_over_deadline"] > 0 and figures["longest_call_s"] >= FREEZE_SECONDS - 1, figures
    assert figures["lost"] == 0  # slow, not wrong


SLOW_LEDGER = """
CREATE FUNCTION test_slow_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$;
CREATE TRIGGER test_slow_ledger AFTER INSERT ON billing_entries FOR EACH STATEMENT EXECUTE FUNCTION test_slow_ledger();
"""


def test_a_batch_cut_short_by_its_deadline_leaves_each_charge_billed_once(db_url, services):
    """The worker's session is frozen in the middle of a batch (a trigger makes each batch take
    3 s): the batch's deadline (BATCH_DEADLINE_SECONDS, 10) ends the worker's wait, it starts over
    on a new connection and bills the rest around the frozen session's locked rows. Resumed, the
    session commits the batch its worker gave up on: every charge is billed once all the same."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_backlog(conn, 3000)
        conn.execute(SLOW_LEDGER)
        worker = services("billing_worker.py", db_url, BILLING_BATCH_SIZE="1000", BILLING_POLL_SECONDS="1").wait_healthy()
        backend = wait_until(
            lambda: conn.execute(
                # In the trigger's sleep: frozen in its commit instead, it would hold the cluster's
                # NOTIFY lock, and every notifying commit of the server (the retries too) would wait.
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'billing-worker' AND state = 'active' "
                "AND wait_event = 'PgSleep' AND query LIKE '%%billing_entries%%'"
            ).fetchone(),
            20, interval=0.05, what="the worker's batch to be running",
        )[0]
        os.kill(backend, signal.SIGSTOP)
        try:
            wait_until(lambda: "the database did not answer within the deadline" in worker.output(), 20, what="the batch's deadline")
            # The others are billed meanwhile: the frozen session's rows are locked, and skipped.
            wait_until(lambda: ledger(conn)["pending"] == 1000, 30, what="the rest billed around the frozen batch")
        finally:
            thaw([backend])
        wait_until(lambda: ledger(conn)["pending"] == 0, 30, what="every charge billed")
        assert_billed_exactly_once(conn, ended=3000)


SLOW_STARTS = """
CREATE FUNCTION test_slow_start() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$;
CREATE TRIGGER test_slow_start AFTER INSERT ON appointments FOR EACH STATEMENT EXECUTE FUNCTION test_slow_start();
"""


def test_time_waiting_for_a_thread_counts_against_the_deadline(db_url, services):
    """Each start takes 1.5 s (a trigger), the deadline is 2 s, and 16 arrive at once for the 8
    threads: the 8 that wait 1.5 s for a thread have 0.5 s left and get their 503 by the deadline,
    counted from their arrival, not from when a thread took them (which would make them 3 s)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SLOW_STARTS)
    api = services("appointments.py", db_url, REQUEST_TIMEOUT_SECONDS="2").wait_healthy()

    def start(_):
        began = time.monotonic()
        response = requests.post(api.base_url + "/appointments", json={"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}, timeout=30)
        return response.status_code, time.monotonic() - began, response.headers.get("Retry-After")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(start, range(16)))
    statuses = collections.Counter(status for status, _, _ in answers)
    assert set(statuses) <= {201, 503} and statuses[503] >= 1, answers
    assert all(retry for status, _, retry in answers if status == 503), answers
    assert max(seconds for _, seconds, _ in answers) <= 2 + 0.5, answers
