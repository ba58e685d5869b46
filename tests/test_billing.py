"""The billing worker's batches and its HTTP API, in process, against a real PostgreSQL."""

import threading
from decimal import Decimal

import psycopg
import pytest

import billing_worker
from db import make_pool
from ledger import LIST_ENTRIES
from support import assert_billed_exactly_once, ledger, make_backlog, wait_until


def test_drain_bills_each_ended_appointment_once_with_its_price(make_appointment, biller, db):
    first = make_appointment(start="2020-12-01 13:00:00", end="2020-12-01 14:00:00")
    second = make_appointment(start="2020-12-01 13:00:00", end="2020-12-01 14:30:00")
    make_appointment(start="2020-12-01 13:00:00")  # still open: nothing to bill
    tally = biller.drain()
    assert (tally.billed, tally.retried, tally.failed) == (2, 0, 0)
    entries = {str(r["appointment_id"]): r["total_price"] for r in db.execute("SELECT * FROM billing_entries")}
    assert entries == {first["id"]: Decimal("200.00"), second["id"]: Decimal("300.00")}
    assert biller.drain().billed == 0
    assert_billed_exactly_once(db, ended=2)


def test_drain_works_through_a_backlog_larger_than_a_batch(biller, db, config):
    make_backlog(db, config.batch_size * 3 + 7)
    assert biller.drain().billed == config.batch_size * 3 + 7
    assert_billed_exactly_once(db, ended=config.batch_size * 3 + 7)


def test_billed_status_shows_on_the_appointment(api, make_appointment, biller):
    appointment = make_appointment(start="2020-12-01 13:00:00", end="2020-12-01 14:00:00")
    assert appointment["billing_status"] == "pending"
    biller.drain()
    assert api.simulate_get(f"/appointments/{appointment['id']}").json["billing_status"] == "billed"


def test_a_charge_waiting_out_its_backoff_is_not_claimed(make_appointment, biller, db):
    make_appointment(end="2020-12-01 14:00:00")
    db.execute("UPDATE billing_queue SET available_at = now() + interval '1 hour'")
    assert biller.drain().billed == 0
    db.execute("UPDATE billing_queue SET available_at = now()")
    assert biller.drain().billed == 1


