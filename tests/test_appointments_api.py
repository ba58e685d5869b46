"""The appointments API in process (falcon.testing) against a real PostgreSQL."""

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from zoneinfo import ZoneInfo

import falcon.testing
import pytest

import appointments
from db import make_pool
from web import MAX_BODY_BYTES
from conftest import replace
from support import assert_problem, create_database, drop_database, free_port, wait_until


def start_body(**fields):
    return {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), **fields}


def count(db, sql, *params):
    return db.execute(sql, params).fetchone()["n"]


def test_start_returns_201_with_the_challenge_representation_and_location(api):
    body = start_body(start_date="2020-12-01 13:00:00")
    result = api.simulate_post("/appointments", json=body)
    assert result.status_code == 201
    appointment = result.json
    assert appointment == {
        "id": appointment["id"],
        "start_date": "2020-12-01 13:00:00",
        "end_date": None,
        "physician_id": body["physician_id"],
        "patient_id": body["patient_id"],
        "price": None,
        "billing_status": None,
    }
    assert result.headers["location"] == f"/appointments/{appointment['id']}"
    assert api.simulate_get(result.headers["location"]).json == appointment


def test_start_without_start_date_starts_now(api, db):
    result = api.simulate_post("/appointments", json=start_body())
    assert result.status_code == 201
    row = db.execute("SELECT now() - start_date AS age FROM appointments").fetchone()
    assert abs(row["age"].total_seconds()) < 5


def test_the_full_flow_prices_and_queues_the_charge(api, db):
    start = api.simulate_post("/appointments", json=start_body(start_date="2020-12-01 13:00:00")).json
    ended = api.simulate_post(f"/appointments/{start['id']}/end", json={"end_date": "2020-12-01 15:00:00"})
    assert ended.status_code == 200
    assert ended.json == {**start, "end_date": "2020-12-01 15:00:00", "price": 400.0, "billing_status": "pending"}
    assert '"price":400.00' in ended.text  # two decimals in the response text
    queued = db.execute("SELECT total_price, status FROM billing_queue WHERE appointment_id = %s", [start["id"]]).fetchone()
    assert queued == {"total_price": Decimal("400.00"), "status": "pending"}


def test_money_always_has_two_decimals_in_the_text(api, make_appointment):
    appointment = make_appointment(start="2020-12-01 13:00:00", end="2020-12-01 14:00:00")
    assert '"price":200.00' in api.simulate_get(f"/appointments/{appointment['id']}").text


def test_end_with_no_body_an_empty_body_or_empty_object_ends_now(api, make_appointment):
    for kind in ("none", "empty", "object"):
        appointment = make_appointment(start="2020-12-01 13:00:00")
        path = f"/appointments/{appointment['id']}/end"
        if kind == "none":
            result = api.simulate_post(path)
        elif kind == "empty":
            result = api.simulate_post(path, body=b"", headers={"Content-Type": "application/json"})
        else:
            result = api.simulate_post(path, json={})
        assert result.status_code == 200, (kind, result.text)
        assert result.json["end_date"] is not None and Decimal(str(result.json["price"])) > 0


def test_dates_are_read_and_shown_in_app_timezone(config, pool):
    api = falcon.testing.TestClient(appointments.create_app(replace(config, timezone=ZoneInfo("America/Sao_Paulo")), pool))
    result = api.simulate_post("/appointments", json=start_body(start_date="2020-12-01T16:00:00Z"))
    assert result.json["start_date"] == "2020-12-01 13:00:00"
    ended = api.simulate_post(f"/appointments/{result.json['id']}/end", json={"end_date": "2020-12-01 14:30:00"})
    assert ended.json["end_date"] == "2020-12-01 14:30:00" and ended.json["price"] == 300.0


def test_repeating_a_start_with_the_same_id_returns_200_and_the_same_appointment(api, db):
    body = start_body(id=str(uuid.uuid4()), start_date="2020-12-01 13:00:00")
    first = api.simulate_post("/appointments", json=body)
    again = api.simulate_post("/appointments", json=body)
    without_start = api.simulate_post("/appointments", json={k: v for k, v in body.items() if k != "start_date"})
    assert (first.status_code, again.status_code, without_start.status_code) == (201, 200, 200)
    assert first.json == again.json == without_start.json
    assert count(db, "SELECT count(*) AS n FROM appointments") == 1


