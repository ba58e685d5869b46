"""Failover of a Patroni cluster under the running services: no acknowledged end is lost.

The API and two workers run as real processes on a two-member Patroni cluster (tests/ha.py)
through a libpq multi-host URL with target_session_attrs=read-write, under steady start+end load
with client-chosen ids; every unknown outcome (no answer, 503) is retried with the same body until
acknowledged, as tests/chaos.py does. The timeline:

  1. load; the leader's WAL sender paused (SIGSTOP) for WAL_SENDER_PAUSE_SECONDS, so that the
     leader's last commits are ones the standby never received; then the leader killed outright
     (patroni, its postmaster and every backend, SIGKILL)
  2. load; the killed member started again: it rejoins as the sync standby through pg_rewind
  3. load; a controlled switchover to it
  4. load; then `requeue`, `--once` and `db.py apply-schema` through the same URL

Then, from the leader: every acknowledged end has exactly one billing entry with the right total,
nothing is duplicated or unexpected, nothing is left pending or failed, and both workers LISTEN on
the leader again. For each failover it prints how long writes took to come back (a probe inserting
into a scratch table of the `postgres` database through the same URL every PROBE_INTERVAL) and
the API's first successful end after that, and counts the 503s and other errors.

The negative control is the same run on asynchronous replication, up to the kill: the ends
acknowledged while the WAL sender was paused exist only on the dying leader, and the checker must
find them lost.

Needs Debian's patroni, etcd-server and postgresql-15: without them the tests are skipped, unless
REQUIRE_PATRONI=1 (CI), where they fail.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import os
import random
import subprocess
import sys
import threading
import time

import psycopg
import pytest
import requests

import db
import ha
from support import ROOT, SERVICE_VARS, Load, as_role, assert_billed_exactly_once, expected_price, ledger, unavailable, wait_until

pytestmark = pytest.mark.slow

# The bound: the API's first successful end within this many seconds of the new leader
# taking writes (measured by the probe). Before the fix, the pool's reconnect back-off made it ~4 s.
FIRST_END_AFTER_WRITES_MAX_SECONDS = 1.0
CLIENTS = 4
WORKERS = 2
WORKER_POLL_SECONDS = "0.5"
WAL_SENDER_PAUSE_SECONDS = 1.5
# The negative control keeps the WAL sender paused until at least this many ends were acknowledged
# meanwhile (each then exists only on the leader about to die), so the loss is certain, not likely.
CONTROL_ACKED_WHILE_PAUSED = 5
PROBE_INTERVAL = 0.02
PROBE_TIMEOUT = 0.5
RECOVERY_TIMEOUT = 60
# A leader that stops answering instead of dying (frozen, or cut off by the network): the first
# acknowledged end within this many seconds of the new leader taking writes, and no call longer
# than the API's request deadline (config.Config.request_timeout, the services' default) + 1 s.
FIRST_END_AFTER_HUNG_LEADER_MAX_SECONDS = 2.0
REQUEST_DEADLINE = 8.0


def _require_cluster(isolated: bool = False) -> None:
    lacking = ha.missing(isolated)
    if lacking:
        unavailable(f"no Patroni cluster possible here; missing: {', '.join(lacking)}", "REQUIRE_PATRONI")


@pytest.fixture
def patroni_cluster():
    """Makes PatroniClusters; each is torn down (no process left) when the test ends. Requested
    before `services`, so the services are stopped first."""
    _require_cluster()
    made: list[ha.PatroniCluster] = []

    def make(**kwargs) -> ha.PatroniCluster:
        _require_cluster(kwargs.get("isolated", False))
        cluster = ha.PatroniCluster(**kwargs)
        made.append(cluster)
        cluster.__enter__()
        return cluster

    yield make
    for cluster in made:
        cluster.close()


class WriteProbe:
    """Inserts into a scratch table of each member directly, from a thread per member, every
    PROBE_INTERVAL; each attempt ends within PROBE_TIMEOUT on our side (db.within), so that a
    frozen or cut-off member holds up nothing but its own thread: when, and where, the cluster
    takes writes, seen from outside. A standby refuses (read-only): not a write."""

    def __init__(self, cluster: ha.PatroniCluster):
        self.halt = threading.Event()
        self.results: list[tuple[float, str, bool]] = []  # (monotonic when the attempt ended, member, ok)
        with psycopg.connect(cluster.multi_host_url("postgres"), autocommit=True, connect_timeout=2) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS failover_probe (at timestamptz NOT NULL DEFAULT now())")
        self.threads = [
            threading.Thread(target=self._probe, args=(name, member.url("postgres")), daemon=True)
            for name, member in cluster.members.items()
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(10)

    def _probe(self, name: str, url: str) -> None:
        conn = None
        while not self.halt.is_set():
            try:
                with db.within(PROBE_TIMEOUT):
                    if conn is None:
                        conn = db.DeadlineConnection.connect(url, autocommit=True, connect_timeout=2)
                    # A standby is asked, not written to: its refusals would fill its log.
                    if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        raise psycopg.errors.ReadOnlySqlTransaction("a standby")
                    conn.execute("INSERT INTO failover_probe DEFAULT VALUES")
                self.results.append((time.monotonic(), name, True))
            except psycopg.Error:
                self.results.append((time.monotonic(), name, False))
                if conn is not None and conn.closed:
                    conn = None
            self.halt.wait(PROBE_INTERVAL)
        if conn is not None:
            conn.close()


# --- the run ------------------------------------------------------------------------------------


class FailoverRun:
    """The services on a cluster, the load, the probe, and the figures of each failover."""

    def __init__(self, cluster: ha.PatroniCluster, services, seed: int | None = None):
        self.cluster = cluster
        self.url = cluster.multi_host_url()
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.api = services("appointments.py", self.url)
        # support.as_role rewrites the URL into key=value form: both hosts and the attribute stay.
        given = psycopg.conninfo.conninfo_to_dict(self.api.env["DATABASE_URL"])
        assert given["port"] == ",".join(str(m.pg_port) for m in cluster.members.values()), given
        assert given["target_session_attrs"] == "read-write" and given["user"] == "clinic_api", given
        self.workers = [services("billing_worker.py", self.url, BILLING_POLL_SECONDS=WORKER_POLL_SECONDS) for _ in range(WORKERS)]
        for service in [self.api, *self.workers]:
            service.wait_healthy(30)
            wait_until(lambda s=service: _status(s.base_url + "/ready") == 200, 30, what=f"{service.script} /ready")
        self.probe = WriteProbe(cluster)
        self.load = Load(self.api.base_url, self.seed, CLIENTS)
        self.events: dict[str, float] = {}  # monotonic
        self.event_leaders: dict[str, str] = {}  # the leader when it happened
        self.event_walls: dict[str, dt.datetime] = {}  # the same moments, to compare with created_at
        self.pause: dict[str, float | int] = {}

    def start(self) -> None:
        self.probe.start()
        self.load.start()

    def kill_leader_after_pausing_wal_sender(self, until_acked: int = 0) -> str:
        """Pauses the leader's WAL sender for WAL_SENDER_PAUSE_SECONDS (and until `until_acked`
        ends were acknowledged meanwhile), then kills the leader; returns its name."""
        pid = self.cluster.pause_wal_sender()
        paused = time.monotonic()
        try:
            time.sleep(WAL_SENDER_PAUSE_SECONDS)
            wait_until(
                lambda: self._acked_ends_sent_after(paused) >= until_acked, 30, what=f"{until_acked} ends acknowledged while paused"
            )
            self._event("kill")
            killed = self.cluster.kill_leader()
        finally:
            self.cluster.resume_wal_sender(pid)  # a no-op once killed; the leader lives on if the kill failed
        self.pause = {
            "seconds": round(self.events["kill"] - paused, 2),
            "ends_acked_meanwhile": self._acked_ends_sent_after(paused, self.events["kill"]),
        }
        self.paused_at = paused
        return killed

    def switchover(self) -> str:
        self._event("switchover")
        return self.cluster.switchover()

    def freeze_leader(self) -> tuple[str, list[int]]:
        self._event("freeze")
        return self.cluster.freeze_leader()

    def partition_leader(self) -> str:
        self._event("partition")
        return self.cluster.partition_leader()

    def wait_recovered(self, event: str) -> dict:
        """Waits for the probe and the API to write again, then for both workers to LISTEN on
        the new leader and for a charge to be billed there; returns the figures."""
        try:
            figures = wait_until(
                lambda: self.recovery(event), RECOVERY_TIMEOUT, interval=0.1, what=f"writes and an end after the {event}"
            )
            with self.leader_connection() as conn:
                wait_until(
                    lambda: _listeners_on(conn) == WORKERS, RECOVERY_TIMEOUT, interval=0.1, what=f"both workers to LISTEN after the {event}"
                )
                figures["listening_s"] = round(time.monotonic() - self.events[event], 2)
                # Billed in a transaction that began once the outage had: on the new leader.
                outage = self.event_walls[event] + dt.timedelta(seconds=figures["outage_began_s"])
                billed = wait_until(
                    lambda: conn.execute("SELECT min(created_at) FROM billing_entries WHERE created_at > %s", [outage]).fetchone()[0],
                    RECOVERY_TIMEOUT, interval=0.1, what=f"a charge billed after the {event}",
                )
                figures["first_billed_s"] = round((billed - self.event_walls[event]).total_seconds(), 2)
            return figures
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nAPI log:\n{self.api.output()[-3000:]}\n{self.cluster.describe()}") from None

    def recovery(self, event: str) -> dict | None:
        """The figures of one failover, None until writes and an end came back after it.

        The outage begins at the old leader's first failed probe after the event (a switchover's
        old leader serves on for a moment; a frozen one's probe fails after PROBE_TIMEOUT); writes
        are back at the first successful probe of any member after that; the API is back at the
        first end acknowledged of those sent once the outage had begun (only the new leader can
        have served them)."""
        at, old = self.events[event], self.event_leaders[event]
        results = list(self.probe.results)
        outage = next((t for t, member, ok in results if t >= at and member == old and not ok), None)
        if outage is None:
            return None
        writes = next((t for t, _, ok in results if t > outage and ok), None)
        with self.load.lock:
            attempts = list(self.load.attempts)
        ends = [a.done for a in attempts if a.kind == "end" and a.outcome == "acked" and a.sent >= outage]
        if writes is None or not ends:
            return None
        first_end = min(ends)
        window = [a for a in attempts if at <= a.done <= first_end]
        return {
            "new_leader": next((m for t, m, ok in results if t > outage and ok), None),
            "outage_began_s": round(outage - at, 2),
            "writes_back_s": round(writes - at, 2),
            "first_end_s": round(first_end - at, 2),
            "first_end_after_writes_s": round(first_end - writes, 2),
            "503s": sum(1 for a in window if a.outcome == "503"),
            "no_responses": sum(1 for a in window if a.outcome == "no_response"),
            "other_errors": sum(1 for a in window if a.outcome in ("4xx", "5xx")),
        }

    def drive(self, seconds: float) -> None:
        """Lets the load run; fails early if a service died."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for service in [self.api, *self.workers]:
                assert service.popen.poll() is None, f"{service.script} exited:\n{service.output()[-3000:]}"
            time.sleep(0.2)

    def finish(self) -> bool:
        finished = self.load.stop(timeout=60)
        self.probe.stop()
        return finished

    def leader_connection(self) -> psycopg.Connection:
        """A superuser connection to the leader through the multi-host URL (2 s per host that
        does not answer)."""
        return psycopg.connect(self.url, autocommit=True, connect_timeout=2)

    def longest_call(self) -> float:
        with self.load.lock:
            return max((a.done - a.sent for a in self.load.attempts), default=0.0)

    def _event(self, name: str) -> None:
        self.event_leaders[name] = self.cluster.leader()
        self.events[name] = time.monotonic()
        self.event_walls[name] = dt.datetime.now(dt.timezone.utc)

    def _acked_ends_sent_after(self, since: float, until: float = float("inf")) -> int:
        with self.load.lock:
            return sum(1 for a in self.load.attempts if a.kind == "end" and a.outcome == "acked" and since <= a.sent and a.done <= until)

    # -- the count -------------------------------------------------------------------------------

    def drain(self, conn) -> bool:
        return _eventually(lambda: ledger(conn)["pending"] == 0, 60)

    def count(self, conn) -> dict:
        entries = conn.execute("SELECT appointment_id::text, total_price FROM billing_entries").fetchall()
        queued_at = {
            r[0]: float(r[1]) for r in conn.execute("SELECT appointment_id::text, extract(epoch FROM created_at) FROM billing_queue")
        }
        ended_in_data = {r[0] for r in conn.execute("SELECT id::text FROM appointments WHERE end_date IS NOT NULL")}
        per_id = collections.Counter(row[0] for row in entries)
        totals = {row[0]: row[1] for row in entries}
        apps = self.load.appointments
        acked = [a for a in apps.values() if a.end_acked]
        lost = [a for a in acked if per_id[a.id] != 1]
        paused = [a for a in acked if "kill" in self.events and self.paused_at <= a.acked_attempt_sent and a.end_acked_at <= self.events["kill"]]
        outcomes = self.load.outcomes()
        return {
            "appointments": len(apps),
            "ends_acknowledged": len(acked),
            "billing_entries": len(entries),
            "lost": len(lost),
            # Sent after the WAL sender was paused and acknowledged before the kill: committed
            # where only the dying leader had them (none in synchronous mode).
            "acked_while_paused": len(paused),
            "lost_of_acked_while_paused": sum(1 for a in paused if per_id[a.id] != 1),
            "duplicated": sum(1 for n in per_id.values() if n > 1),
            "unexpected": sum(1 for i in per_id if i not in apps or not apps[i].end_sent),
            "ended_unexpectedly": sum(1 for i in ended_in_data if i not in apps or not apps[i].end_sent),
            "wrong_total": sum(1 for i, total in totals.items() if i in apps and total != expected_price(apps[i].minutes)),
            # Ends in doubt that had committed: an error or no answer, yet the commit happened
            # before the retry that got the 2xx (which then returned the stored result).
            "in_doubt_committed": sum(
                1 for a in acked if a.end_unknowns and a.id in queued_at and queued_at[a.id] < a.acked_attempt_sent_at
            ),
            "requests": dict(sorted(outcomes.items())),
            "http_503": sum(n for k, n in outcomes.items() if k.endswith("_503")),
            "no_response": sum(n for k, n in outcomes.items() if k.endswith("_no_response")),
            "http_5xx_other": sum(n for k, n in outcomes.items() if k.endswith("_5xx")),
            "http_4xx": sum(n for k, n in outcomes.items() if k.endswith("_4xx")),
            "bad_responses": self.load.bad_responses,
        }


