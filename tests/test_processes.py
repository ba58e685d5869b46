"""The real services: waitress processes and worker processes, killed and restarted mid-work."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from support import ROOT, SERVICE_VARS, as_role, assert_billed_exactly_once, assert_problem, ledger, make_backlog, wait_until

# Real service processes and commands, killed and restarted.
pytestmark = pytest.mark.processes

JSON = {"Content-Type": "application/json"}


def start_appointment(base, **fields):
    body = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": "2020-12-01 13:00:00", **fields}
    result = requests.post(f"{base}/appointments", json=body, timeout=10)
    assert result.status_code == 201, result.text
    return result.json()


def end_appointment(base, appointment_id, end_date="2020-12-01 14:00:00"):
    result = requests.post(f"{base}/appointments/{appointment_id}/end", json={"end_date": end_date}, timeout=10)
    assert result.status_code == 200, result.text
    return result.json()


def billing_entry(worker, appointment_id):
    result = requests.get(f"{worker.base_url}/billing-entries/{appointment_id}", timeout=5)
    return result.json() if result.status_code == 200 else None


def service_env(db_url, **env):
    """This process's environment without our settings, plus the database and env."""
    base = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    return {**base, "DATABASE_URL": db_url, **{k: str(v) for k, v in env.items()}}


def run_once(db_url, *args, **env):
    """python billing_worker.py --once (or another command) to completion."""
    return subprocess.run(
        [sys.executable, str(ROOT / "billing_worker.py"), *args], env=service_env(as_role(db_url, "billing_worker.py"), **env), capture_output=True, text=True, timeout=120
    )


# --- the HTTP contract against real waitress servers -------------------------------------------


def test_every_endpoint_and_error_code_over_real_waitress(services, db_url):
    api = services("appointments.py", db_url).wait_healthy()
    worker = services("billing_worker.py", db_url).wait_healthy()
    base = api.base_url

    appointment = start_appointment(base)
    assert requests.get(f"{base}/appointments/{appointment['id']}").json() == appointment
    ended = end_appointment(base, appointment["id"], "2020-12-01 14:30:00")
    assert ended["price"] == 300.0 and '"price":300.00' in requests.get(f"{base}/appointments/{appointment['id']}").text

    def problem(response, status):
        return assert_problem(response, status)["detail"]

    assert "physician_id" in problem(requests.post(f"{base}/appointments", json={"patient_id": str(uuid.uuid4())}), 400)
    assert "body" in problem(requests.post(f"{base}/appointments", data=b"{", headers=JSON), 400)
    assert "id" in problem(requests.get(f"{base}/appointments/nope"), 400)
    assert problem(requests.get(f"{base}/appointments/{uuid.uuid4()}"), 404)
    assert "end_date" in problem(requests.post(f"{base}/appointments/{appointment['id']}/end", json={"end_date": "2020-12-01 15:00:00"}), 409)
    assert "Content-Type" in problem(requests.post(f"{base}/appointments", data=b"a=1", headers={"Content-Type": "text/plain"}), 415)
    other = start_appointment(base)
    assert "end_date" in problem(requests.post(f"{base}/appointments/{other['id']}/end", json={"end_date": "2020-12-01 12:00:00"}), 422)
    assert "body" in problem(requests.post(f"{base}/appointments", data=b"[" * 5000, headers=JSON), 400)
    assert problem(requests.delete(f"{base}/appointments"), 405)
    for path in ("/health", "/ready", "/openapi.json"):
        assert requests.get(base + path).status_code == 200
        assert requests.get(worker.base_url + path).status_code == 200

    entry = wait_until(lambda: billing_entry(worker, appointment["id"]), 10, what="billing entry")
    assert entry["total_price"] == 300.0
    assert "limit" in problem(requests.get(f"{worker.base_url}/billing-entries?limit=0"), 400)
    assert problem(requests.get(f"{worker.base_url}/billing-entries/{uuid.uuid4()}"), 404)