@pytest.mark.parametrize("field", ["physician_id", "patient_id", "start_date"])
def test_the_same_id_with_other_fields_is_409(api, db, field):
    body = start_body(id=str(uuid.uuid4()), start_date="2020-12-01 13:00:00")
    assert api.simulate_post("/appointments", json=body).status_code == 201
    other = {**body, field: "2020-12-02 13:00:00" if field == "start_date" else str(uuid.uuid4())}
    assert_problem(api.simulate_post("/appointments", json=other), 409, field)
    assert api.simulate_get(f"/appointments/{body['id']}").json["start_date"] == "2020-12-01 13:00:00"


def test_concurrent_identical_starts_create_one_appointment(api, db):
    body = start_body(id=str(uuid.uuid4()))
    with ThreadPoolExecutor(10) as pool:
        codes = sorted(pool.map(lambda _: api.simulate_post("/appointments", json=body).status_code, range(10)))
    assert codes == [200] * 9 + [201]
    assert count(db, "SELECT count(*) AS n FROM appointments") == 1


def test_ending_again_without_or_with_the_same_end_date_returns_the_stored_one(api, make_appointment, db):
    appointment = make_appointment(start="2020-12-01 13:00:00", end="2020-12-01 14:00:00")
    path = f"/appointments/{appointment['id']}/end"
    for body in ({}, {"end_date": "2020-12-01 14:00:00"}, {"end_date": "2020-12-01T14:00:00Z"}):
        again = api.simulate_post(path, json=body)
        assert again.status_code == 200 and again.json == appointment
    assert count(db, "SELECT count(*) AS n FROM billing_queue") == 1


def test_ending_again_with_another_end_date_is_409_and_changes_nothing(api, make_appointment, db):
    appointment = make_appointment(start="2020-12-01 13:00:00", end="2020-12-01 14:00:00")
    result = api.simulate_post(f"/appointments/{appointment['id']}/end", json={"end_date": "2020-12-01 15:00:00"})
    assert_problem(result, 409, "end_date")
    assert api.simulate_get(f"/appointments/{appointment['id']}").json == appointment
    assert db.execute("SELECT total_price FROM billing_queue").fetchone()["total_price"] == Decimal("200.00")


def test_concurrent_identical_ends_queue_one_charge(api, make_appointment, db):
    appointment = make_appointment(start="2020-12-01 13:00:00")
    path = f"/appointments/{appointment['id']}/end"
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: api.simulate_post(path, json={"end_date": "2020-12-01 14:00:00"}), range(20)))
    assert {r.status_code for r in results} == {200}
    assert len({r.text for r in results}) == 1
    assert count(db, "SELECT count(*) AS n FROM billing_queue") == 1


def test_end_before_start_is_422_and_leaves_it_open(api, make_appointment, db):
    appointment = make_appointment(start="2020-12-01 13:00:00")
    result = api.simulate_post(f"/appointments/{appointment['id']}/end", json={"end_date": "2020-12-01 12:59:59"})
    assert_problem(result, 422, "end_date")
    assert api.simulate_get(f"/appointments/{appointment['id']}").json["end_date"] is None
    assert count(db, "SELECT count(*) AS n FROM billing_queue") == 0


def test_the_rate_is_fixed_when_the_appointment_starts(config, pool, db):
    cheap = falcon.testing.TestClient(appointments.create_app(replace(config, hourly_rate=Decimal("100.00")), pool))
    dear = falcon.testing.TestClient(appointments.create_app(replace(config, hourly_rate=Decimal("300.00")), pool))
    started = cheap.simulate_post("/appointments", json=start_body(start_date="2020-12-01 13:00:00")).json
    ended = dear.simulate_post(f"/appointments/{started['id']}/end", json={"end_date": "2020-12-01 14:00:00"})
    assert ended.json["price"] == 100.0


def test_unknown_appointment_is_404(api):
    missing = uuid.uuid4()
    assert_problem(api.simulate_get(f"/appointments/{missing}"), 404, str(missing))
    assert_problem(api.simulate_post(f"/appointments/{missing}/end"), 404, str(missing))