def _status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return None


def _eventually(predicate, timeout: float) -> bool:
    """wait_until that answers False instead of failing, so that the figures still get printed."""
    with contextlib.suppress(AssertionError):
        return bool(wait_until(predicate, timeout, interval=0.2))
    return False


def _listeners_on(conn) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'billing-worker-listen'").fetchone()[0]


def _run_tool(script: str, *args: str, database_url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], env={**env, "DATABASE_URL": database_url}, capture_output=True, text=True, timeout=60
    )


def _show(title: str, figures: dict, capsys) -> None:
    with capsys.disabled():  # the figures belong in the CI log
        print(f"\n{title}:", json.dumps(figures, indent=2, default=str))


# --- the tests ----------------------------------------------------------------------------------


def test_leader_killed_rejoined_and_switched_over_under_load_loses_no_acknowledged_end(patroni_cluster, services, capsys):
    began = time.monotonic()
    cluster = patroni_cluster(synchronous=True)
    run = FailoverRun(cluster, services)
    figures: dict = {"seed": run.seed, "cluster_start": dict(cluster.timings)}
    run.start()
    run.drive(3)

    first_leader = cluster.leader()
    killed = run.kill_leader_after_pausing_wal_sender()
    figures["kill"] = {"killed": killed, "wal_sender_pause": run.pause, **run.wait_recovered("kill")}
    new_leader = cluster.leader()
    run.drive(2)

    rejoin_began = time.monotonic()
    cluster.restart_member(killed)
    cluster.wait_ready(60)  # the killed member is the sync standby again, caught up, on the new timeline
    figures["rejoin"] = {"member": killed, "seconds": round(time.monotonic() - rejoin_began, 2), "pg_rewind": cluster.rewound(killed)}
    run.drive(1)

    switched_to = run.switchover()
    figures["switchover"] = {"to": switched_to, **run.wait_recovered("switchover")}
    run.drive(2)
    clients_finished = run.finish()

    # The one-shot commands and the schema tool find the leader through the same URL.
    tools = {
        "requeue": _run_tool("billing_worker.py", "requeue", database_url=as_role(run.url, "billing_worker.py")),
        "once": _run_tool("billing_worker.py", "--once", database_url=as_role(run.url, "billing_worker.py")),
        "apply-schema": _run_tool("db.py", "apply-schema", database_url=run.url),
    }

    with psycopg.connect(run.url, autocommit=True) as conn:
        drained = run.drain(conn)
        listening = _eventually(lambda: _listeners_on(conn) == WORKERS, 15)
        result = run.count(conn)
        figures.update(result)
        figures["seconds"] = round(time.monotonic() - began, 1)
        figures["leaders"] = [first_leader, new_leader, switched_to]
        figures["tools_exit"] = {name: done.returncode for name, done in tools.items()}
        _show("failover run (synchronous_mode)", figures, capsys)

        assert clients_finished, "a client never got its last request acknowledged"
        for name, done in tools.items():
            assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
        assert drained, f"charges still pending: {ledger(conn)}"
        assert_billed_exactly_once(conn, ended=ledger(conn)["ended"])
    assert result["ends_acknowledged"] > 0
    # no_response: while there was no leader, the API still answered (503 + Retry-After), in time.
    for key in ("lost", "duplicated", "unexpected", "ended_unexpectedly", "wrong_total", "http_5xx_other", "http_4xx", "no_response"):
        assert result[key] == 0, (key, json.dumps(figures, default=str))
    assert not result["bad_responses"], result["bad_responses"]  # also: every 503 carried Retry-After
    # Synchronous replication: nothing sent while the WAL sender was paused was acknowledged.
    assert run.pause["ends_acked_meanwhile"] == result["acked_while_paused"] == 0, run.pause
    assert figures["rejoin"]["pg_rewind"], cluster.describe()
    assert listening
    # Last, so that every durability check above has run: the speed bound.
    for event in ("kill", "switchover"):
        assert figures[event]["first_end_after_writes_s"] <= FIRST_END_AFTER_WRITES_MAX_SECONDS, (event, figures[event])


