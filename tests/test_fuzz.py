"""Fuzzing: schemathesis against the running services, hostile bodies over real waitress, and a
stateful model of the appointments API.

* schemathesis loads /openapi.json from each running process and sends every operation of that
  process its coverage cases (boundaries, missing and wrong-typed fields, undeclared methods) and
  FUZZ_EXAMPLES generated cases per generation mode. Every response must be no 5xx, a documented
  status code, the documented content type, headers and schema; the ledger must stay exact. A
  cursor is valid only when a service issued it, which no schema says: valid cases carry issued
  ones, and long polls are kept short (a generated wait would hold a request up to 30 s).
* Query strings of the listings and the change feed over real waitress: malformed, repeated,
  unknown, non-ASCII and very long parameters, other listings' cursors: a 400 naming the parameter.
* The JSON body edge cases go over the wire to waitress (with raw sockets where `requests` cannot
  say it: a 10 MB Content-Length whose body is never sent, Expect: 100-continue, chunked bodies).
* A hypothesis RuleBasedStateMachine drives the appointments API in process against a model; when
  each run ends, the worker drains and the billing entries must equal the ended appointments. It
  also lists appointments with random filters, following Link to the end (exactly the model's
  rows, in order), and follows the change feed from a cursor it keeps: every billed entry once.

Knobs: FUZZ_EXAMPLES (schemathesis examples per operation and mode, default 50),
FUZZ_STATEFUL_EXAMPLES (state machine runs, default 50), FUZZ_STATEFUL_STEPS (steps per run, 30).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import re
import socket
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from zoneinfo import ZoneInfo

import falcon.testing
import jsonschema
import psycopg
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from psycopg.rows import dict_row
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

import appointments
from config import Config
from web import MAX_BODY_BYTES
from conftest import replace
from support import (
    ROOT,
    Service,
    as_role,
    assert_billed_exactly_once,
    assert_problem,
    assert_problem_parts,
    create_database,
    drop_database,
    free_port,
    ledger,
    wait_until,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
STATEFUL_EXAMPLES = int(os.environ.get("FUZZ_STATEFUL_EXAMPLES", "50"))
STATEFUL_STEPS = int(os.environ.get("FUZZ_STATEFUL_STEPS", "30"))

SPEC = yaml.safe_load((ROOT / "openapi.yaml").read_text())
JSON = {"Content-Type": "application/json"}
TEN_MB = 10 * 1024 * 1024
# Both services run with a bearer token, as a real deployment does: every request here carries it
# (schemathesis also checks that a request without it is refused, where the document asks for it).
FUZZ_TOKEN = f"fuzz-{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {FUZZ_TOKEN}"}


def authorized_session() -> requests.Session:
    session = requests.Session()
    session.headers.update(AUTH)
    return session


http = authorized_session()

# Which process serves which operations: the document's tags, with the operations routes on both.
SERVICE_TAGS = {"appointments": {"appointments", "operations"}, "billing": {"billing", "operations"}}
OPERATIONS = [
    (service, method.upper(), path, operation)
    for service, tags in SERVICE_TAGS.items()
    for path, item in SPEC["paths"].items()
    for method, operation in item.items()
    if method in ("get", "post", "put", "patch", "delete") and tags & set(operation["tags"])
]
# The routes of each process, one row per documented method, and the methods of each path.
ROUTES = [(service, method, path) for service, method, path, _ in OPERATIONS]
PATH_METHODS = {(service, path): sorted(m for s, m, p in ROUTES if (s, p) == (service, path)) for service, _, path in ROUTES}
# Timestamp's pattern in the document says the shape, not the calendar, so generated "valid" dates
# may be '0000-00-00 00:00:00' or '4295-01-39T23:59:42Z', which the API rightly refuses: the
# positive-acceptance check cannot hold for these two (test_the_documented_timestamp_schema_...
# checks the shape).
FREE_FORM_TIMESTAMP_BODIES = {"startAppointment", "endAppointment"}


# Negative cases need something to break: a parameter or a body.
FUZZ_CASES = [
    pytest.param(service, method, path, mode, id=f"{service}-{operation['operationId']}-{mode}")
    for service, method, path, operation in OPERATIONS
    for mode in ("positive", "negative")
    if mode == "positive" or operation.get("requestBody") or "{" in path or operation.get("parameters")
]


# ---------------------------------------------------------------------------------------------
# The two services as real processes, shared by this module (one database, dropped at the end).


@dataclasses.dataclass
class Live:
    api: Service
    worker: Service
    db_url: str
    open_ids: list[str]
    billed_ids: list[str]

    def base(self, service: str) -> str:
        return self.api.base_url if service == "appointments" else self.worker.base_url

    def port(self, service: str) -> int:
        return int(self.base(service).rsplit(":", 1)[1])

    def assert_no_unhandled_errors(self) -> None:
        for service in (self.api, self.worker):
            log = service.output()
            assert "unhandled error" not in log and "Traceback" not in log, f"{service.script} logged an error:\n{log[-4000:]}"


@pytest.fixture(scope="module")
def live(admin_url, template_db, tmp_path_factory):
    name = f"clinic_test_fuzz_{uuid.uuid4().hex[:10]}"
    url = create_database(admin_url, name, template=template_db)
    env = {
        "DATABASE_URL": url,
        "APPOINTMENTS_PORT": str(free_port()),
        "BILLING_PORT": str(free_port()),
        "BILLING_POLL_SECONDS": "0.2",
        "API_TOKENS": FUZZ_TOKEN,
    }
    logs = tmp_path_factory.mktemp("fuzz-logs")
    started = []
    try:
        for script in ("appointments.py", "billing_worker.py"):  # each as its own database role
            started.append(Service(script, {**env, "DATABASE_URL": as_role(url, script)}, log_dir=logs))
        api, worker = (service.wait_healthy() for service in started)
        # Known ids, so that generated requests also reach existing appointments and entries.
        open_ids = [_start(api.base_url)["id"] for _ in range(3)]
        billed_ids = [_start(api.base_url)["id"] for _ in range(3)]
        for appointment_id in billed_ids:
            ended = http.post(f"{api.base_url}/appointments/{appointment_id}/end", json={"end_date": "2020-12-01 14:00:01"}, timeout=10)
            assert ended.status_code == 200, ended.text
        for appointment_id in billed_ids:
            wait_until(lambda: http.get(f"{worker.base_url}/billing-entries/{appointment_id}", timeout=5).ok, 10, what="seed billing")
        yield Live(api, worker, url, open_ids, billed_ids)
    finally:
        for service in started:
            service.stop(timeout=5)
        drop_database(admin_url, name)


def _start(base: str, **fields) -> dict:
    body = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": "2020-12-01 13:00:00", **fields}
    result = http.post(f"{base}/appointments", json=body, timeout=10)
    assert result.status_code == 201, result.text
    return result.json()


@pytest.fixture(scope="module")
def observer(live):
    with psycopg.connect(live.db_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


# ---------------------------------------------------------------------------------------------
# schemathesis against the OpenAPI document each process serves.


@pytest.fixture(scope="module")
def live_schemas(live):
    """The document as each process serves it, aimed at that process (the document's per-path
    servers name the default ports 8080 and 8081, not the ones these processes listen on)."""
    schemas = {}
    for service in SERVICE_TAGS:
        schema = schemathesis.openapi.from_url(live.base(service) + "/openapi.json", timeout=10)
        # The token as schemathesis's own setting, so that its negative cases can leave it out.
        schema.config.update(base_url=live.base(service), headers=AUTH)
        schemas[service] = schema
    return schemas


def _excluded_checks(operation) -> list:
    return [positive_data_acceptance] if operation.definition.raw.get("operationId") in FREE_FORM_TIMESTAMP_BODIES else []


def _ledger_stays_exact(live: Live, observer) -> None:
    """Whatever the fuzzing ended, the running worker bills exactly once, at the right price."""
    wait_until(lambda: ledger(observer)["pending"] == 0, 15, what="the worker to bill what fuzzing ended")
    assert_billed_exactly_once(observer, ended=ledger(observer)["ended"])


@pytest.mark.parametrize("service, method, path", ROUTES, ids=[f"{s}-{m}-{p}" for s, m, p in ROUTES])
def test_schemathesis_coverage_cases_get_documented_responses_and_no_5xx(live, live_schemas, observer, service, method, path):
    """Boundary values, missing/extra/wrong-typed fields and undeclared methods, deterministically."""
    schema = live_schemas[service]
    operation = schema[path][method]
    sent = 0
    with requests.Session() as session:
        for case in schema.iter_coverage_cases(
            operation, generation_modes=list(GenerationMode), generation_config=schema.config.generation_for(operation=operation)
        ):
            case.call_and_validate(session=session, excluded_checks=_excluded_checks(operation), timeout=_timeout(operation))
            sent += 1
    assert sent > 0
    _ledger_stays_exact(live, observer)
    live.assert_no_unhandled_errors()


NEXT_LINK = re.compile(r'^<([^>]*)>; rel="next"$')


def next_page(link: str | None, path: str) -> dict[str, str] | None:
    """The query of the page a Link header names (None without one): the same path, each
    parameter once."""
    if link is None:
        return None
    target = NEXT_LINK.fullmatch(link)
    assert target, link
    split = urllib.parse.urlsplit(target.group(1))
    assert split.path == path and not split.scheme and not split.netloc, link
    pairs = urllib.parse.parse_qsl(split.query, keep_blank_values=True, strict_parsing=True)
    assert len({name for name, _ in pairs}) == len(pairs), link
    return dict(pairs)


def feed_tail(live: Live, observer) -> str:
    """The change feed's cursor after the ledger's last entry. An entry is handed out only once
    every older transaction of the cluster (any database's) has ended, so an empty page does not
    say the end was reached: pages are long polls, read until as many entries came as the ledger
    holds (nothing is billed meanwhile: the fuzz tests leave the queue drained)."""
    total = observer.execute("SELECT count(*) AS n FROM billing_entries").fetchone()["n"]
    query, seen, cursor = {"limit": "1000", "wait": "5"}, 0, None
    deadline = time.monotonic() + 60
    while seen < total or cursor is None:
        assert time.monotonic() < deadline, f"the feed handed out {seen} of {total} entries"
        page = http.get(f"{live.worker.base_url}/billing-entries/changes", params=query, timeout=15)
        assert page.status_code == 200, page.text
        seen += len(page.json()["entries"])
        cursor = query["after"] = page.json()["cursor"]
    assert seen == total
    return cursor


def known_query_values(live: Live, observer, operation_id: str) -> dict[str, list[str]]:
    """Valid query values of an operation that its document cannot describe, for positive cases:
    cursors the services issued (a string of the Cursor pattern is almost never one: 400) and the
    physicians and patients of existing appointments (a random UUID lists nothing)."""
    api, worker = live.api.base_url, live.worker.base_url
    if operation_id == "listAppointments":
        first = http.get(f"{api}/appointments", params={"limit": "2"}, timeout=10)
        assert first.status_code == 200 and first.headers.get("Link"), first.text
        return {
            "before": [next_page(first.headers["Link"], "/appointments")["before"]],
            "physician_id": [row["physician_id"] for row in first.json()],
            "patient_id": [row["patient_id"] for row in first.json()],
        }
    if operation_id == "listBillingEntries":
        entries = http.get(f"{worker}/billing-entries", params={"limit": "1"}, timeout=10)
        assert entries.status_code == 200 and entries.headers.get("Link"), entries.text
        return {"before": [next_page(entries.headers["Link"], "/billing-entries")["before"]]}
    if operation_id == "billingEntryChanges":
        one = http.get(f"{worker}/billing-entries/changes", params={"limit": "1", "wait": "10"}, timeout=15)
        assert one.status_code == 200 and len(one.json()["entries"]) == 1, one.text
        return {"after": [one.json()["cursor"], feed_tail(live, observer)]}  # the tail last
    return {}


CURSORS = {"before", "after"}


def _timeout(operation) -> float:
    """A long poll may be held up to its wait (30 s at most) while entries sit past the horizon."""
    return 40 if operation.definition.raw["operationId"] == "billingEntryChanges" else 10


@pytest.mark.parametrize("service, method, path, mode", FUZZ_CASES)
def test_schemathesis_generated_requests_get_documented_responses_and_no_5xx(live, live_schemas, observer, service, method, path, mode):
    """FUZZ_EXAMPLES schema-valid (positive) or schema-breaking (negative) requests per operation."""
    operation = live_schemas[service][path][method]
    known_ids = live.open_ids + live.billed_ids
    known_values = known_query_values(live, observer, operation.definition.raw["operationId"]) if mode == "positive" else {}
    tail = known_values.get("after", [None])[-1]
    excluded = _excluded_checks(operation)

    with requests.Session() as session:

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)), data=st.data())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        )
        def fuzz(case, data):
            # Valid cases also reach appointments and entries that exist (a random UUID is a 404).
            if mode == "positive" and "appointment_id" in (case.path_parameters or {}) and data.draw(st.booleans(), label="known id"):
                case.path_parameters["appointment_id"] = data.draw(st.sampled_from(known_ids), label="which")
            # A cursor is valid when the service issued it, which no schema can say: a valid case
            # carries one that was. Ids are sometimes ones that list something.
            for name, values in known_values.items():
                if case.query and name in case.query and (name in CURSORS or data.draw(st.booleans(), label=f"known {name}")):
                    case.query[name] = data.draw(st.sampled_from(values), label=name)
            # At the feed's tail a wait is held to its end (nothing commits meanwhile), and
            # anywhere while entries sit past the horizon: these wait 1 s at most, none at the
            # tail (test_a_long_poll_at_the_tail_... holds some, once).
            at_tail = tail is not None and bool(case.query) and case.query.get("after") == tail
            if tail is not None and case.query and "wait" in case.query:
                case.query["wait"] = 0 if at_tail else min(int(case.query["wait"]), 1)
            response = case.call_and_validate(session=session, excluded_checks=excluded, timeout=_timeout(operation))
            if at_tail and response.status_code == 200:
                assert response.json() == {"entries": [], "cursor": tail}, response.text

        fuzz()
    _ledger_stays_exact(live, observer)
    live.assert_no_unhandled_errors()


def test_the_documented_timestamp_schema_rejects_what_the_api_rejects(live):
    """The document says its body schemas are what the services validate against: a client (or a
    fuzzer) must be able to tell a valid start_date from the schema. Timestamp is a bare string."""
    spec = http.get(live.api.base_url + "/openapi.json", timeout=5).json()
    timestamp = jsonschema.Draft202012Validator({**spec["components"]["schemas"]["Timestamp"], "components": spec["components"]})
    for example in spec["components"]["schemas"]["Timestamp"]["examples"]:
        assert timestamp.is_valid(example)
    rejected_by_api = ["tomorrow", "", "2020-12-01T13:00:00", "2020-12-01", "13:00:00", "2020-12-01 13:00"]
    for value in rejected_by_api:
        result = http.post(f"{live.api.base_url}/appointments", json={"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": value}, timeout=5)
        assert_problem(result, 400, "start_date")
    accepted_by_schema = [value for value in rejected_by_api if timestamp.is_valid(value)]
    assert accepted_by_schema == [], f"openapi.yaml's Timestamp accepts strings the API rejects with 400: {accepted_by_schema}"


# ---------------------------------------------------------------------------------------------
# Hostile bodies and requests over real waitress: every one a clean 4xx problem response.


def post_raw(live: Live, path: str, raw: bytes, content_type: str | None = "application/json") -> requests.Response:
    headers = {} if content_type is None else {"Content-Type": content_type}
    return http.post(live.api.base_url + path, data=raw, headers=headers, timeout=10)


@pytest.fixture
def open_appointment(live):
    return _start(live.api.base_url)


HOSTILE_BODIES = [
    pytest.param(b'{"a":' * 5000 + b"1" + b"}" * 5000, "body", id="5000-nested-objects"),
    pytest.param(b'{"physician_id": ' + b'{"a": [' * 2500 + b"]}" * 2500 + b"}", "body", id="5000-nested-in-a-field"),
    pytest.param(b'{"physician_id": ' + b"9" * 5000 + b', "patient_id": "x"}', "body", id="5000-digit-integer"),
    pytest.param(b'{"physician_id": 1e400, "patient_id": "%s"}' % str(uuid.uuid4()).encode(), "physician_id", id="1e400"),
    pytest.param(b'{"physician_id": -1e400, "patient_id": "x"}', "physician_id", id="minus-1e400"),
    pytest.param(b'{"physician_id": 1e-400, "patient_id": "x"}', "physician_id", id="1e-400"),
    pytest.param(b'{"physician_id": 123456789012345678901234567890.5e300, "patient_id": "x"}', "physician_id", id="huge-float"),
    pytest.param(b'{"physician_id": NaN, "patient_id": "x"}', "body", id="NaN"),
    pytest.param(b'{"physician_id": Infinity, "patient_id": "x"}', "body", id="Infinity"),
    pytest.param(b'{"physician_id": -Infinity, "patient_id": "x"}', "body", id="minus-Infinity"),
    pytest.param(b"NaN", "body", id="bare-NaN"),
    pytest.param(b'{"physician_id": "a", "physician_id": "b", "patient_id": "c"}', "physician_id", id="duplicate-key"),
    pytest.param(b'{"physician_id": "\xe9t\xe9", "patient_id": "x"}', "body", id="latin-1-bytes"),
    pytest.param(b"\xff\xfe\x00\x00garbage", "body", id="binary-garbage"),
    pytest.param(b'{"physician_id": "\\ud800", "patient_id": "\\udfff"}', "physician_id", id="lone-surrogate-escapes"),
    pytest.param(b'{"\\ud800": 1, "physician_id": "%s", "patient_id": "%s"}' % (str(uuid.uuid4()).encode(), str(uuid.uuid4()).encode()), "unknown field", id="lone-surrogate-key"),
    pytest.param(b'{"physician_id": "\\u0000", "patient_id": "x"}', "physician_id", id="nul-escape"),
    pytest.param(b'{"physician_id": "x"', "body", id="truncated"),
    pytest.param(b'{"physician_id": "x"} {"patient_id": "y"}', "body", id="two-documents"),
    pytest.param(b"[]", "body", id="array"),
    pytest.param(b'"a string"', "body", id="string"),
    pytest.param(b"null", "body", id="null"),
    pytest.param(b"12", "body", id="number"),
    pytest.param(b"", "body", id="empty"),
    pytest.param(b" \r\n\t ", "body", id="whitespace-only"),
]


@pytest.mark.parametrize("raw, mentions", HOSTILE_BODIES)
def test_a_hostile_start_body_is_a_clean_400_naming_what_is_wrong(live, observer, raw, mentions):
    before = observer.execute("SELECT count(*) AS n FROM appointments").fetchone()["n"]
    assert_problem(post_raw(live, "/appointments", raw), 400, mentions)
    assert observer.execute("SELECT count(*) AS n FROM appointments").fetchone()["n"] == before
    live.assert_no_unhandled_errors()


END_BODIES = [
    pytest.param(b'{"end_date": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body", id="5000-nested"),
    pytest.param(b'{"end_date": ' + b"1" * 5000 + b"}", "body", id="5000-digit-integer"),
    pytest.param(b'{"end_date": 1e400}', "end_date", id="1e400"),
    pytest.param(b'{"end_date": NaN}', "body", id="NaN"),
    pytest.param(b'{"end_date": -Infinity}', "body", id="minus-Infinity"),
    pytest.param(b'{"end_date": "2020-12-01 14:00:00", "end_date": "2020-12-01 15:00:00"}', "end_date", id="duplicate-key"),
    pytest.param(b'{"end_date": "2020-12-01 14:00:00\xff"}', "body", id="non-utf-8"),
    pytest.param(b'{"end_date": "2020-12-01\\u000014:00:00"}', "end_date", id="nul-escape"),
    pytest.param(b'{"end_date": null}', "end_date", id="null-end-date"),
    pytest.param(b"[]", "body", id="array"),
    pytest.param(b"null", "body", id="null"),
]


@pytest.mark.parametrize("raw, mentions", END_BODIES)
def test_a_hostile_end_body_is_a_clean_400_and_the_appointment_stays_open(live, open_appointment, raw, mentions):
    path = f"/appointments/{open_appointment['id']}/end"
    assert_problem(post_raw(live, path, raw), 400, mentions)
    assert http.get(live.api.base_url + f"/appointments/{open_appointment['id']}", timeout=5).json() == open_appointment
    live.assert_no_unhandled_errors()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "surrogates-in-utf-8"])
def test_a_body_that_is_not_utf_8_is_refused_with_400_naming_the_body(live, observer, encoding):
    """RFC 8259: JSON between systems is UTF-8. json.loads() on bytes guesses UTF-16/32 and lets
    UTF-8-encoded surrogates through ('surrogatepass'), so without a strict decode these pass."""
    body = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}
    if encoding == "surrogates-in-utf-8":
        raw = json.dumps({**body, "patient_id": "\ud800"}, ensure_ascii=False).encode("utf-8", "surrogatepass")
        assert b"\xed\xa0\x80" in raw  # not UTF-8: a strict decoder refuses it
    else:
        raw = json.dumps(body).encode(encoding)
    before = observer.execute("SELECT count(*) AS n FROM appointments").fetchone()["n"]
    assert_problem(post_raw(live, "/appointments", raw), 400, "body")
    assert observer.execute("SELECT count(*) AS n FROM appointments").fetchone()["n"] == before


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/jsonx", "text/application/json", "application/json-seq", "multipart/form-data; boundary=x"],
)
def test_a_body_that_is_not_application_json_is_415_on_both_post_routes(live, open_appointment, content_type):
    start = json.dumps({"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}).encode()
    assert_problem(post_raw(live, "/appointments", start, content_type), 415, "Content-Type")
    end = post_raw(live, f"/appointments/{open_appointment['id']}/end", b'{"end_date": "2020-12-01 14:00:00"}', content_type)
    assert_problem(end, 415, "Content-Type")


def test_json_with_parameters_or_in_capitals_is_accepted(live):
    body = json.dumps({"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}).encode()
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        assert post_raw(live, "/appointments", body, content_type).status_code == 201


def test_an_empty_end_body_with_any_content_type_ends_now_and_an_empty_start_body_is_400(live):
    for content_type in (None, "application/json", "text/plain"):
        appointment = _start(live.api.base_url)
        ended = post_raw(live, f"/appointments/{appointment['id']}/end", b"", content_type)
        assert ended.status_code == 200 and ended.json()["end_date"] is not None, ended.text
        assert_problem(post_raw(live, "/appointments", b"", content_type), 400, "body")


# HEAD is left out: it answers wherever GET does (RFC 9110), tested in test_appointments_api.py.
OTHER_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "TRACE", "CONNECT"]


@pytest.mark.parametrize("service, path", list(PATH_METHODS), ids=[f"{s}-{p}" for s, p in PATH_METHODS])
def test_every_undocumented_method_on_every_route_is_405_with_allow(live, service, path):
    """A path may serve several methods (GET and POST /appointments): every other one is 405,
    and Allow names all the documented ones."""
    documented = PATH_METHODS[(service, path)]
    url = live.base(service) + path.replace("{appointment_id}", live.billed_ids[0])
    for other in OTHER_METHODS:
        if other not in documented:
            result = http.request(other, url, timeout=5)
            assert_problem(result, 405)
            allowed = result.headers["Allow"].replace(" ", "").split(",")
            assert set(allowed) - {"HEAD", "OPTIONS"} == set(documented), (other, result.headers)


@pytest.mark.parametrize("service", list(SERVICE_TAGS))
def test_an_unknown_method_is_400_and_the_other_services_routes_are_404(live, service):
    status, headers, body = raw_exchange(live.port(service), b"FROB /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert_problem_parts(status, headers.get("content-type", ""), body, 400)
    other = "billing" if service == "appointments" else "appointments"
    for _, method, path in ROUTES:
        if path not in ("/health", "/ready", "/metrics", "/openapi.json") and (other, method, path) in ROUTES:
            result = http.request(method, live.base(service) + path.replace("{appointment_id}", str(uuid.uuid4())), timeout=5)
            assert_problem(result, 404)


def test_non_canonical_uuid_spellings_in_the_path_are_400(live):
    """The document says format: uuid (the hyphenated 8-4-4-4-12 form, as the body ids are checked);
    uuid.UUID() alone also takes braces, urn:uuid: and no hyphens."""
    known = live.billed_ids[0]
    spellings = [known.replace("-", ""), "{" + known + "}", "urn:uuid:" + known, known[:8] + "-" + known[8:].replace("-", "")]
    for spelling in spellings:
        assert_problem(http.get(f"{live.api.base_url}/appointments/{spelling}", timeout=5), 400, "id")
        assert_problem(http.get(f"{live.worker.base_url}/billing-entries/{spelling}", timeout=5), 400, "appointment_id")
    # The same spellings in a body are refused already:
    body = {"id": known.replace("-", ""), "physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}
    assert_problem(http.post(f"{live.api.base_url}/appointments", json=body, timeout=5), 400, "id")


# --- query strings of the listings and the change feed, over real waitress -------------------

CHANGES, LISTING, ENTRIES = "/billing-entries/changes", "/appointments", "/billing-entries"
A_UUID = "84ab6121-c4a8-4684-8cc2-b03024ec0f1d"
# (route, the query string exactly as sent, the parameter the 400 must name first)
HOSTILE_QUERIES = [
    (CHANGES, "after=%C3%A9", "after"),  # non-ASCII, percent-encoded
    (CHANGES, "after=%FF%FE", "after"),  # percent-encoded bytes that are not UTF-8
    (CHANGES, "after=%00", "after"),
    (CHANGES, "after=%0D%0ALocation:%20x", "after"),  # CR LF: no header splitting either
    (CHANGES, "after=" + "A" * 4000, "after"),  # very long, within the header limit
    (CHANGES, "after=Rg%3D%3D", "after"),  # the start cursor, padded: not as it was issued
    (CHANGES, "after=Rg%20", "after"),
    (CHANGES, "after=%2BRg", "after"),
    (CHANGES, "after=", "after"),
    (CHANGES, "after", "after"),
    (CHANGES, "after=Rg&after=Rg", "after"),  # repeated, even with the same value
    (CHANGES, "wait=1&wait=1", "wait"),
    (CHANGES, "wait=%D9%A5", "wait"),  # ARABIC-INDIC DIGIT FIVE: int() reads it
    (CHANGES, "wait=31", "wait"),
    (CHANGES, "wait=-1", "wait"),
    (CHANGES, "wait=0.5", "wait"),
    (CHANGES, "wait=1e1", "wait"),
    (CHANGES, "limit=0", "limit"),
    (CHANGES, "limit=1001", "limit"),
    (CHANGES, "Wait=1", "Wait"),  # names are case-sensitive
    (CHANGES, "before=Rg", "before"),  # the listings' parameter
    (CHANGES, "after%00=Rg", "after\x00"),
    (LISTING, "physician_id=%C3%A9", "physician_id"),
    (LISTING, "physician_id=%7B" + A_UUID + "%7D", "physician_id"),  # braces: uuid.UUID() takes them
    (LISTING, "physician_id=" + A_UUID.replace("-", ""), "physician_id"),
    (LISTING, f"patient_id={A_UUID}&patient_id={A_UUID}", "patient_id"),
    (LISTING, "patient_id=" + "%41" * 3000, "patient_id"),
    (LISTING, "status=OPEN", "status"),
    (LISTING, "status=open%00", "status"),
    (LISTING, "status=%C3%B6pen", "status"),
    (LISTING, "status=open,ended", "status"),
    (LISTING, "status=open&status=ended", "status"),
    (LISTING, "status=", "status"),
    (LISTING, "status=open&before=" + "%41" * 3000, "before"),
    (LISTING, "before=%FF", "before"),
    (LISTING, "limit=1&limit=1", "limit"),
    (LISTING, "limit=%2B5", "limit"),
    (LISTING, "sort=start_date", "sort"),
    (LISTING, "physician=" + A_UUID, "physician"),
    (LISTING, "after=Rg", "after"),  # the feed's parameter
    (ENTRIES, "before=%FF", "before"),
    (ENTRIES, "before=a&before=b", "before"),
    (ENTRIES, "offset=10", "offset"),
    (ENTRIES, "wait=1", "wait"),
]


def get_raw(port: int, target: str | bytes) -> tuple[int, dict, bytes]:
    """One GET of exactly this request target, bytes as given (requests would re-quote them)."""
    target = target.encode("latin-1") if isinstance(target, str) else target
    return raw_exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


def assert_names_parameter(status: int, headers: dict, body: bytes, name: str) -> dict:
    """A clean 400 problem whose detail starts with the parameter's name."""
    problem = assert_problem_parts(status, headers.get("content-type", ""), body, 400)
    assert problem["detail"].startswith(f"{name}:") or problem["detail"].startswith(f"{name}, "), problem
    return problem


@pytest.mark.parametrize("path, query, name", HOSTILE_QUERIES, ids=[f"{p}?{q[:40]}" for p, q, _ in HOSTILE_QUERIES])
def test_a_malformed_repeated_or_unknown_query_parameter_is_a_400_naming_it(live, path, query, name):
    service = "appointments" if path == LISTING else "billing"
    status, headers, body = get_raw(live.port(service), f"{path}?{query}")
    assert_names_parameter(status, headers, body, name)
    assert "location" not in headers


def test_a_cursor_of_another_listing_or_naming_no_entry_is_a_400_naming_the_parameter(live):
    """Cursors are opaque but carry which listing issued them; a well-formed feed cursor that
    names no entry of this ledger (another ledger's, or one from its future) is refused too."""
    appointments_cursor = next_page(http.get(f"{live.api.base_url}/appointments?limit=1", timeout=5).headers["Link"], LISTING)["before"]
    entries_cursor = next_page(http.get(f"{live.worker.base_url}/billing-entries?limit=1", timeout=5).headers["Link"], ENTRIES)["before"]
    feed_cursor = http.get(f"{live.worker.base_url}{CHANGES}?limit=1&wait=10", timeout=15).json()["cursor"]
    packed = bytearray(base64.urlsafe_b64decode(feed_cursor + "=" * (-len(feed_cursor) % 4)))
    packed[-1] ^= 0xFF  # another appointment_id at the same txid
    no_entry = base64.urlsafe_b64encode(bytes(packed)).rstrip(b"=").decode()
    packed[1:9] = (0xFFFFFFFF00000000).to_bytes(8, "big")  # a txid from the far future
    future = base64.urlsafe_b64encode(bytes(packed)).rstrip(b"=").decode()
    cases = [
        ("appointments", f"{LISTING}?before={entries_cursor}", "before"),
        ("appointments", f"{LISTING}?before={feed_cursor}", "before"),
        ("billing", f"{ENTRIES}?before={appointments_cursor}", "before"),
        ("billing", f"{ENTRIES}?before={feed_cursor}", "before"),
        ("billing", f"{CHANGES}?after={entries_cursor}", "after"),
        ("billing", f"{CHANGES}?after={appointments_cursor}", "after"),
        ("billing", f"{CHANGES}?after={no_entry}", "after"),
        ("billing", f"{CHANGES}?after={future}", "after"),
        ("billing", f"{CHANGES}?after={no_entry}&wait=30", "after"),  # refused at once, not held
    ]
    for service, target, name in cases:
        started = time.monotonic()
        assert_names_parameter(*get_raw(live.port(service), target), name)
        assert time.monotonic() - started < 5, target


@pytest.mark.parametrize("service, path", [("appointments", LISTING), ("billing", ENTRIES), ("billing", CHANGES)])
def test_raw_non_ascii_in_a_query_or_a_target_over_16_kib_is_a_clean_problem(live, service, path):
    """Bytes that are not ASCII in the request line are malformed HTTP, refused by waitress before
    the app (it cannot name a parameter); a request line over the header limit is 431."""
    port = live.port(service)
    for query in (b"status=\xc3\xa9", b"after=\xff", b"\xc3\xa9=1"):
        status, headers, body = get_raw(port, path.encode() + b"?" + query)
        assert_problem_parts(status, headers.get("content-type", ""), body, 400)
    status, headers, body = get_raw(port, f"{path}?limit=1&x={'A' * 17000}")
    assert_problem_parts(status, headers.get("content-type", ""), body, 431)


def test_a_long_poll_at_the_tail_is_held_to_its_deadline_and_one_waiter_too_many_is_503_at_once(live, observer):
    """The feed's tail with wait=1: an empty page carrying the cursor as it was sent, after the
    second; at most BILLING_FEED_MAX_WAITERS wait, the one more is refused at once with Retry-After."""
    tail = feed_tail(live, observer)
    url = f"{live.worker.base_url}{CHANGES}?after={tail}&wait=1"

    def poll(_):
        started = time.monotonic()
        with authorized_session() as session:
            result = session.get(url, timeout=10)
        return result, time.monotonic() - started

    with ThreadPoolExecutor(Config.feed_max_waiters + 1) as pool:
        answers = list(pool.map(poll, range(Config.feed_max_waiters + 1)))
    held = [(r, took) for r, took in answers if r.status_code == 200]
    refused = [(r, took) for r, took in answers if r.status_code != 200]
    assert len(held) == Config.feed_max_waiters and len(refused) == 1, [(r.status_code, r.text) for r, _ in answers]
    for result, took in held:
        assert result.json() == {"entries": [], "cursor": tail} and took >= 1.0, (result.text, took)
    result, took = refused[0]
    assert_problem(result, 503, "wait")
    assert result.headers["Retry-After"] == "1" and took < 0.9, (result.headers, took)


# --- bodies that are too large: refused from the headers, before the body is read -------------


def raw_exchange(port: int, head: bytes, body_chunks=(), timeout: float = 10) -> tuple[int, dict, bytes]:
    """Sends head (and body_chunks from a thread, stopping when the server closes), returns the
    first final response: (status, lower-cased headers, body). Informational 1xx responses are
    returned too, as the status they carry, so a test can see a 100 Continue."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received = b""

    def send_body():
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                return

    if b"\r\n" in head:  # the token, right after the request line
        line, rest = head.split(b"\r\n", 1)
        head = line + b"\r\n" + f"Authorization: Bearer {FUZZ_TOKEN}\r\n".encode() + rest
    try:
        sock.sendall(head)
        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break  # the server closed with our unread upload in its buffer; what came before counts
            except TimeoutError:
                break
            if not data:
                break
            received += data
            parsed = _parse_response(received)
            if parsed is not None:
                return parsed
        sender.join(timeout=1)
    finally:
        sock.close()
    parsed = _parse_response(received, partial=True)
    if parsed is None:
        raise AssertionError(f"no response within {timeout}s; received {received[:300]!r}")
    return parsed


def _parse_response(data: bytes, partial: bool = False):
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if 100 <= status < 200:
        # A 100 Continue is followed by the real answer, if any comes: keep reading unless at EOF.
        following = _parse_response(rest, partial)
        return following if following is not None else ((status, headers, b"") if partial else None)
    length = int(headers.get("content-length", "0"))
    if len(rest) < length and not partial:
        return None
    return status, headers, rest[:length]


UPLOAD_ROUTES = [
    ("appointments", "POST", "/appointments"),
    ("appointments", "POST", "/appointments/{id}/end"),
    ("appointments", "GET", "/health"),
    ("billing", "GET", "/billing-entries"),
]


@pytest.mark.parametrize("service, method, path", UPLOAD_ROUTES, ids=[f"{m}-{p}" for _, m, p in UPLOAD_ROUTES])
def test_a_10_mb_content_length_is_refused_with_413_before_any_of_the_body_is_sent(live, service, method, path):
    head = (
        f"{method} {path.replace('{id}', live.open_ids[0])} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {TEN_MB}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    status, headers, body = raw_exchange(live.port(service), head, timeout=10)
    assert_problem_parts(status, headers.get("content-type", ""), body, 413, "body")
    assert headers.get("connection") == "close"
    assert time.monotonic() - started < 5


def test_expect_100_continue_with_a_10_mb_content_length_gets_413_not_100_continue(live):
    """curl sends Expect: 100-continue for bodies over 1 MB and waits for the answer before it
    uploads: the server knows from the headers that it will refuse, so it must say 413 now, not
    invite the upload (RFC 9110 10.1.1)."""
    head = (
        f"POST /appointments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Expect: 100-continue\r\nContent-Length: {TEN_MB}\r\n\r\n"
    ).encode()
    status, headers, body = raw_exchange(live.port("appointments"), head, timeout=5)
    assert status != 100, "the server answered 100 Continue to a body it will refuse, and then nothing until the upload"
    assert_problem_parts(status, headers.get("content-type", ""), body, 413, "body")


def test_a_chunked_body_over_64_kib_is_refused_with_413_before_the_upload_ends(live, observer):
    before = observer.execute("SELECT count(*) AS n FROM appointments").fetchone()["n"]
    head = b"POST /appointments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (8192, b" " * 8192)
    total = TEN_MB // 8192
    offered = []

    def upload():
        for _ in range(total):
            offered.append(1)
            yield chunk
        yield b"0\r\n\r\n"

    status, headers, body = raw_exchange(live.port("appointments"), head, body_chunks=upload())
    assert_problem_parts(status, headers.get("content-type", ""), body, 413, "body")
    assert len(offered) < total, "the 413 came only after the whole 10 MB was uploaded"
    assert observer.execute("SELECT count(*) AS n FROM appointments").fetchone()["n"] == before


def test_a_small_chunked_body_is_read_and_served(live):
    body = json.dumps({"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    head = b"POST /appointments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    status, headers, response = raw_exchange(live.port("appointments"), head + chunks)
    assert status == 201 and headers["content-type"] == "application/json", response
    assert json.loads(response)["physician_id"] == json.loads(body)["physician_id"]


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"POST /appointments HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", id="negative-content-length"),
        pytest.param(b"POST /appointments HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n", id="text-content-length"),
        pytest.param(b"POST /appointments HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", id="bad-chunk-size"),
        pytest.param(b"GET /appointments/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", id="non-utf-8-path"),
        pytest.param(b"GARBAGE\r\n\r\n", id="no-request-line"),
    ],
)
def test_malformed_http_is_a_clean_400_problem(live, head):
    status, headers, body = raw_exchange(live.port("appointments"), head)
    assert_problem_parts(status, headers.get("content-type", ""), body, 400)


def test_a_body_of_exactly_64_kib_with_a_valid_start_is_served(live):
    body = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}
    raw = json.dumps(body).encode()
    raw = raw[:-1] + b" " * (MAX_BODY_BYTES - len(raw)) + b"}"
    assert len(raw) == MAX_BODY_BYTES
    assert post_raw(live, "/appointments", raw).status_code == 201


def test_concurrent_ends_of_one_appointment_all_answer_with_its_charge_status(live):
    """An ended appointment has a charge, so billing_status is never null in any answer, including
    those of the requests that waited for the row lock while the first end committed."""
    url = live.api.base_url + "/appointments/{}/end"
    nulls = []
    with authorized_session() as session, ThreadPoolExecutor(8) as pool:
        for _ in range(25):
            appointment = _start(live.api.base_url)
            ends = list(pool.map(lambda _: session.post(url.format(appointment["id"]), json={"end_date": "2020-12-01 14:00:00"}, timeout=10), range(8)))
            assert [r.status_code for r in ends] == [200] * 8, [r.text for r in ends]
            nulls += [r.json() for r in ends if r.json()["billing_status"] is None]
    assert nulls == [], f"{len(nulls)} of 200 answers to an end showed an ended appointment with no charge: {nulls[0]}"


# ---------------------------------------------------------------------------------------------
# Stateful: random starts, ends, repeats and reads against a model of the appointments API.

UTC = dt.timezone.utc
RATE_CENTS_PER_HOUR = 20000
BASE = dt.datetime(2020, 12, 1, 13, 0, 0, tzinfo=UTC)


def model_price(start: dt.datetime, end: dt.datetime) -> Decimal:
    """200.00 per hour per started minute, half-up to cents, in integer arithmetic."""
    seconds = int((end - start).total_seconds())
    minutes = -(-seconds // 60)
    cents = (2 * RATE_CENTS_PER_HOUR * minutes + 60) // 120  # half-up of cents_per_hour * minutes / 60
    return Decimal(cents) / 100


def shown(instant: dt.datetime | None) -> str | None:
    return None if instant is None else instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def read_shown(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


# One instant, many spellings: what the server reads must not depend on which one the client sent.
SPELLINGS = st.one_of(
    st.just(("local", 0, "")),
    st.tuples(st.just("iso"), st.integers(-12 * 4, 14 * 4).map(lambda q: q * 15), st.sampled_from(["", ".5", ".999999"])),
    st.tuples(st.just("z"), st.just(0), st.sampled_from(["", ".123"])),
)


def spell(instant: dt.datetime, spelling) -> str:
    kind, offset_minutes, fraction = spelling
    if kind == "local":  # APP_TIMEZONE is UTC here
        return instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + fraction
    if kind == "z":
        return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"
    local = instant.astimezone(dt.timezone(dt.timedelta(minutes=offset_minutes)))
    return local.strftime("%Y-%m-%dT%H:%M:%S") + fraction + local.strftime("%z")[:3] + ":" + local.strftime("%z")[3:]


START_OFFSETS = st.integers(-30 * 86400, 30 * 86400)
DURATIONS = st.one_of(st.sampled_from([0, 1, 59, 60, 61, 3599, 3600, 3601, 86400]), st.integers(0, 14 * 86400))


@dataclasses.dataclass
class Modelled:
    id: str
    physician_id: str
    patient_id: str
    start: dt.datetime
    end: dt.datetime | None = None
    price: Decimal | None = None
    billing_status: str | None = None

    def representation(self) -> dict:
        return {
            "id": self.id,
            "start_date": shown(self.start),
            "end_date": shown(self.end),
            "physician_id": self.physician_id,
            "patient_id": self.patient_id,
            "price": self.price,
            "billing_status": self.billing_status,
        }


def observed(result) -> dict:
    """The JSON body with price as the Decimal its text spells, which must have two decimals."""
    body = result.json
    if body.get("price") is not None:
        assert re.search(r'"price":\d+\.\d{2}[,}]', result.text), result.text
        body = {**body, "price": Decimal(str(body["price"]))}
    return body


def newest_first(appointments) -> list:
    """GET /appointments's order: start_date descending, then id descending. PostgreSQL orders
    uuid bytewise, which is the order of their lower-case hex text."""
    return sorted(appointments, key=lambda a: (a.start, a.id), reverse=True)


def observed_json(result):
    """The JSON body with every number as the Decimal its text spells; prices with two decimals."""
    for price in re.findall(r'"(?:price|total_price)": ([^,}]+)', result.text):
        assert price == "null" or re.fullmatch(r"\d+\.\d{2}", price), result.text
    return json.loads(result.text, parse_float=Decimal)


class FeedFollower:
    """A consumer of the change feed across the state machine's runs (which share one database):
    its cursor, what the runs billed (id -> price) and what the feed handed out.

    An entry is handed out only once every older transaction of the cluster has ended (in any
    database: other tests may hold one open), so a billed entry may be owed for a while; but one
    below the horizon of a read that came back empty was skipped, for good. That is checked at
    every read, without waiting; the test checks at its end that nothing is owed any more."""

    def __init__(self, billing_api, db):
        self.billing_api, self.db = billing_api, db
        self.cursor: str | None = None
        self.billed: dict[str, Decimal] = {}
        self.fed: set[str] = set()
        self.clean = True  # False while a run is under way: one that failed may leave unknown entries

    def pages(self, limit: int) -> list[dict]:
        """Pages from the cursor until one comes empty (wait=0); their entries, in order."""
        entries = []
        while True:
            params = {"limit": str(limit), **({"after": self.cursor} if self.cursor else {})}
            result = self.billing_api.simulate_get("/billing-entries/changes", params=params)
            assert result.status_code == 200, result.text
            page = observed_json(result)
            assert len(page["entries"]) <= limit, page
            if not page["entries"]:
                # Nothing new: the cursor as it was sent (the start's, when none was).
                assert self.cursor is None or page["cursor"] == self.cursor, (page, self.cursor)
                self.cursor = page["cursor"]
                return entries
            assert page["cursor"] != self.cursor, page
            self.cursor = page["cursor"]
            entries += page["entries"]

    def follow(self, limit: int) -> None:
        """Reads to an empty page: every entry billed, at its price, once; none skipped."""
        horizon = self._horizon()  # before the read: the read's own horizon is at least this
        for entry in self.pages(limit):
            appointment_id = entry["appointment_id"]
            assert appointment_id in self.billed, f"the feed handed out {entry}, which no run billed"
            assert appointment_id not in self.fed, f"the feed handed out {entry} twice"
            assert entry["total_price"] == self.billed[appointment_id], (entry, self.billed[appointment_id])
            self.fed.add(appointment_id)
        if self.owed():
            skipped = self.db.execute(
                "SELECT appointment_id::text AS id FROM billing_entries WHERE appointment_id = ANY(%s::uuid[]) AND txid < %s::xid8",
                [sorted(self.owed()), str(horizon)],
            ).fetchall()
            assert skipped == [], f"the feed read past these entries, below its horizon {horizon}, without handing them out: {skipped}"

    def owed(self) -> set[str]:
        return set(self.billed) - self.fed

    def resync(self) -> None:
        """After a failed run: whatever the ledger holds counts as billed, at its price."""
        rows = self.db.execute("SELECT appointment_id::text AS id, total_price FROM billing_entries").fetchall()
        self.billed.update({row["id"]: row["total_price"] for row in rows})

    def _horizon(self) -> int:
        return int(self.db.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS x").fetchone()["x"])


def appointments_machine(api, billing_api, biller, db, feed: FeedFollower):
    class AppointmentsMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.model: dict[str, Modelled] = {}
            # A few physicians and patients, so that a filter matches several appointments; all
            # new to this run, so a filtered listing holds this run's appointments only.
            self.physicians = [str(uuid.uuid4()) for _ in range(3)]
            self.patients = [str(uuid.uuid4()) for _ in range(3)]
            if not feed.clean:
                feed.resync()
            feed.clean = False
            self.billed_unfollowed = False  # this run's own state: preconditions must not read the follower's

        # --- helpers
        def _pick(self, data, which):
            # In the order they were started (ids are random: sorting them would make replays differ).
            candidates = [a for a in self.model.values() if which(a)]
            return data.draw(st.sampled_from(candidates), label="appointment")

        def _end(self, appointment: Modelled, body):
            path = f"/appointments/{appointment.id}/end"
            if body is None:
                return api.simulate_post(path)
            if body == b"":
                return api.simulate_post(path, body=b"", headers=JSON)
            return api.simulate_post(path, json=body)

        def _has(self, which) -> bool:
            return any(which(a) for a in self.model.values())

        def _bill(self) -> None:
            """The worker drains the queue: every ended appointment is billed."""
            biller.drain()
            for appointment in self.model.values():
                if appointment.end is not None:
                    self.billed_unfollowed |= appointment.billing_status != "billed"
                    appointment.billing_status = "billed"
                    feed.billed[appointment.id] = appointment.price

        def _follow(self, limit: int) -> None:
            feed.follow(limit)
            self.billed_unfollowed = False

        # --- starts
        @rule(
            client_id=st.booleans(),
            offset=st.one_of(st.none(), START_OFFSETS),
            spelling=SPELLINGS,
            future=st.booleans(),
            physician=st.sampled_from([None, 0, 1, 2]),
            patient=st.sampled_from([None, 0, 1, 2]),
        )
        def start(self, client_id, offset, spelling, future, physician, patient):
            body = {
                "physician_id": str(uuid.uuid4()) if physician is None else self.physicians[physician],
                "patient_id": str(uuid.uuid4()) if patient is None else self.patients[patient],
            }
            if client_id:
                body["id"] = str(uuid.uuid4())
            start = None
            if offset is not None:
                start = (BASE.replace(year=2099) if future else BASE) + dt.timedelta(seconds=offset)
                body["start_date"] = spell(start, spelling)
            before = dt.datetime.now(UTC).replace(microsecond=0)
            result = api.simulate_post("/appointments", json=body)
            assert result.status_code == 201, result.text
            got = observed(result)
            if client_id:
                assert got["id"] == body["id"]
            if start is None:  # now, by the database's clock
                start = read_shown(got["start_date"])
                assert before - dt.timedelta(seconds=5) <= start <= dt.datetime.now(UTC) + dt.timedelta(seconds=5)
            appointment = Modelled(got["id"], body["physician_id"], body["patient_id"], start)
            assert got == appointment.representation()
            assert result.headers["location"] == f"/appointments/{appointment.id}"
            self.model[appointment.id] = appointment

        @precondition(lambda self: len(self.model) < 4)  # every step reads every appointment
        @rule(physician=st.integers(0, 2), count=st.integers(2, 3), same_start=st.booleans(), offset=START_OFFSETS)
        def start_several(self, physician, count, same_start, offset):
            """One physician's appointments with several patients, at one start_date (the listing
            orders those by id) or a second apart."""
            for i in range(count):
                start = BASE + dt.timedelta(seconds=offset + (0 if same_start else i))
                body = {"physician_id": self.physicians[physician], "patient_id": self.patients[i % 3], "start_date": shown(start)}
                result = api.simulate_post("/appointments", json=body)
                assert result.status_code == 201, result.text
                appointment = Modelled(result.json["id"], body["physician_id"], body["patient_id"], start)
                assert observed(result) == appointment.representation()
                self.model[appointment.id] = appointment

        @precondition(lambda self: self.model)
        @rule(data=st.data(), with_start=st.booleans(), spelling=SPELLINGS)
        def repeat_start(self, data, with_start, spelling):
            appointment = self._pick(data, lambda a: True)
            body = {"id": appointment.id, "physician_id": appointment.physician_id, "patient_id": appointment.patient_id}
            if with_start:
                body["start_date"] = spell(appointment.start, spelling)
            result = api.simulate_post("/appointments", json=body)
            assert result.status_code == 200, result.text
            assert observed(result) == appointment.representation()

        @precondition(lambda self: self.model)
        @rule(data=st.data(), field=st.sampled_from(["physician_id", "patient_id", "start_date"]), shift=st.integers(1, 86400))
        def conflicting_start(self, data, field, shift):
            appointment = self._pick(data, lambda a: True)
            body = {"id": appointment.id, "physician_id": appointment.physician_id, "patient_id": appointment.patient_id}
            body[field] = shown(appointment.start + dt.timedelta(seconds=shift)) if field == "start_date" else str(uuid.uuid4())
            result = api.simulate_post("/appointments", json=body)
            assert_problem(result, 409, field)

        # --- ends
        @precondition(lambda self: self._has(lambda a: a.end is None))
        @rule(data=st.data(), duration=DURATIONS, spelling=SPELLINGS)
        def end_at(self, data, duration, spelling):
            appointment = self._pick(data, lambda a: a.end is None)
            end = appointment.start + dt.timedelta(seconds=duration)
            result = self._end(appointment, {"end_date": spell(end, spelling)})
            assert result.status_code == 200, result.text
            appointment.end, appointment.price, appointment.billing_status = end, model_price(appointment.start, end), "pending"
            assert observed(result) == appointment.representation()

        @precondition(lambda self: self._has(lambda a: a.end is None))
        @rule(data=st.data(), body=st.sampled_from([None, b"", {}]))
        def end_now(self, data, body):
            appointment = self._pick(data, lambda a: a.end is None)
            now = dt.datetime.now(UTC)
            result = self._end(appointment, body)
            if appointment.start > now + dt.timedelta(seconds=5):
                assert_problem(result, 422, "end_date")
                return
            assert result.status_code == 200, result.text
            end = read_shown(result.json["end_date"])
            assert now - dt.timedelta(seconds=5) <= end <= dt.datetime.now(UTC) + dt.timedelta(seconds=5)
            appointment.end, appointment.price, appointment.billing_status = end, model_price(appointment.start, end), "pending"
            assert observed(result) == appointment.representation()

        @precondition(lambda self: self._has(lambda a: a.end is None))
        @rule(data=st.data(), early=st.integers(1, 30 * 86400), spelling=SPELLINGS)
        def end_before_start(self, data, early, spelling):
            appointment = self._pick(data, lambda a: a.end is None)
            result = self._end(appointment, {"end_date": spell(appointment.start - dt.timedelta(seconds=early), spelling)})
            assert_problem(result, 422, "end_date")

        @precondition(lambda self: self._has(lambda a: a.end is not None))
        @rule(data=st.data(), how=st.sampled_from(["no body", "empty", "{}", "same"]), spelling=SPELLINGS)
        def end_again(self, data, how, spelling):
            appointment = self._pick(data, lambda a: a.end is not None)
            body = {"no body": None, "empty": b"", "{}": {}, "same": {"end_date": spell(appointment.end, spelling)}}[how]
            result = self._end(appointment, body)
            assert result.status_code == 200, result.text
            assert observed(result) == appointment.representation()

        @precondition(lambda self: self._has(lambda a: a.end is not None))
        @rule(data=st.data(), shift=st.integers(-86400, 86400).filter(bool))
        def end_again_at_another_time(self, data, shift):
            appointment = self._pick(data, lambda a: a.end is not None)
            result = self._end(appointment, {"end_date": shown(appointment.end + dt.timedelta(seconds=shift))})
            assert_problem(result, 409, "end_date")

        # --- reads, unknowns, the worker
        @precondition(lambda self: self.model)
        @rule(data=st.data())
        def read(self, data):
            appointment = self._pick(data, lambda a: True)
            result = api.simulate_get(f"/appointments/{appointment.id}")
            assert result.status_code == 200 and observed(result) == appointment.representation()

        @rule(action=st.sampled_from(["read", "end"]))
        def unknown_id_is_404(self, action):
            missing = str(uuid.uuid4())
            result = api.simulate_get(f"/appointments/{missing}") if action == "read" else api.simulate_post(f"/appointments/{missing}/end")
            assert_problem(result, 404, missing)

        @precondition(lambda self: self.model)
        @rule(data=st.data(), by=st.sampled_from(["physician", "patient", "both"]), status=st.sampled_from([None, "open", "ended"]), limit=st.integers(1, 3))
        def list_appointments(self, data, by, status, limit):
            """Filtered by an appointment's physician, patient or both (and maybe status), in small
            pages, following Link to the end: exactly the model's matching rows, newest first by
            start_date, then id descending (PostgreSQL orders uuid bytewise: the hex text's order)."""
            anchor = self._pick(data, lambda a: True)
            query = {"limit": str(limit)}
            if by in ("physician", "both"):
                query["physician_id"] = anchor.physician_id
            if by in ("patient", "both"):
                query["patient_id"] = anchor.patient_id
            if status is not None:
                query["status"] = status
            matching = [
                a for a in self.model.values()
                if query.get("physician_id", a.physician_id) == a.physician_id
                and query.get("patient_id", a.patient_id) == a.patient_id
                and status in (None, "open" if a.end is None else "ended")
            ]
            expected = [a.representation() for a in newest_first(matching)]
            listed: list[dict] = []
            while query is not None:
                result = api.simulate_get("/appointments", params=query)
                assert result.status_code == 200, result.text
                page = observed_json(result)
                following = next_page(result.headers.get("link"), "/appointments")
                # A page with a next one is full; the last is never empty unless it is the only one.
                assert len(page) == limit if following else (0 < len(page) <= limit or not listed and not page), (query, page)
                if following is not None:
                    assert {k: v for k, v in following.items() if k != "before"} == {k: v for k, v in query.items() if k != "before"}
                listed += page
                assert len(listed) <= len(expected), (query, listed, expected)
                query = following
            assert listed == expected

        @precondition(lambda self: self.billed_unfollowed)
        @rule(limit=st.integers(1, 4))
        def follow_feed(self, limit):
            """The change feed, in pages of `limit`, from the cursor kept across runs."""
            self._follow(limit)

        @rule(follow=st.sampled_from([None, 1, 2, 5]))
        def drain(self, follow):
            """The worker bills what is due; then maybe the feed is followed in pages of `follow`."""
            self._bill()
            if follow is not None:
                self._follow(follow)

        @invariant()
        def api_agrees_with_the_model(self):
            """Every appointment as the model has it, after every step: those of the run's own
            physicians through one listing per physician (all of them, newest first: cheaper than
            a read each), the others read one by one. `read` and the teardown still read the
            former one by one."""
            for physician in self.physicians:
                theirs = [a for a in self.model.values() if a.physician_id == physician]
                if theirs:
                    result = api.simulate_get("/appointments", params={"physician_id": physician, "limit": "1000"})
                    assert result.status_code == 200 and "link" not in result.headers, result.text
                    assert observed_json(result) == [a.representation() for a in newest_first(theirs)]
            for appointment in self.model.values():
                if appointment.physician_id not in self.physicians:
                    result = api.simulate_get(f"/appointments/{appointment.id}")
                    assert result.status_code == 200 and observed(result) == appointment.representation()

        @invariant()
        def one_queued_charge_per_ended_appointment(self):
            if not self.model:
                return
            rows = db.execute(
                "SELECT appointment_id::text AS id, total_price FROM billing_queue WHERE appointment_id = ANY(%s::uuid[])", [list(self.model)]
            ).fetchall()
            assert {r["id"]: r["total_price"] for r in rows} == {a.id: a.price for a in self.model.values() if a.end is not None}

        def teardown(self):
            self._bill()
            for appointment in self.model.values():
                entry = billing_api.simulate_get(f"/billing-entries/{appointment.id}")
                if appointment.end is None:
                    assert entry.status_code == 404, entry.text
                else:
                    assert entry.status_code == 200, entry.text
                    assert Decimal(str(entry.json["total_price"])) == appointment.price
                    appointment.billing_status = "billed"
                assert observed(api.simulate_get(f"/appointments/{appointment.id}")) == appointment.representation()
            if self.model:
                entries = db.execute(
                    "SELECT count(*) AS n FROM billing_entries WHERE appointment_id = ANY(%s::uuid[])", [list(self.model)]
                ).fetchone()["n"]
                assert entries == sum(a.end is not None for a in self.model.values())
            self._follow(1000)
            feed.clean = True

    return AppointmentsMachine


@pytest.mark.slow  # hypothesis's state machine, many runs
def test_random_starts_ends_repeats_and_reads_keep_model_api_and_ledger_in_agreement(api, billing_api, biller, db):
    feed = FeedFollower(billing_api, db)
    machine = appointments_machine(api, billing_api, biller, db, feed)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        ),
    )
    # Across all runs: every ended appointment billed exactly once at the right price, nothing else.
    biller.drain()
    assert_billed_exactly_once(db, ended=ledger(db)["ended"])
    assert ledger(db)["ended"] > 0
    # And the change feed, followed through all runs, handed out the whole ledger, each entry once
    # (entries still past the horizon are waited for).
    deadline = time.monotonic() + 60
    while feed.owed() and time.monotonic() < deadline:
        time.sleep(0.1)
        feed.follow(1000)
    assert feed.owed() == set()
    assert feed.fed == {row["id"] for row in db.execute("SELECT appointment_id::text AS id FROM billing_entries")}


