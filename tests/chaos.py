"""Chaos harness: the native stack under load and faults, then a Jepsen-style count of the money.

    python tests/chaos.py --duration 120            # what CI runs (make chaos DURATION=...)
    python tests/chaos.py --duration 30 --broken    # negative control: must report losses

It owns a PostgreSQL cluster (so it can restart and crash it), runs 2 API processes and 3
workers, and drives them with client threads that start and end appointments with client-chosen
ids and explicit dates, recording every request as acknowledged (2xx), failed (4xx) or unknown
(timeout, connection error, 503), and retrying unknowns with the same body (safe: idempotent).
Meanwhile it injects faults: SIGKILL and SIGSTOP of workers, pg_terminate_backend of service
connections, PostgreSQL restarted fast and crashed (-m immediate), all workers down for a while,
SIGTERM of an API process. A feed consumer follows the ledger's change feed throughout, as an
ERP would: small long-poll pages from whichever worker is up, always passing back the cursor it
was given, retrying with the same cursor on errors. Then it heals, drains, lets the consumer catch
up and checks:

  lost        acknowledged ends without exactly one billing entry         must be 0
  duplicated  appointments with more than one billing entry (from data)   must be 0
  unexpected  entries for appointments no request ever ended              must be 0
  wrong_total entries whose total differs from the price rule             must be 0
  http_5xx    API 5xx other than 503                                      must be 0
  http_4xx    4xx to these valid requests                                 must be 0
  stuck       charges still pending or failed after the drain             must be 0
  recovered   unknown outcomes that turned out committed                  reported
  feed_missed       ledger entries the feed consumer never received       must be 0
  feed_duplicated   entries it received more than once                    must be 0
  feed_unexpected   entries it received that the ledger does not hold     must be 0
  feed_wrong_total  entries it received at a total not the ledger's       must be 0
  feed_errors       feed answers but 200 and 503, empty pages that move
                    the cursor, and a consumer that never caught up       must be 0
  feed_entries      entries the consumer received                         reported

It prints the counts, the faults injected of each kind and the totals as JSON, and exits 1 on any
failure.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import decimal
import json
import random
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import requests

from support import BASE_START, Service, TempCluster, as_role, expected_price, fresh_database, free_port, wait_until

IDLE_TIMEOUT_SECONDS = 5  # billing_worker.WORKER_SESSION
SERVICE_APPS = ("appointments", "billing-worker", "billing-worker-listen", "billing-feed-listen")
FEED_PAGE = {"limit": "25", "wait": "1"}


@dataclasses.dataclass
class Appointment:
    id: str
    minutes: int
    start_acked: bool = False
    end_sent: bool = False
    end_acked: bool = False
    end_unknowns: int = 0
    acked_attempt_sent_at: float = 0.0  # wall clock, when the attempt that got the 2xx was sent


class History:
    """Every request's outcome, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.appointments: dict[str, Appointment] = {}
        self.outcomes = collections.Counter()
        self.statuses = collections.Counter()
        self.bad_responses: list[str] = []
        self.first_ok_after: dict[str, float | None] = {}

    def record(self, kind: str, outcome: str, status: int | None = None, text: str = "") -> None:
        with self.lock:
            self.outcomes[f"{kind}_{outcome}"] += 1
            if status is not None:
                self.statuses[status] += 1
            if outcome in ("5xx", "4xx") and len(self.bad_responses) < 20:
                self.bad_responses.append(f"{kind} {status}: {text[:300]}")
            if outcome == "acked":
                now = time.monotonic()
                for event, seen in self.first_ok_after.items():
                    if seen is None:
                        self.first_ok_after[event] = now