def test_negative_control_asynchronous_replication_loses_the_ends_acknowledged_before_the_kill(patroni_cluster, services, capsys):
    """The same run up to the kill, on asynchronous replication: the ends acknowledged while the
    WAL sender was paused never reached the standby, and the checker must find them lost."""
    cluster = patroni_cluster(synchronous=False)
    run = FailoverRun(cluster, services)
    run.start()
    run.drive(2)
    killed = run.kill_leader_after_pausing_wal_sender(until_acked=CONTROL_ACKED_WHILE_PAUSED)
    recovered = run.wait_recovered("kill")
    run.drive(1)
    run.finish()
    with psycopg.connect(run.url, autocommit=True) as conn:
        run.drain(conn)
        result = run.count(conn)
    shown = ("ends_acknowledged", "lost", "acked_while_paused", "lost_of_acked_while_paused", "duplicated", "http_4xx", "requests")
    figures = {"killed": killed, "wal_sender_pause": run.pause, **recovered, **{k: result[k] for k in shown}}
    _show("negative control (asynchronous)", figures, capsys)
    assert result["acked_while_paused"] >= CONTROL_ACKED_WHILE_PAUSED, result
    # Every end acknowledged while the standby received nothing is gone: the checker sees a loss.
    assert result["lost_of_acked_while_paused"] == result["acked_while_paused"], result
    assert result["lost"] >= result["acked_while_paused"]