@pytest.mark.parametrize("path", ["/appointments/not-a-uuid", "/appointments/not-a-uuid/end"])
def test_a_non_uuid_id_in_the_path_is_400(api, path):
    result = api.simulate_get(path) if not path.endswith("end") else api.simulate_post(path)
    assert_problem(result, 400, "id")


@pytest.mark.parametrize(
    "body, field",
    [
        ({"patient_id": str(uuid.uuid4())}, "physician_id"),
        (start_body(physician_id="123"), "physician_id"),
        (start_body(patient_id=None), "patient_id"),
        (start_body(id="abc"), "id"),
        (start_body(start_date="tomorrow"), "start_date"),
        (start_body(start_date="2020-12-01T13:00:00"), "start_date"),
        (start_body(price=10), "price"),
        ("just a string", "body"),
    ],
)
def test_invalid_start_bodies_are_400_naming_the_field_and_store_nothing(api, db, body, field):
    assert_problem(api.simulate_post("/appointments", json=body), 400, field)
    assert count(db, "SELECT count(*) AS n FROM appointments") == 0


@pytest.mark.parametrize(
    "raw, status, field",
    [
        (b'{"physician_id": ', 400, "body"),
        (b"[" * 5000 + b"]" * 5000, 400, "body"),
        (b'{"physician_id": NaN}', 400, "body"),
        (b"\xff\xfe\xfd", 400, "body"),
        (b"", 400, "body"),
    ],
)
def test_malformed_json_is_400(api, raw, status, field):
    result = api.simulate_post("/appointments", body=raw, headers={"Content-Type": "application/json"})
    assert_problem(result, status, field)


def test_invalid_end_bodies_are_400(api, make_appointment, db):
    appointment = make_appointment()
    path = f"/appointments/{appointment['id']}/end"
    assert_problem(api.simulate_post(path, json={"end_date": "soon"}), 400, "end_date")
    assert_problem(api.simulate_post(path, json={"end": "2020-12-01 14:00:00"}), 400, "end")
    assert_problem(api.simulate_post(path, json=[1]), 400, "body")
    assert count(db, "SELECT count(*) AS n FROM billing_queue") == 0


