"""The restore drill of tests/test_backup.py and of `make bench` (section 9), in one place.

A cluster archiving with pgBackRest (support.PgBackRest) under the clients' load (support.Load)
through the real API, a worker billing, a change-feed consumer; a full backup in the middle of
the load; a disaster; the restore the runbook prescribes; then the restored ledger checked against
what the clients were told, and the RPO and RTO it came to.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
import uuid

import psycopg
import requests

import paging
from support import ROOT, Load, PgBackRest, TempCluster, expected_price, ledger, run_worker_command, wait_until

RPO_SECONDS = 5.0  # the promise: an end acknowledged longer ago than this survives losing the volume
LOAD_SECONDS = 4.0  # before and after the base backup
COMPOSE_FILE = ROOT / "docker-compose.yml"


def archive_timeout() -> str:
    """docker-compose.yml's default, so that the drill measures what `docker compose up` runs."""
    found = re.search(r"archive_timeout=\$\{WAL_ARCHIVE_TIMEOUT:-(\w+)\}", COMPOSE_FILE.read_text())
    assert found, "docker-compose.yml no longer sets archive_timeout from WAL_ARCHIVE_TIMEOUT"
    return found.group(1)


def start_archiving(cluster: TempCluster, wake: bool = True) -> PgBackRest:
    """Starts ``cluster`` archiving as docker-compose.yml's db does, into a stanza of its own;
    ``wake=False`` leaves the checkpointer as PostgreSQL starts it (see wake_checkpointer)."""
    repo = PgBackRest(cluster)
    cluster.configure(archive_mode="on", archive_command=repo.archive_command, archive_timeout=archive_timeout())
    cluster.start()
    repo.run("stanza-create")
    if wake:
        wake_checkpointer(cluster.url)
    return repo