# --- leaders that hang instead of dying ----------------------------------------------------------


def _hung_leader_run(cluster: ha.PatroniCluster, run: FailoverRun, event: str, hang, release, capsys) -> dict:
    """Load; hang() the leader; wait for the standby to take over and the API and workers to
    follow; release() the old leader, which must rejoin as the sync standby; count the money."""
    began = time.monotonic()
    run.start()
    run.drive(3)
    hung = hang()
    try:
        figures: dict = {"seed": run.seed, event: {"member": hung, **run.wait_recovered(event)}}
        run.drive(2)
    finally:
        release()
    released = time.monotonic()
    state = cluster.wait_ready(90)  # the old leader back as the sync standby, caught up
    roles = {m["name"]: m["role"] for m in state["members"]}
    figures["rejoin"] = {"seconds": round(time.monotonic() - released, 2), "roles": roles, "pg_rewind": cluster.rewound(hung)}
    run.drive(2)
    finished = run.finish()
    with run.leader_connection() as conn:
        drained = run.drain(conn)
        result = run.count(conn)
        figures.update(result)
        figures["longest_call_s"] = round(run.longest_call(), 2)
        figures["seconds"] = round(time.monotonic() - began, 1)
        _show(f"{event} of the leader (synchronous_mode)", figures, capsys)
        assert finished, "a client never got its last request acknowledged"
        assert drained, f"charges still pending: {ledger(conn)}"
        assert_billed_exactly_once(conn, ended=ledger(conn)["ended"])
    assert result["ends_acknowledged"] > 0
    for key in ("lost", "duplicated", "unexpected", "ended_unexpectedly", "wrong_total", "http_5xx_other", "http_4xx", "no_response"):
        assert result[key] == 0, (key, json.dumps(figures, default=str))
    assert not result["bad_responses"], result["bad_responses"]
    assert roles[hung] in ("sync_standby", "replica") and roles[figures[event]["new_leader"]] == "leader", roles
    assert figures["longest_call_s"] <= REQUEST_DEADLINE + 1, figures
    assert figures[event]["first_end_after_writes_s"] <= FIRST_END_AFTER_HUNG_LEADER_MAX_SECONDS, figures[event]
    return figures