def test_a_body_that_is_not_json_is_415(api):
    result = api.simulate_post("/appointments", body="physician_id=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_problem(result, 415, "Content-Type")


def test_a_body_over_64_kib_is_413_before_it_is_read(api, db):
    raw = json.dumps(start_body(note="x" * MAX_BODY_BYTES)).encode()
    result = api.simulate_post("/appointments", body=raw, headers={"Content-Type": "application/json"})
    assert_problem(result, 413, "body")
    assert count(db, "SELECT count(*) AS n FROM appointments") == 0


def test_unknown_routes_and_methods_are_problem_responses(api):
    assert_problem(api.simulate_get("/nowhere"), 404, "/nowhere")
    assert_problem(api.simulate_delete("/appointments"), 405, "DELETE")
    assert "POST" in api.simulate_delete("/appointments").headers["allow"]


def test_health_ready_and_openapi(api):
    assert api.simulate_get("/health").json == {"status": "ok"}
    assert api.simulate_get("/ready").json == {"status": "ready"}
    spec = api.simulate_get("/openapi.json").json
    assert spec["openapi"].startswith("3.1")
    assert {"/appointments", "/appointments/{appointment_id}/end", "/billing-entries/{appointment_id}"} <= set(spec["paths"])


def test_ready_is_503_without_the_schema(admin_url, config):
    name = "clinic_test_noschema_" + uuid.uuid4().hex[:8]
    url = create_database(admin_url, name)
    pool = make_pool(replace(config, database_url=url), "tests")
    pool.open(wait=True)
    try:
        client = falcon.testing.TestClient(appointments.create_app(config, pool))
        assert_problem(client.simulate_get("/ready"), 503, "schema")
        # The same answer, not a 500, from an endpoint that needs the tables.
        missing = client.simulate_get(f"/appointments/{uuid.uuid4()}")
        assert_problem(missing, 503, "UndefinedTable")
        assert missing.headers["retry-after"]
    finally:
        pool.close()
        drop_database(admin_url, name)


def test_database_down_is_503_with_retry_after(config):
    pool = make_pool(replace(config, database_url="postgresql://postgres@127.0.0.1:1/none"), "tests")
    pool.open(wait=False)
    try:
        api = falcon.testing.TestClient(appointments.create_app(config, pool))
        result = api.simulate_get(f"/appointments/{uuid.uuid4()}")
        assert_problem(result, 503, "database")
        assert result.headers["retry-after"] == "1"
        assert api.simulate_get("/health").status_code == 200
    finally:
        pool.close()


def test_head_answers_like_get_without_a_body(api, billing_api, make_appointment):
    appointment = make_appointment()
    for client, path in [(api, f"/appointments/{appointment['id']}"), (api, "/health"), (billing_api, "/billing-entries")]:
        got, head = client.simulate_get(path), client.simulate_head(path)
        assert head.status_code == got.status_code == 200 and head.text == ""
        assert head.headers["content-type"] == got.headers["content-type"]
    assert api.simulate_head(f"/appointments/{uuid.uuid4()}").status_code == 404


@pytest.mark.slow  # waits out several reconnection rounds
def test_a_pool_without_its_database_retries_about_four_times_a_second_not_faster_nor_backing_off(config):
    """After a failover the new leader must be found within a second, and a server that is down
    must not be flooded: the pool's retries, all its lost connections together, are spaced by
    LeaderPool.RETRY_SPACING (psycopg_pool alone doubles its wait: 3 attempts in these 4 s)."""
    from db import LeaderPool

    pool = make_pool(replace(config, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none"), "tests", max_size=4)
    pool.open(wait=False)
    try:
        time.sleep(4)
        attempts = pool.get_stats().get("connections_errors", 0)
    finally:
        pool.close()
    expected = 4 / LeaderPool.RETRY_SPACING
    assert expected / 2 <= attempts <= expected * 1.5, attempts


def test_a_read_only_database_is_503_not_500(config, db):
    """As on a replica during a failover: reads work, writes are refused with Retry-After."""
    pool = make_pool(config, "tests", default_transaction_read_only="on")
    pool.open(wait=True)
    try:
        client = falcon.testing.TestClient(appointments.create_app(config, pool))
        result = client.simulate_post("/appointments", json=start_body())
        assert_problem(result, 503, "ReadOnlySqlTransaction")
        assert result.headers["retry-after"]
    finally:
        pool.close()
    assert count(db, "SELECT count(*) AS n FROM appointments") == 0


# The end's charge takes 1.5 s to queue: longer than the 1 s deadline below, shorter than clinic's
# statement_timeout, so the server finishes what the client gave up on.
SLOW_QUEUE = """
CREATE FUNCTION test_slow_queue() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$;
CREATE TRIGGER test_slow_queue AFTER INSERT ON billing_queue FOR EACH STATEMENT EXECUTE FUNCTION test_slow_queue();
"""


def test_an_end_cut_short_by_its_deadline_is_a_503_and_its_retry_is_applied_once(config, pool, db, make_appointment):
    """The end's statement outlives the request's deadline: the answer is a 503 with Retry-After
    within the deadline, saying the change may or may not have been applied; the server commits it
    anyway, and the client's retry with the same body gets the stored end: one charge."""
    started = make_appointment()
    db.execute(SLOW_QUEUE)
    hurried = falcon.testing.TestClient(appointments.create_app(replace(config, request_timeout=1.0), pool))
    path, body = f"/appointments/{started['id']}/end", {"end_date": "2020-12-01 14:00:00"}
    began = time.monotonic()
    cut = hurried.simulate_post(path, json=body)
    assert time.monotonic() - began < 1.5
    assert_problem(cut, 503, "retry the same request")
    assert cut.headers["retry-after"] == "1"
    # The server went on with the statement the client gave up on: the end and its charge together.
    wait_until(lambda: count(db, "SELECT count(*) AS n FROM billing_queue") == 1, 10, what="the end the client gave up on to commit")
    db.execute("DROP TRIGGER test_slow_queue ON billing_queue")
    again = hurried.simulate_post(path, json=body)
    assert again.status_code == 200, again.text
    assert again.json["price"] == 200.00 and again.json["billing_status"] == "pending"
    assert count(db, "SELECT count(*) AS n FROM billing_queue") == 1