def test_a_10_mb_body_is_refused_with_413_before_it_is_read(services, db_url):
    api = services("appointments.py", db_url).wait_healthy()
    big = b'{"physician_id": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    result = requests.post(f"{api.base_url}/appointments", data=big, headers=JSON, timeout=30)
    assert result.status_code == 413
    assert result.headers["Content-Type"] == "application/problem+json" and "body" in result.json()["detail"]
    # Exactly 64 KiB is still read and judged on its content.
    at_limit = b'{"x": "' + b"y" * (64 * 1024 - 9) + b'"}'
    assert len(at_limit) == 64 * 1024
    assert requests.post(f"{api.base_url}/appointments", data=at_limit, headers=JSON).status_code == 400


def test_twenty_concurrent_identical_end_requests_make_one_charge(services, db_url, db):
    api = services("appointments.py", db_url).wait_healthy()
    appointment = start_appointment(api.base_url)
    url = f"{api.base_url}/appointments/{appointment['id']}/end"
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: requests.post(url, json={"end_date": "2020-12-01 14:00:00"}, timeout=30), range(20)))
    assert [r.status_code for r in results] == [200] * 20
    assert len({r.text for r in results}) == 1
    assert run_once(db_url, "--once").returncode == 0
    assert_billed_exactly_once(db, ended=1)


def test_sigterm_stops_the_api_cleanly(services, db_url):
    api = services("appointments.py", db_url).wait_healthy()
    api.signal(signal.SIGTERM)
    assert api.wait(timeout=10) == 0


def test_a_bad_setting_stops_a_service_at_start_naming_the_variable(services, db_url):
    api = services("appointments.py", db_url, HOURLY_RATE="lots")
    worker = services("billing_worker.py", db_url, BILLING_BATCH_SIZE="-3")
    assert api.wait(timeout=10) != 0 and "HOURLY_RATE" in api.output()
    assert worker.wait(timeout=10) != 0 and "BILLING_BATCH_SIZE" in worker.output()


# --- the worker ---------------------------------------------------------------------------------


def test_notify_bills_an_ended_appointment_without_waiting_for_the_poll(services, db_url, db):
    api = services("appointments.py", db_url).wait_healthy()
    worker = services("billing_worker.py", db_url, BILLING_POLL_SECONDS=3600).wait_healthy()
    listening = "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND query = 'LISTEN billing_queue' AND state = 'idle'"
    wait_until(lambda: db.execute(listening).fetchone(), 10, what="the worker to LISTEN")  # the poll would take an hour
    appointment = start_appointment(api.base_url)
    end_appointment(api.base_url, appointment["id"])
    assert wait_until(lambda: billing_entry(worker, appointment["id"]), 10, what="NOTIFY-driven billing")


def test_the_poll_bills_charges_that_came_without_a_notify(services, db_url, db):
    worker = services("billing_worker.py", db_url, BILLING_POLL_SECONDS=0.5).wait_healthy()
    make_backlog(db, 5)  # plain INSERTs: no NOTIFY is sent
    wait_until(lambda: ledger(db)["entries"] == 5, 10, what="polled billing")
    assert_billed_exactly_once(db, ended=5)
    assert worker.popen.poll() is None


def test_with_billing_listen_off_the_worker_does_not_listen_and_waits_for_its_poll(services, db_url, db):
    """BILLING_LISTEN=off (behind a PgBouncer in transaction mode): no LISTEN connection, and an end
    is not billed before the poll (an hour here) although the API sent its NOTIFY."""
    api = services("appointments.py", db_url).wait_healthy()
    worker = services("billing_worker.py", db_url, BILLING_POLL_SECONDS=3600, BILLING_LISTEN="off").wait_healthy()
    appointment = start_appointment(api.base_url)
    end_appointment(api.base_url, appointment["id"])
    time.sleep(1.5)  # NOTIFY-driven billing takes milliseconds (the test above)
    assert billing_entry(worker, appointment["id"]) is None
    listeners = "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'billing-worker-listen'"
    assert db.execute(listeners).fetchone()["n"] == 0
    assert ledger(db)["pending"] == 1