def test_two_billers_racing_on_one_backlog_never_claim_a_row_twice(config, pool, db):
    """The row locks (and the re-check of status behind them): the rows the two report billing
    add up to the backlog, with no overlap."""
    make_backlog(db, 3000)
    billers = [billing_worker.Biller(pool, 100, 3) for _ in range(2)]
    tallies, barrier = [], threading.Barrier(2)

    def run(biller):
        barrier.wait()
        tallies.append(biller.drain())

    threads = [threading.Thread(target=run, args=(b,)) for b in billers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(t.billed for t in tallies) == 3000
    assert_billed_exactly_once(db, ended=3000)


@pytest.mark.slow  # waits out idle_in_transaction_session_timeout
def test_a_frozen_worker_loses_its_rows_to_others_and_its_late_commit_fails(config, biller, db):
    """idle_in_transaction_session_timeout ends a worker session stuck mid-transaction (SIGSTOP,
    a paused VM): its locks go, another worker bills the rows, and the late COMMIT is refused."""
    make_backlog(db, 10)
    frozen = make_pool(config, "billing-worker", **billing_worker.WORKER_SESSION)
    frozen.open(wait=True)
    try:
        with frozen.connection() as conn:
            conn.execute("BEGIN")
            assert len(conn.execute(billing_worker.CLAIM, {"batch_size": 10}).fetchall()) == 10
            assert biller.drain().billed == 0  # all ten are locked by the frozen one
            wait_until(lambda: biller.drain().billed == 10 or ledger(db)["entries"] == 10, 20, interval=0.2, what="the others to bill")
            with pytest.raises(psycopg.Error):  # IdleInTransactionSessionTimeout, or a closed socket
                conn.execute("COMMIT")
            assert conn.closed
    finally:
        frozen.close()
    assert_billed_exactly_once(db, ended=10)


def poison(db, appointment_id):
    """A constraint that makes exactly this charge impossible to write."""
    db.execute(f"ALTER TABLE billing_entries ADD CONSTRAINT poison CHECK (appointment_id <> '{appointment_id}')")


def test_a_poison_row_does_not_block_the_others_and_ends_failed(make_appointment, biller, db, config):
    good = [make_appointment(end="2020-12-01 14:00:00") for _ in range(3)]
    bad = make_appointment(end="2020-12-01 14:00:00")
    poison(db, bad["id"])

    tally = biller.drain()
    assert (tally.billed, tally.retried, tally.failed) == (3, 1, 0)
    row = db.execute("SELECT * FROM billing_queue WHERE appointment_id = %s", [bad["id"]]).fetchone()
    assert row["status"] == "pending" and row["attempts"] == 1 and "poison" in row["last_error"]
    assert db.execute("SELECT available_at > now() AS later FROM billing_queue WHERE appointment_id = %s", [bad["id"]]).fetchone()["later"]

    for attempt in range(2, config.max_attempts + 1):
        db.execute("UPDATE billing_queue SET available_at = now() WHERE status = 'pending'")  # let the backoff pass
        biller.drain()
    row = db.execute("SELECT * FROM billing_queue WHERE appointment_id = %s", [bad["id"]]).fetchone()
    assert row["status"] == "failed" and row["attempts"] == config.max_attempts
    assert {str(r["appointment_id"]) for r in db.execute("SELECT appointment_id FROM billing_entries")} == {g["id"] for g in good}

    assert biller.requeue() == 1
    db.execute("ALTER TABLE billing_entries DROP CONSTRAINT poison")
    assert biller.drain().billed == 1
    assert_billed_exactly_once(db, ended=4)


def test_backoff_doubles_and_is_capped_at_an_hour(make_appointment, config, pool, db):
    biller = billing_worker.Biller(pool, config.batch_size, max_attempts=100)
    bad = make_appointment(end="2020-12-01 14:00:00")
    poison(db, bad["id"])
    delays = []
    for _ in range(2):
        biller.drain()
        row = db.execute("SELECT extract(epoch FROM available_at - now()) AS delay FROM billing_queue").fetchone()
        delays.append(float(row["delay"]))
        db.execute("UPDATE billing_queue SET available_at = now()")
    assert 1 < delays[0] <= 2 and 3 < delays[1] <= 4
    db.execute("UPDATE billing_queue SET attempts = 20")  # 2^21 s would be weeks
    biller.drain()
    capped = db.execute("SELECT extract(epoch FROM available_at - now()) AS delay FROM billing_queue").fetchone()
    assert 3590 < float(capped["delay"]) <= 3600


# --- the billing HTTP API -----------------------------------------------------------------------


def test_billing_entry_is_404_until_billed_then_200(make_appointment, billing_api, biller):
    appointment = make_appointment(start="2020-12-01 13:00:00", end="2020-12-01 14:01:00")
    path = f"/billing-entries/{appointment['id']}"
    missing = billing_api.simulate_get(path)
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert appointment["id"] in missing.json["detail"]
    biller.drain()
    found = billing_api.simulate_get(path)
    assert found.status_code == 200
    assert found.json["appointment_id"] == appointment["id"] and found.json["total_price"] == 203.33
    assert '"total_price":203.33' in found.text and len(found.json["created_at"]) == 19


def test_billing_entries_lists_newest_first_with_a_limit(make_appointment, billing_api, biller, db):
    ids = []
    for _ in range(3):
        ids.append(make_appointment(end="2020-12-01 14:00:00")["id"])
        biller.drain()
    listed = billing_api.simulate_get("/billing-entries", params={"limit": 2})
    assert [e["appointment_id"] for e in listed.json] == [ids[2], ids[1]]
    assert len(billing_api.simulate_get("/billing-entries").json) == 3


def test_a_non_uuid_billing_entry_id_is_400(billing_api):
    result = billing_api.simulate_get("/billing-entries/123")
    assert result.status_code == 400 and "appointment_id" in result.json["detail"]


def test_billing_health_ready_and_openapi(billing_api):
    assert billing_api.simulate_get("/health").status_code == 200
    assert billing_api.simulate_get("/ready").json == {"status": "ready"}
    assert "/billing-entries" in billing_api.simulate_get("/openapi.json").json["paths"]


def test_a_missing_table_is_the_system_s_fault_and_costs_no_row_an_attempt(make_appointment, biller, db):
    make_appointment(end="2020-12-01 14:00:00")
    db.execute("ALTER TABLE billing_entries RENAME TO billing_entries_moved")
    try:
        with pytest.raises(psycopg.errors.UndefinedTable):
            biller.drain()
    finally:
        db.execute("ALTER TABLE billing_entries_moved RENAME TO billing_entries")
    assert db.execute("SELECT attempts, status FROM billing_queue").fetchone() == {"attempts": 0, "status": "pending"}
    assert biller.drain().billed == 1


def test_a_batch_of_rows_already_billed_elsewhere_is_not_billed_again(make_appointment, biller, db):
    """Belt and braces: an entry that exists already is kept, not doubled, and the row is marked."""
    appointment = make_appointment(end="2020-12-01 14:00:00")
    db.execute("INSERT INTO billing_entries (appointment_id, total_price) VALUES (%s, 200.00)", [appointment["id"]])
    assert biller.drain().billed == 1
    assert ledger(db)["entries"] == 1 and ledger(db)["status_mismatch"] == 0


@pytest.mark.slow  # plans on a large backlog
@pytest.mark.parametrize(
    "query, params, index",
    [
        # A batch smaller than what is due: the index gives the order without a sort. (When the
        # batch takes every pending row of a small table, a scan and sort is cheaper, rightly.)
        (billing_worker.CLAIM, {"batch_size": 50}, "billing_queue_due"),
        (LIST_ENTRIES, {"limit": 100}, "billing_entries_newest"),
    ],
)
def test_the_hot_queries_use_the_indexes_schema_sql_made_for_them(biller, db, query, params, index):
    make_backlog(db, 20000)
    biller.drain()
    make_backlog(db, 200)  # a few pending among many billed: the usual state of the queue
    db.execute("VACUUM ANALYZE")  # what autovacuum keeps doing in production
    plan = db.execute("EXPLAIN (FORMAT JSON) " + query, params).fetchone()
    assert index in str(plan), plan
