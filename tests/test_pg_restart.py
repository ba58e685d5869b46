"""PostgreSQL stopped, crashed and restarted under the running services, on a cluster this test owns."""

import time
import uuid

import psycopg
import pytest
import requests

from support import TempCluster, assert_billed_exactly_once, free_port, fresh_database, ledger, make_backlog, wait_until

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


def test_the_pool_drops_a_connection_to_a_server_in_recovery_and_keeps_the_leaders(cluster):
    """A leader demoted in a failover comes back as a standby that still answers: a connection
    to it must be dropped by the pool's check, not handed out to fail every write."""
    import shutil
    import subprocess

    from config import Config
    from db import LeaderPool, make_pool

    # Beside the cluster's own directory, which the postgres OS user owns (pytest's tmp_path is root's).
    home = cluster.dir / "standby-home"
    home.mkdir()
    as_postgres = cluster._as
    if as_postgres:
        shutil.chown(home, "postgres", "postgres")
    standby = home / "data"
    port = free_port()
    subprocess.run([*as_postgres, f"{cluster.bindir}/pg_basebackup", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
                    "-D", str(standby), "-R", "--checkpoint=fast"], check=True, capture_output=True, timeout=60)
    subprocess.run([*as_postgres, f"{cluster.bindir}/pg_ctl", "-D", str(standby), "-l", str(home / "standby.log"), "-w", "-o",
                    f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"], capture_output=True, timeout=60)
    if not (home / "standby.log").exists() or "ready to accept read-only connections" not in (home / "standby.log").read_text():
        raise AssertionError((home / "standby.log").read_text()[-2000:] if (home / "standby.log").exists() else "no log")
    standby_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        with psycopg.connect(standby_url, autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            with pytest.raises(psycopg.OperationalError, match="recovery"):
                LeaderPool.check_leader(conn)
            assert conn.closed
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            LeaderPool.check_leader(conn)
            assert not conn.closed
        # Through the pool: nothing from the standby is ever handed out; it times out as a 503 would.
        pool = make_pool(Config(database_url=standby_url), "tests", max_size=2)
        pool.open(wait=False)
        try:
            with pytest.raises(psycopg.OperationalError):
                with pool.connection(timeout=2):
                    pass
            # Each new connection is checked and refused (db.LeaderPool._configure), and the pool
            # keeps trying (every ~0.25 s): none ever joined it.
            stats = pool.get_stats()
            assert stats["connections_num"] >= 2 and stats.get("pool_available", 0) == 0, stats
        finally:
            pool.close()
    finally:
        subprocess.run([*as_postgres, f"{cluster.bindir}/pg_ctl", "-D", str(standby), "-m", "immediate", "stop"], capture_output=True, timeout=60)


def test_a_commit_the_synchronous_standby_never_confirmed_is_503_not_acknowledged(cluster):
    """With synchronous replication and no standby answering, a commit waits (statement_timeout
    does not end that wait: PostgreSQL turns it off before committing). When the wait is cancelled
    (pg_cancel_backend, a client's cancel), PostgreSQL keeps the commit on this server only, says
    so in a WARNING, and COMMIT succeeds. The API must not answer 200 for it: a failover now would
    lose it."""
    import threading

    import falcon.testing

    import appointments
    from config import Config
    from db import make_pool

    db_url = fresh_database(cluster.url)
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'a_standby_that_never_comes'")
        conn.execute("SELECT pg_reload_conf()")
    config = Config(database_url=db_url)
    pool = make_pool(config, "tests-syncrep")
    pool.open(wait=True, timeout=10)
    answers = []
    try:
        api = falcon.testing.TestClient(appointments.create_app(config, pool))
        body = {"id": str(uuid.uuid4()), "physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}
        request = threading.Thread(target=lambda: answers.append(api.simulate_post("/appointments", json=body)))
        request.start()
        with psycopg.connect(cluster.url, autocommit=True) as observer:
            waiting = "SELECT pid FROM pg_stat_activity WHERE application_name = 'tests-syncrep' AND wait_event = 'SyncRep'"
            pid = wait_until(lambda: (observer.execute(waiting).fetchone() or [None])[0], 10, what="a commit waiting for the standby")
            observer.execute("SELECT pg_cancel_backend(%s)", [pid])
        request.join(timeout=10)
        assert answers and answers[0].status_code == 503, answers and answers[0].text
        assert "not confirmed" in answers[0].json["detail"] and answers[0].headers["retry-after"]
        with psycopg.connect(db_url, autocommit=True) as conn:  # committed here, only here
            assert conn.execute("SELECT count(*) FROM appointments WHERE id = %s", [body["id"]]).fetchone()[0] == 1
    finally:
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
            conn.execute("SELECT pg_reload_conf()")
        pool.close()


def test_the_pool_spends_no_query_on_a_healthy_connection_and_drops_one_the_server_ended(db_url):
    """The check before a checkout is a look at the socket: an idle connection the server has not
    written to is handed out as it is (no query), one whose session the server ended is replaced."""
    from config import Config
    from db import LeaderPool, make_pool, server_has_spoken

    pool = make_pool(Config(database_url=db_url), "tests-check", max_size=1)
    pool.open(wait=True, timeout=10)
    try:
        with psycopg.connect(db_url, autocommit=True) as admin:
            last_query = "SELECT query FROM pg_stat_activity WHERE pid = %s"
            with pool.connection() as conn:
                pid = conn.info.backend_pid
                conn.execute("SELECT 42")
            assert not server_has_spoken(conn)
            with pool.connection() as again:
                assert again.info.backend_pid == pid
                assert admin.execute(last_query, [pid]).fetchone()[0] == "SELECT 42"  # no check query ran

            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            wait_until(lambda: server_has_spoken(conn), 5, what="the FATAL and the end of the stream")
            time.sleep(2 * LeaderPool.FRESH)  # back longer than FRESH: its socket is looked at
            with pool.connection() as fresh:  # no error: the dead one was dropped, not handed out
                assert fresh.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
    finally:
        pool.close()