class Stack:
    """The processes under test, replaced as faults kill them."""

    def __init__(self, cluster: TempCluster, db_url: str, workdir: Path, worker_script: str, api_count: int, worker_count: int):
        self.cluster, self.db_url, self.workdir = cluster, db_url, workdir
        self.worker_script = worker_script
        self.lock = threading.RLock()
        self.api_ports = [free_port() for _ in range(api_count)]
        self.apis: dict[int, Service] = {}
        self.workers: list[Service] = []
        self.stopped_workers: set[Service] = set()
        self.retired: list[Service] = []
        for port in self.api_ports:
            self.start_api(port)
        for _ in range(worker_count):
            self.start_worker()

    def wait_healthy(self) -> None:
        for service in [*self.apis.values(), *self.workers]:
            service.wait_healthy(30)

    def env(self, **extra) -> dict[str, str]:
        return {"DATABASE_URL": self.db_url, "BILLING_POLL_SECONDS": "1", "BILLING_BATCH_SIZE": "50", "LOG_LEVEL": "WARNING", **extra}

    def start_api(self, port: int) -> Service:
        env = self.env(APPOINTMENTS_PORT=str(port), DATABASE_URL=as_role(self.db_url, "appointments.py"))
        service = Service("appointments.py", env, log_dir=self.workdir)
        with self.lock:
            self.apis[port] = service
        return service

    def start_worker(self) -> Service:
        env = self.env(BILLING_PORT=str(free_port()), DATABASE_URL=as_role(self.db_url, self.worker_script))
        service = Service(self.worker_script, env, log_dir=self.workdir)
        with self.lock:
            self.workers.append(service)
        return service

    def api_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.api_ports]

    def running_workers(self) -> list[Service]:
        with self.lock:
            return [w for w in self.workers if w.popen.poll() is None and w not in self.stopped_workers]

    def retire(self, service: Service) -> None:
        with self.lock:
            if service in self.workers:
                self.workers.remove(service)
            self.retired.append(service)

    def shutdown(self) -> None:
        with self.lock:
            everything = [*self.apis.values(), *self.workers, *self.retired]
        for service in everything:
            with contextlib.suppress(Exception):
                service.signal(signal.SIGCONT)
            service.stop(timeout=5)


class Client(threading.Thread):
    """Starts and ends appointments until told to stop; finishes the one in hand."""

    def __init__(self, stack: Stack, history: History, stop: threading.Event, seed: int):
        super().__init__(daemon=True)
        self.stack, self.history, self.stop = stack, history, stop
        self.random = random.Random(seed)
        self.session = requests.Session()

    def run(self) -> None:
        while not self.stop.is_set():
            self.one_appointment()

    def send(self, kind: str, path: str, body: dict, appointment: Appointment) -> bool:
        """POSTs until acknowledged (True) or refused with a 4xx (False); unknowns are retried
        with the same body, on either API process."""
        while True:
            url = self.random.choice(self.stack.api_urls()) + path
            sent_at = time.time()
            try:
                response = self.session.post(url, json=body, timeout=(2, 8))
                status, text = response.status_code, response.text
            except requests.RequestException:
                status, text = None, ""
            if status is not None and status < 300:
                self.history.record(kind, "acked", status)
                appointment.acked_attempt_sent_at = sent_at
                return True
            if status is not None and 400 <= status < 500:
                self.history.record(kind, "4xx", status, text)
                return False
            # Timeout, connection refused or reset, 503: the outcome is unknown. Any other 5xx is
            # a failure of the run, and retried like an unknown so the history stays complete.
            self.history.record(kind, "unknown" if status in (None, 503) else "5xx", status, text)
            if kind == "end":
                appointment.end_unknowns += 1
            time.sleep(self.random.uniform(0.05, 0.3))

    def one_appointment(self) -> None:
        appointment = Appointment(id=str(uuid.uuid4()), minutes=self.random.randint(1, 180))
        start = BASE_START + dt.timedelta(minutes=self.random.randint(0, 500_000))
        # Any second inside the last started minute: the price counts started minutes.
        end = start + dt.timedelta(minutes=appointment.minutes) - dt.timedelta(seconds=self.random.randint(0, 59))
        with self.history.lock:
            self.history.appointments[appointment.id] = appointment
        body = {"id": appointment.id, "physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": start.isoformat()}
        appointment.start_acked = self.send("start", "/appointments", body, appointment)
        if not appointment.start_acked:
            return
        appointment.end_sent = True
        path = f"/appointments/{appointment.id}/end"
        appointment.end_acked = self.send("end", path, {"end_date": end.isoformat()}, appointment)


