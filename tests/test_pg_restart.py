"""PostgreSQL stopped, crashed and restarted under the running services, on a cluster this test owns."""

import time
import uuid

import psycopg
import pytest
import requests

from support import TempCluster, assert_billed_exactly_once, fresh_database, ledger, make_backlog, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    cluster = TempCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


def status(url, **kwargs):
    try:
        return requests.request(kwargs.pop("method", "GET"), url, timeout=10, **kwargs).status_code
    except requests.RequestException:
        return None


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_services_answer_503_while_postgres_is_down_and_recover_by_themselves(cluster, services, mode):
    db_url = fresh_database(cluster.url)
    api = services("appointments.py", db_url).wait_healthy()
    worker = services("billing_worker.py", db_url, BILLING_POLL_SECONDS=3600).wait_healthy()
    base = api.base_url
    before = requests.post(f"{base}/appointments", json={"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}).json()
    during = requests.post(f"{base}/appointments", json={"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}).json()
    requests.post(f"{base}/appointments/{before['id']}/end").raise_for_status()
    wait_until(lambda: status(f"{worker.base_url}/billing-entries/{before['id']}") == 200, 10, what="first billing")

    with psycopg.connect(db_url, autocommit=True) as conn:
        make_backlog(conn, 20000)
    cluster.stop(mode)  # mid-drain, most likely

    down = requests.post(f"{base}/appointments/{during['id']}/end", timeout=15)
    assert down.status_code == 503 and down.headers["Retry-After"]
    assert down.headers["Content-Type"] == "application/problem+json"
    assert status(f"{base}/appointments/{before['id']}") == 503
    assert status(f"{base}/ready") == 503 and status(f"{worker.base_url}/ready") == 503
    assert status(f"{base}/health") == 200 and status(f"{worker.base_url}/health") == 200

    cluster.start()
    restarted = time.monotonic()
    wait_until(lambda: status(f"{base}/appointments/{before['id']}") == 200, 30, interval=0.1, what="the API to recover")
    recovery = time.monotonic() - restarted
    assert status(f"{base}/appointments/{during['id']}/end", method="POST") == 200
    # The NOTIFY of that end may come before the worker listens again; the re-LISTEN drains anyway.
    wait_until(lambda: status(f"{worker.base_url}/billing-entries/{during['id']}") == 200, 30, what="billing after recovery")
    with psycopg.connect(db_url, autocommit=True) as conn:
        wait_until(lambda: ledger(conn)["pending"] == 0, 60, what="the backlog to drain")
        assert_billed_exactly_once(conn, ended=20002)
    assert api.popen.poll() is None and worker.popen.poll() is None
    print(f"API answered again {recovery:.2f}s after PostgreSQL was back ({mode} stop)")
