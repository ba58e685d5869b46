"""Observability: /metrics, request ids, JSON logs, the queue gauges, billing_status and reconcile.

In process (Falcon's test client, a real PostgreSQL) where that proves it, real processes where
the behaviour is the process's own (log lines on stderr, waitress's own answers, LISTEN wakeups).
"""

import json
import re
import socket
import subprocess
import sys
import time
import uuid

import falcon.testing
import pytest
import requests
import structlog
from prometheus_client.parser import text_string_to_metric_families

import billing_worker
import ledger
import telemetry
from config import Config
from db import make_pool
from reconcile import RECONCILE_CHECKS
from support import ROOT, as_role, free_port, make_backlog, wait_until
from test_billing import poison
from test_processes import service_env


def samples(text: str) -> dict[tuple, float]:
    """{(name, (sorted label pairs)): value} from a Prometheus text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def scrape(client) -> str:
    resp = client.simulate_get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return resp.text


# --- metrics -------------------------------------------------------------------------------------


def test_starts_and_ends_are_counted_once_and_repeats_are_not(api, make_appointment):
    appointment = make_appointment()
    repeat = api.simulate_post("/appointments", json={k: appointment[k] for k in ("id", "physician_id", "patient_id")})
    assert repeat.status_code == 200
    for _ in range(2):
        assert api.simulate_post(f"/appointments/{appointment['id']}/end", json={"end_date": "2020-12-01 14:00:00"}).status_code == 200
    text = scrape(api)
    assert value(text, "clinic_appointments_started_total") == 1
    assert value(text, "clinic_appointments_ended_total") == 1


def test_http_metrics_are_labelled_by_route_template_never_by_raw_id(api, make_appointment):
    appointment = make_appointment(end="2020-12-01 14:00:00")
    api.simulate_get(f"/appointments/{appointment['id']}")
    api.simulate_get("/no/such/place")
    api.simulate_request("FROB", "/appointments")
    text = scrape(api)
    labels = dict(service="appointments", route="/appointments/{appointment_id}", method="GET", status="200")
    assert value(text, "clinic_http_requests_total", **labels) == 1
    assert value(text, "clinic_http_requests_total", service="appointments", route="/appointments/{appointment_id}/end", method="POST", status="200") == 1
    assert value(text, "clinic_http_requests_total", service="appointments", route="unmatched", method="GET", status="404") == 1
    assert value(text, "clinic_http_requests_total", service="appointments", route="/appointments", method="other", status="400") == 1
    count = value(text, "clinic_http_request_duration_seconds_count", service="appointments", route="/appointments/{appointment_id}", method="GET")
    assert count == 1
    for personal in (appointment["id"], appointment["patient_id"], appointment["physician_id"]):
        assert personal not in text


def test_metrics_need_no_database_and_say_so_when_it_is_down():
    """A scrape while PostgreSQL is unreachable answers 200 with clinic_db_up 0 and the process
    metrics, quickly."""
    config = Config(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    pool = make_pool(config, "tests")
    pool.open(wait=False)
    try:
        client = falcon.testing.TestClient(ledger.create_app(config, pool))
        started = time.monotonic()
        text = scrape(client)
        assert time.monotonic() - started < 5
        assert value(text, "clinic_db_up") == 0
        assert value(text, "process_cpu_seconds_total") is not None
        assert value(text, "clinic_billing_queue_rows", status="pending") is None  # no stale guess
    finally:
        pool.close()


def test_queue_gauges_show_pending_failed_and_the_oldest_due_age(config, pool, make_appointment, biller, db):
    metrics = telemetry.WorkerMetrics(pool, config.poll_seconds)
    client = falcon.testing.TestClient(ledger.create_app(config, pool, metrics))
    text = scrape(client)
    assert value(text, "clinic_db_up") == 1
    assert value(text, "clinic_billing_queue_rows", status="pending") == 0
    assert value(text, "clinic_billing_oldest_pending_age_seconds") == 0
    assert value(text, "clinic_billing_poll_interval_seconds") == config.poll_seconds

    waiting = [make_appointment(end="2020-12-01 14:00:00") for _ in range(3)]
    db.execute("UPDATE billing_queue SET available_at = now() - interval '90 seconds' WHERE appointment_id = %s", [waiting[0]["id"]])
    db.execute("UPDATE billing_queue SET status = 'failed', attempts = 10 WHERE appointment_id = %s", [waiting[1]["id"]])
    db.execute("UPDATE billing_queue SET available_at = now() + interval '1 hour' WHERE appointment_id = %s", [waiting[2]["id"]])
    wait_until(lambda: value(scrape(client), "clinic_billing_queue_rows", status="failed") == 1, 5, what="the cache to expire")
    text = scrape(client)
    assert value(text, "clinic_billing_queue_rows", status="pending") == 2
    assert value(text, "clinic_billing_queue_rows", status="failed") == 1
    # The one due 90 s ago is the oldest; the one backing off for an hour is not due, so not counted.
    assert 90 <= value(text, "clinic_billing_oldest_pending_age_seconds") < 100


def test_backup_gauges_show_the_archiver_and_the_newest_recorded_base_backup(config, pool, db):
    """pg_stat_archiver as the server has it (this one may not archive: tests/test_backup.py scrapes
    one that does), and the age of the newest row of base_backups, absent while there is none."""
    client = falcon.testing.TestClient(ledger.create_app(config, pool, telemetry.WorkerMetrics(pool)))
    server = db.execute(
        "SELECT current_setting('archive_mode') <> 'off' AS archiving,"
        "       coalesce(last_failed_time > last_archived_time, false) AS failing FROM pg_stat_archiver"
    ).fetchone()
    archiving, failing = server["archiving"], server["failing"]
    text = scrape(client)
    assert value(text, "clinic_wal_archiving_enabled") == int(archiving)
    assert value(text, "clinic_wal_archive_failing") == int(failing)
    assert value(text, "clinic_wal_archive_failures_total") is not None
    assert value(text, "clinic_base_backup_age_seconds") is None
    db.execute(
        "INSERT INTO base_backups (label, kind, started_at, stopped_at, size_bytes, repo_bytes, wal_start, wal_stop)"
        " VALUES ('20201201-130000F', 'full', now() - interval '2 hours 5 minutes', now() - interval '2 hours', 1, 1, 'a', 'b'),"
        "        ('20201130-130000F', 'full', now() - interval '26 hours', now() - interval '25 hours', 1, 1, 'a', 'b')"
    )
    wait_until(lambda: value(scrape(client), "clinic_base_backup_age_seconds") is not None, 5, what="the next reading")
    assert 7200 <= value(scrape(client), "clinic_base_backup_age_seconds") < 7300  # the newest counts


def test_a_scrape_takes_no_pooled_connection_yet_shows_a_charge_queued_just_before(pool, make_appointment):
    """The gauges come from the pool's monitor, on its own connection: a scrape never waits for a
    pooled connection or runs a query of its own (so it answers while the database hangs), yet it
    shows what was queued just before (it asks the monitor for a fresh probe)."""
    collector = telemetry.QueueCollector(pool)
    make_appointment(end="2020-12-01 14:00:00")
    before = pool.get_stats().get("requests_num", 0)
    samples = {m.name: m.samples for m in collector.collect()}
    assert samples["clinic_db_up"][0].value == 1
    assert samples["clinic_billing_queue_rows"][0].value == 1
    assert pool.get_stats().get("requests_num", 0) == before


def test_the_worker_counts_charges_by_outcome_and_times_its_batches(config, pool, make_appointment, db):
    metrics = telemetry.WorkerMetrics(pool, config.poll_seconds)
    biller = billing_worker.Biller(pool, config.batch_size, max_attempts=2, metrics=metrics)
    before = time.time()
    for _ in range(3):
        make_appointment(end="2020-12-01 14:00:00")
    bad = make_appointment(end="2020-12-01 14:00:00")
    poison(db, bad["id"])
    biller.drain()
    db.execute("UPDATE billing_queue SET available_at = now() WHERE status = 'pending'")
    biller.drain()
    text = prom_text(metrics)
    assert value(text, "clinic_billing_charges_total", outcome="billed") == 3
    assert value(text, "clinic_billing_charges_total", outcome="retried") == 1
    assert value(text, "clinic_billing_charges_total", outcome="failed") == 1
    assert value(text, "clinic_billing_batch_duration_seconds_count") >= 2
    assert value(text, "clinic_billing_last_pass_timestamp_seconds") >= before


def prom_text(metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


# --- request ids ---------------------------------------------------------------------------------


def test_a_well_formed_request_id_is_echoed_and_put_in_problem_details(api):
    resp = api.simulate_get(f"/appointments/{uuid.uuid4()}", headers={"X-Request-ID": "front-desk:42.a_b-c"})
    assert resp.status_code == 404
    assert resp.headers["x-request-id"] == "front-desk:42.a_b-c"
    assert resp.json["request_id"] == "front-desk:42.a_b-c"


@pytest.mark.parametrize("sent", [None, "", "x" * 129, "has space", "naïve", "a/b"])
def test_a_missing_or_malformed_request_id_is_replaced_by_a_new_uuid(api, sent):
    headers = {} if sent is None else {"X-Request-ID": sent}
    resp = api.simulate_get("/health", headers=headers)
    assert uuid.UUID(resp.headers["x-request-id"])
    unmatched = api.simulate_get("/nowhere", headers=headers)
    assert unmatched.json["request_id"] == unmatched.headers["x-request-id"] != sent


def test_the_request_that_ended_an_appointment_is_stored_with_its_charge(api, make_appointment, db):
    appointment = make_appointment()
    resp = api.simulate_post(f"/appointments/{appointment['id']}/end", headers={"X-Request-ID": "end-7"})
    assert resp.status_code == 200
    row = db.execute("SELECT request_id, status FROM billing_status WHERE appointment_id = %s", [appointment["id"]]).fetchone()
    assert row == {"request_id": "end-7", "status": "pending"}


def test_a_failing_charge_is_logged_at_warning_with_its_appointment_and_request_id(api, config, pool, make_appointment, db):
    appointment = make_appointment()
    api.simulate_post(f"/appointments/{appointment['id']}/end", headers={"X-Request-ID": "end-poisoned"})
    poison(db, appointment["id"])
    biller = billing_worker.Biller(pool, config.batch_size, max_attempts=2)
    with structlog.testing.capture_logs() as logs:
        biller.drain()
        db.execute("UPDATE billing_queue SET available_at = now()")
        biller.drain()
    charge_lines = [line for line in logs if line.get("appointment_id") == appointment["id"]]
    assert [(line["log_level"], line["request_id"]) for line in charge_lines] == [("warning", "end-poisoned"), ("error", "end-poisoned")]


# --- real processes: JSON lines on stderr, waitress's own errors, wakeups --------------------------


def json_lines(output: str) -> list[dict]:
    """Every line the process wrote, each of which must be one JSON object."""
    lines = [line for line in output.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_one_request_id_follows_an_appointment_from_the_api_log_to_the_worker_log(services, db_url):
    api = services("appointments.py", db_url, LOG_LEVEL="DEBUG").wait_healthy()
    worker = services("billing_worker.py", db_url, LOG_LEVEL="DEBUG").wait_healthy()
    wait_until(lambda: value(requests.get(worker.base_url + "/metrics", timeout=5).text, "clinic_billing_wakeups_total", reason="listen"), 10, what="LISTEN")
    start = requests.post(api.base_url + "/appointments", json={"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}, timeout=5)
    appointment_id = start.json()["id"]
    end = requests.post(f"{api.base_url}/appointments/{appointment_id}/end", headers={"X-Request-ID": "visit-123"}, timeout=5)
    assert end.status_code == 200 and end.headers["X-Request-ID"] == "visit-123"
    wait_until(lambda: requests.get(f"{worker.base_url}/billing-entries/{appointment_id}", timeout=5).status_code == 200, 10, what="billed")
    wait_until(lambda: "charge_billed" in worker.output(), 5, what="the worker's charge line")
    api.stop()
    worker.stop()

    api_lines, worker_lines = json_lines(api.output()), json_lines(worker.output())
    request_line = next(line for line in api_lines if line.get("request_id") == "visit-123")
    assert request_line | {"ts": None, "duration_ms": None} == {
        "event": "request", "level": "info", "logger": "clinic.http", "service": "appointments", "ts": None,
        "request_id": "visit-123", "method": "POST", "route": "/appointments/{appointment_id}/end",
        "path": f"/appointments/{appointment_id}/end", "status": 200, "duration_ms": None,
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", request_line["ts"])
    assert isinstance(request_line["duration_ms"], float)
    charge_line = next(line for line in worker_lines if line["event"] == "charge_billed")
    assert charge_line["appointment_id"] == appointment_id and charge_line["request_id"] == "visit-123"
    assert charge_line["level"] == "debug" and charge_line["service"] == "billing-worker"
    batch_line = next(line for line in worker_lines if line["event"] == "batch" and line["rows"] == 1)
    assert batch_line["wake_reason"] == "notify" and isinstance(batch_line["duration_ms"], float)
    assert not any(start.json()["patient_id"] in json.dumps(line) for line in api_lines + worker_lines)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_library_log_lines_come_out_in_the_same_format_as_ours(fmt):
    code = (
        "import logging, structlog, telemetry; telemetry.setup_logging('svc', 'INFO', %r);"
        "logging.getLogger('waitress').warning('queue depth %%s', 7);"
        "telemetry.get_logger('clinic.x').info('ours', n=1);"
        "logging.getLogger('psycopg.pool').debug('not shown at INFO')"
    ) % fmt
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    if fmt == "console":
        assert "queue depth 7" in done.stderr and "ours" in done.stderr and "{" not in done.stderr
        return
    theirs, ours = json_lines(done.stderr)
    assert theirs | {"ts": None} == {"event": "queue depth 7", "level": "warning", "logger": "waitress", "service": "svc", "ts": None}
    assert ours | {"ts": None} == {"event": "ours", "n": 1, "level": "info", "logger": "clinic.x", "service": "svc", "ts": None}


def test_the_worker_counts_why_each_pass_started(services, db_url):
    worker = services("billing_worker.py", db_url, BILLING_POLL_SECONDS="0.3").wait_healthy()
    metric = lambda reason: value(requests.get(worker.base_url + "/metrics", timeout=5).text, "clinic_billing_wakeups_total", reason=reason)  # noqa: E731
    wait_until(lambda: metric("listen") == 1, 10, what="a fresh LISTEN")
    with psycopg_connect(db_url) as conn:
        conn.execute("NOTIFY billing_queue")
    wait_until(lambda: metric("notify") >= 1, 10, what="a NOTIFY wakeup")
    wait_until(lambda: metric("poll") >= 2, 10, what="poll wakeups")


def psycopg_connect(url):
    import psycopg

    return psycopg.connect(url, autocommit=True)


def test_waitress_s_own_413_carries_the_request_id_as_problem_details(services, db_url):
    api = services("appointments.py", db_url).wait_healthy()
    port = int(api.env["APPOINTMENTS_PORT"])
    head = (
        b"POST /appointments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000\r\nX-Request-ID: big-upload-1\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head_part, _, body = received.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 413")
    assert b"\r\nx-request-id: big-upload-1" in head_part.lower()
    assert b"\r\nx-content-type-options: nosniff" in head_part.lower()
    assert b"\r\ncache-control: no-store" in head_part.lower()
    assert json.loads(body) | {"detail": None} == {
        "type": "about:blank", "title": "Request Entity Too Large", "status": 413, "detail": None, "request_id": "big-upload-1",
    }


# --- psql and operations ------------------------------------------------------------------------


def test_billing_status_shows_where_each_appointment_s_money_is(make_appointment, biller, db, config):
    open_one = make_appointment()
    billed = make_appointment(end="2020-12-01 14:00:00")
    biller.drain()
    pending = make_appointment(end="2020-12-01 13:30:00")
    failed = make_appointment(end="2020-12-01 13:30:00")
    db.execute("UPDATE billing_queue SET status = 'failed', attempts = 10, last_error = 'boom' WHERE appointment_id = %s", [failed["id"]])
    rows = {str(r["appointment_id"]): r for r in db.execute("SELECT * FROM billing_status")}
    assert list(rows[open_one["id"]].keys()) == ["appointment_id", "price", "status", "ended_at", "billed_at", "attempts", "last_error", "request_id"]
    assert (rows[open_one["id"]]["status"], rows[open_one["id"]]["price"], rows[open_one["id"]]["attempts"]) == ("open", None, 0)
    assert rows[billed["id"]]["status"] == "billed" and rows[billed["id"]]["billed_at"] is not None
    assert str(rows[billed["id"]]["price"]) == "200.00" and rows[billed["id"]]["attempts"] == 1
    assert rows[pending["id"]]["status"] == "pending" and rows[pending["id"]]["billed_at"] is None
    assert (rows[failed["id"]]["status"], rows[failed["id"]]["last_error"]) == ("failed", "boom")


def reconcile(db_url):
    done = subprocess.run(
        [sys.executable, str(ROOT / "billing_worker.py"), "reconcile"], env=service_env(as_role(db_url, "billing_worker.py")), capture_output=True, text=True, timeout=60
    )
    return done.returncode, (json.loads(done.stdout) if done.stdout else done.stderr)


def test_reconcile_passes_a_consistent_ledger_with_its_counts(db_url, make_appointment, biller):
    make_appointment()
    for _ in range(2):
        make_appointment(end="2020-12-01 14:00:00")
    biller.drain()
    make_appointment(end="2020-12-01 14:00:00")
    code, report = reconcile(db_url)
    assert code == 0, report
    assert report["counts"] == {"ended": 3, "entries": 2, "pending": 1, "failed": 0}
    assert all(report[name] == [] for name in RECONCILE_CHECKS)


def test_reconcile_lists_each_kind_of_broken_money_and_exits_1(db_url, make_appointment, biller, db):
    lost_before_queue = make_appointment()
    billed = [make_appointment(end="2020-12-01 14:00:00") for _ in range(5)]
    biller.drain()
    # Made by hand, as a bug or a bad manual fix would: each breaks the ledger in one way.
    db.execute("UPDATE appointments SET end_date = start_date + interval '1 hour', price = 200.00 WHERE id = %s", [lost_before_queue["id"]])
    db.execute("SET session_replication_role = replica")  # past the ledger's append-only triggers, for this session only
    db.execute("DELETE FROM billing_entries WHERE appointment_id = %s", [billed[0]["id"]])
    db.execute("UPDATE billing_entries SET total_price = 199.99 WHERE appointment_id = %s", [billed[1]["id"]])
    # As a dump restored into a new cluster leaves it: a position no transaction here can have written.
    db.execute("UPDATE billing_entries SET txid = '99999999999' WHERE appointment_id = %s", [billed[4]["id"]])
    db.execute("SET session_replication_role = origin")
    db.execute("UPDATE appointments SET end_date = NULL, price = NULL WHERE id = %s", [billed[2]["id"]])
    db.execute("UPDATE billing_queue SET status = 'pending', processed_at = NULL WHERE appointment_id = %s", [billed[3]["id"]])
    code, report = reconcile(db_url)
    assert code == 1
    listed = {name: [row["appointment_id"] for row in report[name]] for name in RECONCILE_CHECKS}
    assert listed == {
        "ended_without_charge": [lost_before_queue["id"]],
        "billed_without_entry": [billed[0]["id"]],
        "wrong_total": [billed[1]["id"]],
        "entry_without_ended_appointment": [billed[2]["id"]],
        "queued_without_ended_appointment": [billed[2]["id"]],
        "entry_not_marked_billed": [billed[3]["id"]],
        "entry_position_ahead_of_server": [billed[4]["id"]],
    }
    assert report["billed_without_entry"][0]["processed_at"] is not None
    status = db.execute("SELECT status FROM billing_status WHERE appointment_id = %s", [lost_before_queue["id"]]).fetchone()
    assert status == {"status": "missing"}
    assert report["wrong_total"][0]["total_price"] == "199.99" and report["wrong_total"][0]["price"] == "200.00"


@pytest.mark.processes  # the command, waiting out its connect timeout
def test_reconcile_without_a_database_exits_2_saying_so():
    code, stderr = reconcile(f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    assert code == 2 and "database unavailable" in stderr


def test_reconcile_on_a_database_without_the_schema_exits_2_not_1(admin_url):
    """1 means "the ledger is wrong"; a database that cannot answer is another matter."""
    from support import create_database, drop_database

    name = f"clinic_test_empty_{uuid.uuid4().hex[:8]}"
    try:
        code, stderr = reconcile(create_database(admin_url, name))
        assert code == 2 and "database error: UndefinedTable" in stderr
    finally:
        drop_database(admin_url, name)


@pytest.mark.slow
def test_the_queue_gauges_stay_index_served_with_ten_million_billed_rows(db):
    """QUEUE_STATS reads billing_queue only through its partial indexes: no sequential scan,
    whatever the size of the ledger. The plan is printed (pytest -s shows it)."""
    # Billed rows straight into the queue, as years of use leave it; FK checks are skipped for
    # the bulk load only (session_replication_role), the rows themselves are well-formed.
    db.execute("SET session_replication_role = replica")
    db.execute(
        """INSERT INTO billing_queue (appointment_id, total_price, status, attempts, processed_at)
           SELECT lpad(to_hex(g), 32, '0')::uuid, 200.00, 'billed', 1, now() FROM generate_series(1, 10000000) g"""
    )
    db.execute("SET session_replication_role = origin")
    make_backlog(db, 500)
    db.execute("VACUUM ANALYZE billing_queue")
    plan = db.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) " + telemetry.QUEUE_STATS).fetchall()
    text = "\n".join(row["QUERY PLAN"] for row in plan)
    print(text)
    assert "Seq Scan" not in text
    assert "billing_queue_due" in text and "billing_queue_failed" in text


def test_re_applying_schema_sql_does_not_wait_for_a_long_reader_of_the_queue(db_url, make_appointment):
    """An up-to-date schema.sql takes no exclusive lock on billing_queue: a report that keeps a
    transaction open on the table (pg_dump, reconcile) does not hold up a deploy, nor the deploy
    every request queued behind its lock."""
    import psycopg

    from db import apply_schema

    make_appointment(end="2020-12-01 14:00:00")
    with psycopg.connect(db_url) as reader:  # not autocommit: the transaction stays open
        reader.execute("SELECT count(*) FROM billing_queue").fetchone()
        started = time.monotonic()
        apply_schema(db_url)
        assert time.monotonic() - started < 5  # lock_timeout is 10 s: it did not wait for it