class FeedConsumer(threading.Thread):
    """Follows GET /billing-entries/changes through the faults, recording every entry it receives.

    It keeps to one worker until that one is killed, stopped or fails it (a connection error, a
    timeout, a 503 or any other error), then asks another; every retry sends the same cursor. Once
    told the ledger is complete (catch_up), the first empty page it is then given means it has
    everything the feed will hand out.
    """

    def __init__(self, stack: Stack, seed: int):
        super().__init__(daemon=True)
        self.stack, self.random = stack, random.Random(seed)
        self.session = requests.Session()
        self.cursor: str | None = None
        self.received: list[tuple[str, decimal.Decimal]] = []  # (appointment_id, total_price), in order
        self.outcomes = collections.Counter()
        self.errors: list[str] = []  # answers that are failures of the run, not faults
        self.worker: Service | None = None
        self.stop = threading.Event()
        self.complete_since: float | None = None
        self.caught_up = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            worker = self._pick_worker()
            if worker is None:  # all down, or all stopped: wait for one
                self.stop.wait(0.2)
                continue
            asked_at = time.monotonic()
            params = {**FEED_PAGE, **({"after": self.cursor} if self.cursor else {})}
            try:
                response = self.session.get(worker.base_url + "/billing-entries/changes", params=params, timeout=(2, 6))
            except requests.RequestException:
                self._retry_elsewhere("unknown")
                continue
            if response.status_code == 503:
                self._retry_elsewhere("503")
                continue
            if response.status_code != 200:
                self._error(f"{response.status_code}: {response.text[:300]}")
                self._retry_elsewhere(f"{response.status_code // 100}xx")
                continue
            try:
                page = response.json(parse_float=decimal.Decimal)
                entries = page["entries"]
            except (ValueError, TypeError, KeyError):
                self._error(f"200 with a body that is no page: {response.text[:300]}")
                self._retry_elsewhere("2xx")
                continue
            self.outcomes["entries" if entries else "empty"] += 1
            if not entries and self.cursor is not None and page["cursor"] != self.cursor:
                self._error(f"an empty page moved the cursor from {self.cursor} to {page['cursor']}")
            self.received += [(entry["appointment_id"], entry["total_price"]) for entry in entries]
            self.cursor = page["cursor"]
            if not entries and self.complete_since is not None and asked_at >= self.complete_since:
                self.caught_up.set()
                return

    def catch_up(self, timeout: float) -> bool:
        """Called once every entry is committed and below the feed's horizon: True once an empty
        page asked for after this call came back (nothing left to receive)."""
        self.complete_since = time.monotonic()
        caught_up = self.caught_up.wait(timeout)
        self.stop.set()
        self.join(timeout=10)
        return caught_up

    def _pick_worker(self) -> Service | None:
        running = self.stack.running_workers()
        if self.worker not in running:
            self.worker = self.random.choice(running) if running else None
        return self.worker

    def _retry_elsewhere(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        others = [w for w in self.stack.running_workers() if w is not self.worker]
        self.worker = self.random.choice(others) if others else None
        self.stop.wait(self.random.uniform(0.05, 0.3))

    def _error(self, text: str) -> None:
        self.outcomes["errors"] += 1
        if len(self.errors) < 20:
            self.errors.append(text)


class Faults:
    """Injects faults on a timeline (the big ones) and at random (the small ones)."""

    def __init__(self, stack: Stack, history: History, duration: float, rng: random.Random, admin_url: str):
        self.stack, self.history, self.duration, self.random = stack, history, duration, rng
        self.admin_url = admin_url
        self.counts = collections.Counter()
        self.stop = threading.Event()
        self.quiet = threading.Event()  # set while all workers are meant to be down
        self.recovery: dict[str, float] = {}
        self.threads = [
            threading.Thread(target=self._kills, daemon=True),
            threading.Thread(target=self._terminations, daemon=True),
            threading.Thread(target=self._timeline, daemon=True),
        ]

    def start(self) -> None:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _at(self, fraction: float) -> bool:
        """Sleeps until `fraction` of the run; False if stopped first."""
        remaining = self.started + self.duration * fraction - time.monotonic()
        return not self.stop.wait(max(remaining, 0))

    # -- at random -------------------------------------------------------------------------------

    def _kills(self) -> None:
        while not self.stop.wait(self.random.uniform(0.3, 1.5)):
            if self.quiet.is_set():
                continue
            workers = self.stack.running_workers()
            if not workers:
                continue
            victim = self.random.choice(workers)
            victim.kill()
            self.stack.retire(victim)
            self.stack.start_worker()
            self.counts["worker_sigkill"] += 1

    def _terminations(self) -> None:
        while not self.stop.wait(self.random.uniform(0.5, 2.0)):
            try:
                with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=2) as conn:
                    pids = [
                        row[0]
                        for row in conn.execute(
                            "SELECT pid FROM pg_stat_activity WHERE application_name = ANY(%s)", [list(SERVICE_APPS)]
                        )
                    ]
                    if pids:
                        conn.execute("SELECT pg_terminate_backend(%s)", [self.random.choice(pids)])
                        self.counts["pg_terminate_backend"] += 1
            except psycopg.Error:
                pass  # the server is being restarted

    # -- on a timeline ---------------------------------------------------------------------------

    def _timeline(self) -> None:
        steps = [
            (0.10, self._sigstop_worker),
            (0.22, lambda: self._restart_postgres("fast")),
            (0.38, self._sigterm_api),
            (0.50, lambda: self._restart_postgres("immediate")),
            (0.62, self._sigstop_worker),
            (0.74, self._workers_down),
        ]
        for fraction, step in steps:
            if not self._at(fraction):
                return
            step()

    def _sigstop_worker(self) -> None:
        workers = self.stack.running_workers()
        if not workers:
            return
        victim = self.random.choice(workers)
        with self.stack.lock:
            self.stack.stopped_workers.add(victim)
        victim.signal(signal.SIGSTOP)
        self.counts["worker_sigstop"] += 1
        time.sleep(IDLE_TIMEOUT_SECONDS + 2)  # longer than idle_in_transaction_session_timeout
        victim.signal(signal.SIGCONT)
        with self.stack.lock:
            self.stack.stopped_workers.discard(victim)

    def _restart_postgres(self, mode: str) -> None:
        self.stack.cluster.stop(mode)
        self.counts[f"postgres_restart_{mode}"] += 1
        time.sleep(self.random.uniform(1, 3))
        self.stack.cluster.start()
        event = f"postgres_{mode}"
        with self.history.lock:
            self.history.first_ok_after[event] = None
        self.recovery[event] = time.monotonic()

    def _sigterm_api(self) -> None:
        port = self.random.choice(self.stack.api_ports)
        with self.stack.lock:
            old = self.stack.apis[port]
        old.signal(signal.SIGTERM)
        code = old.wait(timeout=15)
        self.counts["api_sigterm"] += 1
        self.counts[f"api_sigterm_exit_{code}"] += 1
        self.stack.retired.append(old)
        self.stack.start_api(port).wait_healthy(30)

    def _workers_down(self) -> None:
        self.quiet.set()
        for worker in self.stack.running_workers():
            worker.stop(timeout=10)
            self.stack.retire(worker)
        self.counts["all_workers_down"] += 1
        self.stop.wait(min(10, self.duration * 0.1))
        for _ in range(3):
            self.stack.start_worker()
        self.quiet.clear()