def test_a_lost_listen_connection_is_listened_again(services, db_url, db):
    api = services("appointments.py", db_url).wait_healthy()
    worker = services("billing_worker.py", db_url, BILLING_POLL_SECONDS=3600).wait_healthy()
    listeners = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'billing-worker-listen'"
    old = wait_until(lambda: db.execute(listeners).fetchone(), 10, what="the LISTEN connection")["pid"]
    db.execute("SELECT pg_terminate_backend(%s)", [old])
    wait_until(lambda: (row := db.execute(listeners).fetchone()) and row["pid"] != old, 10, what="a new LISTEN connection")
    appointment = start_appointment(api.base_url)
    end_appointment(api.base_url, appointment["id"])
    assert wait_until(lambda: billing_entry(worker, appointment["id"]), 10, what="billing after re-LISTEN")


def test_billing_down_then_up_bills_every_appointment_exactly_once(services, db_url, db):
    """The challenge's scenario: the billing side is down while appointments end."""
    api = services("appointments.py", db_url).wait_healthy()
    with ThreadPoolExecutor(8) as pool:
        started = list(pool.map(lambda _: start_appointment(api.base_url), range(200)))
        list(pool.map(lambda a: end_appointment(api.base_url, a["id"], "2020-12-01 14:30:00"), started))
    assert ledger(db)["entries"] == 0 and ledger(db)["pending"] == 200
    services("billing_worker.py", db_url).wait_healthy()
    wait_until(lambda: ledger(db)["pending"] == 0, 30, what="the backlog to drain")
    assert_billed_exactly_once(db, ended=200)
    prices = db.execute("SELECT DISTINCT total_price FROM billing_entries").fetchall()
    assert [str(p["total_price"]) for p in prices] == ["300.00"]


@pytest.mark.slow
def test_three_workers_on_a_backlog_of_5000_bill_each_exactly_once(db_url, db):
    """Claimed counts add up to the backlog: SKIP LOCKED never hands a row to two workers."""
    make_backlog(db, 5000)
    workers = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "billing_worker.py"), "--once"],
            env=service_env(db_url, BILLING_BATCH_SIZE=100),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(3)
    ]
    tallies = [json.loads(p.communicate(timeout=120)[0]) for p in workers]
    assert [p.returncode for p in workers] == [0, 0, 0]
    assert sum(t["billed"] for t in tallies) == 5000
    assert_billed_exactly_once(db, ended=5000)


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(services, db_url, db):
    make_backlog(db, 20000)
    worker = services("billing_worker.py", db_url, BILLING_BATCH_SIZE=200)
    wait_until(lambda: 0 < ledger(db)["entries"] < 20000 and ledger(db)["entries"], 30, interval=0.01, what="billing under way")
    worker.kill()  # SIGKILL: no chance to finish anything
    after_kill = ledger(db)
    assert 0 < after_kill["entries"] < 20000, "the kill should land mid-backlog"
    assert after_kill["status_mismatch"] == 0 and after_kill["not_billed_once"] == after_kill["pending"]
    services("billing_worker.py", db_url, BILLING_BATCH_SIZE=200).wait_healthy()
    wait_until(lambda: ledger(db)["pending"] == 0, 60, what="the restarted worker to drain")
    assert_billed_exactly_once(db, ended=20000)


@pytest.mark.slow
def test_sigterm_finishes_the_batch_and_exits_0_quickly(services, db_url, db):
    make_backlog(db, 20000)
    worker = services("billing_worker.py", db_url, BILLING_BATCH_SIZE=200)
    wait_until(lambda: 0 < ledger(db)["entries"] < 20000, 30, interval=0.01, what="billing under way")
    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0
    assert time.monotonic() - sent < 5  # "a second or two"; slack for a loaded CI machine
    stopped = ledger(db)
    assert stopped["status_mismatch"] == 0 and stopped["entries"] + stopped["pending"] == 20000
    assert stopped["pending"] > 0, "it should stop before the backlog is done"
    assert run_once(db_url, "--once").returncode == 0
    assert_billed_exactly_once(db, ended=20000)