def wake_checkpointer(url: str) -> None:
    """What the compose db service's healthcheck does once per server start (deploy/postgres/
    clinic-db-ready): without it archive_timeout closes no segment until the first checkpoint."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")


class Consumer:
    """A change-feed consumer: reads pages from its cursor on, keeps what it got."""

    def __init__(self, base_url: str, headers: dict | None = None):
        self.base_url, self.headers = base_url, headers or {}
        self.cursor: str | None = None
        self.entries: list[dict] = []

    def read_all(self) -> list[dict]:
        """Every entry past the cursor, now; moves the cursor."""
        got = []
        while True:
            params = {"limit": 1000, **({"after": self.cursor} if self.cursor else {})}
            response = requests.get(self.base_url + "/billing-entries/changes", params=params, headers=self.headers, timeout=30)
            assert response.status_code == 200, response.text
            page = response.json()
            got += page["entries"]
            self.cursor = page["cursor"] or self.cursor
            if not page["entries"]:
                break
        self.entries += got
        return got


ENTRIES_SINCE = "SELECT appointment_id::text, txid::text FROM billing_entries WHERE created_at >= %(since)s"
TOTALS_SINCE = "SELECT appointment_id::text, total_price FROM billing_entries WHERE created_at >= %(since)s"


class Drill:
    """The services on an archiving cluster, the clients' load, the base backup in its middle."""

    # The worker should poll every second: after a restore it finds the pending charges at once.
    WORKER_SETTINGS = {"BILLING_POLL_SECONDS": "1"}

    def __init__(self, cluster: TempCluster, repo: PgBackRest, db_url: str, api_url: str, worker_url: str, seed: int,
                 headers: dict | None = None, load_seconds: float = LOAD_SECONDS):
        self.cluster, self.repo, self.db_url = cluster, repo, db_url
        self.api_url, self.headers, self.load_seconds = api_url, headers or {}, load_seconds
        self.load = Load(api_url, seed=seed, clients=4, timeout=(2, 15), headers=self.headers)
        self.consumer = Consumer(worker_url, self.headers)
        self.backup_s = 0.0
        self.positions: dict[str, str] = {}
        self.probe_id = str(uuid.uuid4())
        # What the database held before the drill (a benchmark's million rows) is left out of what
        # is read back whole: entries from now on, and the consumer's cursor past the last one.
        with psycopg.connect(db_url, autocommit=True) as conn:
            self.since = conn.execute("SELECT now()").fetchone()[0]
            self.entries_before = conn.execute("SELECT count(*) FROM billing_entries").fetchone()[0]
            last = conn.execute("SELECT txid::text, appointment_id FROM billing_entries ORDER BY txid DESC, appointment_id DESC LIMIT 1").fetchone()
        if last is not None:
            self.consumer.cursor = paging.feed_cursor(paging.FeedPosition(int(last[0]), last[1]))

    def load_with_a_backup_in_the_middle(self) -> None:
        self.load.start()
        time.sleep(self.load_seconds)
        began = time.monotonic()
        self.repo.clinic_backup("full", self.db_url)  # as `docker compose run --rm backup clinic-backup full`
        self.backup_s = time.monotonic() - began
        self.consumer.read_all()  # a cursor taken mid-load, from before either disaster
        self.note_positions()
        time.sleep(self.load_seconds)

    def note_positions(self) -> None:
        """Each entry's place in the change feed (the id of the transaction that wrote it), now."""
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            self.positions = dict(conn.execute(ENTRIES_SINCE, {"since": self.since}).fetchall())

    def restore(self, *target: str) -> dict:
        """The runbook's steps against this cluster, timed: the server stopped, the restore, the
        server started and promoted, then the first end the API acknowledges."""
        began = time.monotonic()
        if (self.cluster.data / "postmaster.pid").exists():
            self.cluster.stop()
        self.repo.restore(*target)
        restored = time.monotonic()
        self.cluster.start()
        with psycopg.connect(self.cluster.url, autocommit=True) as conn:
            wait_until(lambda: not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0], 300, interval=0.1, what="promotion")
        promoted = time.monotonic()
        wake_checkpointer(self.cluster.url)
        self.repo.run("check")  # the new timeline's first segment archived, as the runbook does
        first_end = self._first_acknowledged_end()
        return {
            "restore_s": round(restored - began, 2),
            "replay_and_promote_s": round(promoted - restored, 2),
            "rto_s": round(first_end - began, 2),
        }

    def _first_acknowledged_end(self) -> float:
        """The services reconnect by themselves; when does an end go through again? One
        appointment of the drill's own id, started and ended, both retried until acknowledged."""
        body = {"id": self.probe_id, "physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()),
                "start_date": "2024-01-01T08:00:00+00:00"}

        def ended():
            with requests.Session() as session:
                session.headers.update(self.headers)
                with contextlib.suppress(requests.RequestException):
                    if session.post(self.api_url + "/appointments", json=body, timeout=5).status_code not in (200, 201):
                        return False
                    end = session.post(f"{self.api_url}/appointments/{self.probe_id}/end",
                                       json={"end_date": "2024-01-01T08:30:00+00:00"}, timeout=5)
                    return end.status_code == 200 and time.monotonic()
                return False

        return wait_until(ended, 60, interval=0.05, what="an end acknowledged after the restore")

    def check(self, disaster_at: float) -> dict:
        """The restored ledger against the clients' record, once the worker has billed what was
        pending; the consumer goes on from its cursor."""
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            wait_until(lambda: ledger(conn)["pending"] == 0, 60, interval=0.2, what="the worker to bill the restored backlog")
            billed = {r[0]: r[1] for r in conn.execute(TOTALS_SINCE, {"since": self.since})}
            entries_now = conn.execute(ENTRIES_SINCE, {"since": self.since}).fetchall()
            count = ledger(conn)
        acked = [a for a in self.load.appointments.values() if a.end_acked]
        lost = [a for a in acked if a.id not in billed]
        ours = {a.id for a in self.load.appointments.values() if a.end_sent}
        more = self.consumer.read_all()
        seen = [e["appointment_id"] for e in self.consumer.entries]
        reconcile = run_worker_command(self.db_url, "reconcile")
        return {
            "ends_acknowledged": len(acked),
            "lost": len(lost),
            "lost_older_than_rpo": sum(1 for a in lost if disaster_at - a.end_acked_at > RPO_SECONDS),
            # How far back the loss reaches: the oldest acknowledged end that is gone.
            "loss_window_s": round(max((disaster_at - a.end_acked_at for a in lost), default=0.0), 2),
            "wrong_total": sum(1 for a in acked if a.id in billed and billed[a.id] != expected_price(a.minutes)),
            # Billed, but no client ever sent its end (the drill's own, _first_acknowledged_end's, aside).
            "unexpected": sum(1 for i in billed if i not in ours and i != self.probe_id),
            "ledger": count,
            "entries_before_the_drill": self.entries_before,
            "reconcile_exit": reconcile.returncode,
            "reconcile_output": reconcile.stdout[-500:] + reconcile.stderr[-500:],
            "feed_after_restore": len(more),
            "feed_repeated": len(seen) - len(set(seen)),
            "feed_missed": len(set(billed) - set(seen)),
            "feed_seen_but_gone": len(set(seen) - set(billed)),
            # Entries noted before the disaster, still at the same place in the feed (txid).
            "positions_noted": len(self.positions),
            "positions_kept": sum(1 for i, txid in entries_now if self.positions.get(i) == txid),
        }


def assert_exact(figures: dict) -> None:
    count = figures["ledger"]
    assert figures["ends_acknowledged"] > 100, figures
    assert figures["wrong_total"] == figures["unexpected"] == 0, figures
    assert count["pending"] == count["failed"] == count["not_billed_once"] == count["status_mismatch"] == count["wrong_total"] == 0, figures
    assert count["ended"] == count["entries"], figures
    assert figures["reconcile_exit"] == 0, figures["reconcile_output"]
    assert figures["feed_repeated"] == figures["feed_missed"] == 0, figures


def lose_the_volume_under_load(drill: Drill) -> float:
    """The data directory gone while the clients write: an immediate stop (no last checkpoint,
    no last archiving) and the directory deleted. Returns when it happened."""
    drill.cluster.stop("immediate")
    shutil.rmtree(drill.cluster.data)
    drill.cluster.data.mkdir(mode=0o700)  # a new, empty volume
    if drill.cluster._as:
        shutil.chown(drill.cluster.data, "postgres", "postgres")
    lost_at = time.monotonic()
    assert drill.load.give_up(30), "the clients did not give up"
    return lost_at