LEDGER = """
SELECT e.appointment_id::text AS id, e.total_price, count(*) OVER (PARTITION BY e.appointment_id) AS copies
FROM billing_entries e
"""


# Entries committed but not yet handed out by the feed: above its horizon, the oldest transaction
# still running (any transaction of the cluster, also one that never writes to the ledger).
PAST_THE_HORIZON = "SELECT count(*) FROM billing_entries WHERE txid >= pg_snapshot_xmin(pg_current_snapshot())"


def check(history: History, db_url: str, feed: FeedConsumer, feed_caught_up: bool) -> dict:
    with psycopg.connect(db_url, autocommit=True) as conn:
        entries = conn.execute(LEDGER).fetchall()
        stuck = conn.execute("SELECT count(*) FROM billing_queue WHERE status <> 'billed'").fetchone()[0]
        duplicated = conn.execute(
            "SELECT count(*) FROM (SELECT appointment_id FROM billing_entries GROUP BY 1 HAVING count(*) > 1) d"
        ).fetchone()[0]
        # When each end committed (its transaction's start time, on this machine's clock).
        queued_at = {r[0]: r[1] for r in conn.execute("SELECT appointment_id::text, extract(epoch FROM created_at) FROM billing_queue")}
    per_id = collections.Counter(row[0] for row in entries)
    totals = {row[0]: row[1] for row in entries}
    apps = history.appointments
    acked = [a for a in apps.values() if a.end_acked]
    fed = collections.Counter(appointment_id for appointment_id, _ in feed.received)
    return {
        "appointments": len(apps),
        "ends_acknowledged": len(acked),
        "billing_entries": len(entries),
        "lost": sum(1 for a in acked if per_id[a.id] != 1),
        "duplicated": duplicated,
        "unexpected": sum(1 for i in per_id if i not in apps or not apps[i].end_sent),
        "wrong_total": sum(1 for i, total in totals.items() if i in apps and total != expected_price(apps[i].minutes)),
        "stuck": stuck,
        "http_5xx": sum(n for k, n in history.outcomes.items() if k.endswith("_5xx")),
        "http_4xx": sum(n for k, n in history.outcomes.items() if k.endswith("_4xx")),
        # An end whose unknown attempt had committed before the retry that got the 2xx was sent.
        "recovered": sum(
            1 for a in apps.values() if a.end_unknowns and a.id in queued_at and float(queued_at[a.id]) < a.acked_attempt_sent_at
        ),
        "feed_entries": len(feed.received),
        "feed_missed": sum(1 for i in per_id if i not in fed),
        "feed_duplicated": sum(1 for n in fed.values() if n > 1),
        "feed_unexpected": sum(1 for i in fed if i not in per_id),
        "feed_wrong_total": sum(1 for i, total in feed.received if i in totals and total != totals[i]),
        "feed_errors": len(feed.errors) + (0 if feed_caught_up else 1),
    }