def test_once_and_requeue_commands(db_url, db):
    make_backlog(db, 3)
    db.execute("UPDATE billing_queue SET status = 'failed', attempts = 10 WHERE appointment_id = (SELECT min(appointment_id::text)::uuid FROM billing_queue)")
    once = run_once(db_url, "--once")
    assert once.returncode == 0 and json.loads(once.stdout) == {"billed": 2, "retried": 0, "failed": 0}
    requeue = run_once(db_url, "requeue")
    assert requeue.returncode == 0 and json.loads(requeue.stdout) == {"requeued": 1}
    assert json.loads(run_once(db_url, "--once").stdout)["billed"] == 1
    assert_billed_exactly_once(db, ended=3)


def test_once_without_a_database_exits_non_zero_saying_so(tmp_path):
    done = run_once("postgresql://postgres@127.0.0.1:1/none", "--once")
    assert done.returncode != 0 and "database unavailable" in done.stderr


def test_make_run_applies_the_schema_serves_both_and_ctrl_c_stops_both(admin_url, tmp_path):
    from support import create_database, drop_database, free_port

    name = f"clinic_test_makerun_{uuid.uuid4().hex[:8]}"
    url = create_database(admin_url, name)  # empty: make run must apply the schema itself
    ports = {"APPOINTMENTS_PORT": free_port(), "BILLING_PORT": free_port()}
    env = service_env(url, **ports)
    with open(tmp_path / "make.log", "wb") as log:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "run", f"VENV={sys.prefix}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        for port in ports.values():
            wait_until(lambda: _ready(port), 60, interval=0.2, what=f"/ready on {port}")
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C does to the foreground group
        make.wait(timeout=15)
        session = lambda: subprocess.run(["pgrep", "-s", str(make.pid)], capture_output=True, text=True).stdout  # noqa: E731
        wait_until(lambda: session() == "", 10, what="both services to stop after Ctrl-C")
        output = (tmp_path / "make.log").read_text()
        assert "stop_requested" in output
        assert not any(line.startswith("{") for line in output.splitlines()), "make run logs for a person (LOG_FORMAT=console), not JSON"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)
        drop_database(admin_url, name)