def test_a_frozen_leader_costs_no_call_more_than_its_deadline_and_loses_no_acknowledged_end(patroni_cluster, services, capsys):
    """The leader's patroni, postmaster and backends SIGSTOPped (a paused VM: its sockets stay
    open, nothing answers), SIGCONTed once the standby has taken over: the API follows the new
    leader within 2 s of it taking writes, no call outlives the deadline, nothing acknowledged
    is lost or doubled, and the old leader, resumed, sees the new owner of the leader key and
    rejoins as the standby (Patroni's etcd v2 DCS: ha.py)."""
    cluster = patroni_cluster(synchronous=True)
    run = FailoverRun(cluster, services)
    frozen: list[int] = []

    def hang() -> str:
        name, pids = run.freeze_leader()
        frozen.extend(pids)
        return name

    _hung_leader_run(cluster, run, "freeze", hang, lambda: cluster.thaw(frozen), capsys)


def test_a_partitioned_leader_costs_no_call_more_than_its_deadline_and_loses_no_acknowledged_end(patroni_cluster, services, capsys):
    """The leader's PostgreSQL and patroni in a network namespace whose link is taken down (its
    connections go silent, new ones find no route), then brought back: the same bounds."""
    cluster = patroni_cluster(synchronous=True, isolated=True)
    run = FailoverRun(cluster, services)
    _hung_leader_run(cluster, run, "partition", run.partition_leader, cluster.heal, capsys)