def test_an_end_date_echoed_back_as_the_api_showed_it_is_the_same_end_date(config, pool):
    """In an APP_TIMEZONE with daylight saving, the hour after clocks go back is shown twice: the
    API must read back what it wrote. America/Sao_Paulo went from -02 to -03 at 2019-02-17 00:00,
    so 23:00-23:59 of 2019-02-16 happened twice."""
    api = falcon.testing.TestClient(appointments.create_app(replace(config, timezone=ZoneInfo("America/Sao_Paulo")), pool))
    body = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": "2019-02-16T23:10:00-03:00"}
    started = api.simulate_post("/appointments", json=body)
    assert started.status_code == 201, started.text
    ended = api.simulate_post(f"/appointments/{started.json['id']}/end", json={"end_date": "2019-02-16T23:40:00-03:00"})
    assert ended.status_code == 200 and ended.json["price"] == 100.0, ended.text
    assert ended.json["end_date"] == "2019-02-16 23:40:00"
    # The client repeats the end with the end_date the API gave it: the same end, so 200 and the same appointment.
    again = api.simulate_post(f"/appointments/{started.json['id']}/end", json={"end_date": ended.json["end_date"]})
    assert again.status_code == 200, again.text
    assert again.json == ended.json
    # And a repeated start with the start_date the API showed is the same start.
    repeat = api.simulate_post("/appointments", json={**body, "id": started.json["id"], "start_date": started.json["start_date"]})
    assert repeat.status_code == 200, repeat.text