def _ready(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_schema_sql_applied_again_to_a_live_database_keeps_every_row(db_url, db):
    """The README's `psql "$DATABASE_URL" -f schema.sql` is safe to run on a live database."""
    import shutil

    make_backlog(db, 50)
    assert run_once(db_url, "--once").returncode == 0
    before = ledger(db)
    psql = shutil.which("psql")
    assert psql, "psql (the PostgreSQL client) is needed for this test"
    done = subprocess.run([psql, db_url, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(ROOT / "schema.sql")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ledger(db) == before and before["entries"] == 50


def test_500_idle_slow_connections_do_not_keep_a_normal_client_waiting(services, db_url):
    """Slowloris: clients that open connections and send half a request, then nothing. waitress
    gives them no thread, and its connection limit is above 500, so others are served at once."""
    import socket
    import time

    import requests

    api = services("appointments.py", db_url).wait_healthy()
    port = int(api.env["APPOINTMENTS_PORT"])
    idle = []
    try:
        for _ in range(500):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /appointments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            idle.append(sock)
        time.sleep(0.5)  # let waitress take them all in before the normal client comes
        for _ in range(3):
            started = time.monotonic()
            body = {"physician_id": "ea959b03-5577-45c9-b9f7-a45d3e77ce82", "patient_id": "86158d46-ce33-4e3d-9822-462bbff5782e"}
            assert requests.post(api.base_url + "/appointments", json=body, timeout=5).status_code == 201
            assert time.monotonic() - started < 1
        # The idle ones are still held open, not dropped to make room.
        idle[0].sendall(b"Content-Length: 2\r\n\r\n{}")
        assert idle[0].recv(65536).startswith(b"HTTP/1.1 400")
    finally:
        for sock in idle:
            sock.close()


@pytest.fixture
def version_2_url(admin_url):
    """A database as version 2 made it (tests/schema_versions/2), dropped after the test."""
    from test_schema import scratch_database

    with scratch_database(admin_url, 2) as url:
        yield url


@pytest.fixture
def version_2_db(version_2_url):
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(version_2_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def test_upgrading_a_live_database_to_this_version_under_load_loses_nothing(admin_url, version_2_url, version_2_db, services):
    """The first run of this version's schema.sql and roles.sql on a database of version 2 (no
    change feed positions, no listing indexes, no base_backups), while ends and billing go on. The
    upgraded database has a fresh install's shape, and every entry is in the change feed exactly
    once, those billed before the upgrade first. (Version 2, not 1: this version's services write
    request_id, which version 1 lacks.)"""
    import threading
    import uuid

    import psycopg
    import requests

    from db import apply_schema
    from test_schema import INTENDED, differences, fresh_shape, shape

    fresh = fresh_shape(admin_url)
    db_url, db = version_2_url, version_2_db
    api = services("appointments.py", db_url).wait_healthy()
    worker = services("billing_worker.py", db_url, BILLING_POLL_SECONDS="0.2").wait_healthy()

    acknowledged, statuses, stop = [], [], threading.Event()

    def clinic():
        with requests.Session() as http:
            while not stop.is_set():
                body = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}
                started = http.post(api.base_url + "/appointments", json=body, timeout=10)
                statuses.append(started.status_code)
                if started.status_code != 201:
                    continue
                ended = http.post(f"{api.base_url}/appointments/{started.json()['id']}/end", timeout=10)
                statuses.append(ended.status_code)
                if ended.status_code == 200:
                    acknowledged.append(started.json()["id"])

    threads = [threading.Thread(target=clinic) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(acknowledged) > 50, 20, what="traffic before the upgrade")
        apply_schema(db_url)  # as the superuser, as the migrate service does
        count = len(acknowledged)
        wait_until(lambda: len(acknowledged) > count + 50, 20, what="traffic after the upgrade")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)

    with psycopg.connect(db_url, autocommit=True) as conn:
        assert differences(fresh, shape(conn)) == INTENDED[2]
    # Requests that met the upgrade's locks waited (or got a 503 to retry); none failed otherwise.
    assert set(statuses) <= {200, 201, 503}, sorted(set(statuses))
    wait_until(lambda: ledger(db)["pending"] == 0, 20, what="the backlog billed")
    assert_billed_exactly_once(db, ended=ledger(db)["ended"])
    billed = {row["appointment_id"] for row in db.execute("SELECT appointment_id::text FROM billing_entries")}
    assert set(acknowledged) <= billed
    before_upgrade = db.execute("SELECT count(*) AS n FROM billing_entries WHERE txid = '0'").fetchone()["n"]
    assert 0 < before_upgrade < len(billed)
    fed, cursor = [], None
    with requests.Session() as http:
        while True:
            page = http.get(worker.base_url + "/billing-entries/changes", params={"limit": 97, **({"after": cursor} if cursor else {})}, timeout=10)
            assert page.status_code == 200, page.text
            if not page.json()["entries"]:
                break
            fed += [entry["appointment_id"] for entry in page.json()["entries"]]
            cursor = page.json()["cursor"]
    assert len(fed) == len(set(fed)) and set(fed) == billed
    old_first = [row["appointment_id"] for row in db.execute("SELECT appointment_id::text FROM billing_entries WHERE txid = '0' ORDER BY appointment_id")]
    assert fed[:before_upgrade] == old_first


def test_the_queue_and_the_appointments_are_vacuumed_after_a_fixed_number_of_changes(db):
    """Dead entries in the partial indexes slow every claim until VACUUM (schema.sql): autovacuum
    must not wait for a fifth of an ever-growing table to change."""
    options = "SELECT coalesce(reloptions, '{}') AS o FROM pg_class WHERE oid = %s::regclass"
    for table in ("billing_queue", "appointments"):
        assert set(db.execute(options, [table]).fetchone()["o"]) >= {"autovacuum_vacuum_scale_factor=0", "autovacuum_vacuum_threshold=10000"}