def run(duration: float, broken: bool = False, clients: int = 8, seed: int | None = None, keep: bool = False) -> dict:
    seed = seed if seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    cluster = TempCluster()
    workdir = cluster.dir / "logs"
    workdir.mkdir()
    stack = feed = None
    try:
        cluster.start()
        db_url = fresh_database(cluster.url)
        history = History()
        script = "tests/broken_worker.py" if broken else "billing_worker.py"
        stack = Stack(cluster, db_url, workdir, script, api_count=2, worker_count=3)
        stack.wait_healthy()  # after the assignment: a failure here still shuts the stack down
        stop_clients = threading.Event()
        threads = [Client(stack, history, stop_clients, rng.randrange(1 << 30)) for _ in range(clients)]
        faults = Faults(stack, history, duration, rng, cluster.url)
        feed = FeedConsumer(stack, rng.randrange(1 << 30))
        began = time.monotonic()
        for thread in threads:
            thread.start()
        feed.start()
        faults.start()
        time.sleep(duration)
        faults.join()  # heal: no more faults; the timeline has restarted every worker it stopped
        stop_clients.set()
        for thread in threads:
            thread.join(timeout=120)
        while len(stack.running_workers()) < 3:
            stack.start_worker()

        def drained():
            with psycopg.connect(db_url, autocommit=True) as conn:
                return conn.execute("SELECT count(*) FROM billing_queue WHERE status = 'pending'").fetchone()[0] == 0

        def all_handed_out():
            with psycopg.connect(db_url, autocommit=True) as conn:
                return conn.execute(PAST_THE_HORIZON).fetchone()[0] == 0

        with contextlib.suppress(AssertionError):
            wait_until(drained, 120, interval=0.5, what="the queue to drain")
            # Nothing is billed any more; once no entry waits past the horizon either, an empty
            # page means the consumer has received all the feed will ever hand out.
            wait_until(all_handed_out, 30, interval=0.2, what="every entry below the feed's horizon")
        feed_caught_up = feed.catch_up(timeout=60)
        result = check(history, db_url, feed, feed_caught_up)
        idle_kills = cluster.log.read_text(errors="replace").count("idle-in-transaction timeout")
        result.update(
            {
                "seed": seed,
                "broken_worker": broken,
                "seconds": round(time.monotonic() - began, 1),
                "requests": dict(sorted(history.outcomes.items())),
                "faults": dict(sorted(faults.counts.items())),
                "faults_total": sum(n for k, n in faults.counts.items() if not k.startswith("api_sigterm_exit")),
                "idle_in_transaction_terminations": idle_kills,
                "seconds_to_first_ok_after_restart": {
                    event: round(history.first_ok_after[event] - at, 2) if history.first_ok_after.get(event) else None
                    for event, at in faults.recovery.items()
                },
                "bad_responses": history.bad_responses,
                "feed_caught_up": feed_caught_up,
                "feed_requests": dict(sorted(feed.outcomes.items())),
                "feed_bad_responses": feed.errors,
            }
        )
        failures = [
            k
            for k in (
                "lost", "duplicated", "unexpected", "wrong_total", "stuck", "http_5xx", "http_4xx",
                "feed_missed", "feed_duplicated", "feed_unexpected", "feed_wrong_total", "feed_errors",
            )
            if result[k]
        ]
        if any(k.startswith("api_sigterm_exit_") and k != "api_sigterm_exit_0" for k in faults.counts):
            failures.append("api_sigterm_exit")
        result["failures"] = failures
        result["ok"] = not failures
        return result
    finally:
        if feed is not None:
            feed.stop.set()
        if stack is not None:
            stack.shutdown()
        if not keep:
            cluster.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120, help="seconds of load and faults")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--broken", action="store_true", help="negative control: run tests/broken_worker.py")
    parser.add_argument("--keep", action="store_true", help="keep the cluster and logs for a post-mortem")
    args = parser.parse_args(argv)
    result = run(args.duration, broken=args.broken, clients=args.clients, seed=args.seed, keep=args.keep)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
