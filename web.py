"""HTTP plumbing both services share: problem-details errors, JSON bodies, common routes, waitress.

- ``Problem`` is the one exception a resource raises; every error, ours, Falcon's, psycopg's and
  waitress's own, leaves as RFC 9457 problem details carrying the request's ``request_id``.
- ``base_app`` builds the Falcon app with the telemetry and deadline middleware and the
  ``/health``, ``/ready``, ``/metrics`` and ``/openapi.json`` routes; ``make_server`` serves it
  with waitress, which stamps each request's arrival (the deadline counts from it) and serves the
  probes on threads of their own (``Lanes``).
"""

from __future__ import annotations

import datetime
import decimal
import functools
import http
import json
import pathlib
import re
import signal
import threading
import time
import uuid
from typing import Any, Mapping
from zoneinfo import ZoneInfo

import falcon
import fastjsonschema
import jsonschema
import orjson
import psycopg
import psycopg.errors
import waitress.channel
import waitress.parser
import waitress.server
import waitress.task
import yaml

import db
from config import CENTS
from db import DatabaseUnavailable, DeadlineExceeded, UnreplicatedCommit
from telemetry import REQUEST_ID_HEADER, Metrics, MetricsResource, RequestTelemetry, get_logger, request_id_from

log = get_logger("clinic.web")

HERE = pathlib.Path(__file__).resolve().parent
MAX_BODY_BYTES = 64 * 1024


# ---------------------------------------------------------------------------------------------
# Errors: one exception type, rendered as RFC 9457 problem details in one place.


class Problem(Exception):
    """Raised anywhere a request cannot be served; becomes an application/problem+json response."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


def problem_body(status: int, detail: str | None, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "about:blank", "title": http.HTTPStatus(status).phrase, "status": status}
    if detail:
        body["detail"] = detail
    if request_id:
        body["request_id"] = request_id
    return body


def _render(req, resp: falcon.Response, status: int, detail: str | None, headers: Mapping[str, str] | None = None) -> None:
    resp.status = status
    resp.content_type = "application/problem+json"
    resp.text = json.dumps(problem_body(status, detail, getattr(req.context, "request_id", None)))
    for key, value in (headers or {}).items():
        resp.set_header(key, value)


def _on_problem(req, resp, ex: Problem, params) -> None:
    _render(req, resp, ex.status, ex.detail, ex.headers)


def _on_database_unavailable(req, resp, ex: psycopg.OperationalError, params) -> None:
    log.warning("database_unavailable", error=str(ex).strip())
    _render(req, resp, 503, "the database is unavailable; retry shortly", {"Retry-After": "1"})


def _on_deadline_exceeded(req, resp, ex: DeadlineExceeded, params) -> None:
    log.warning("request_cut_short", error=str(ex), after_ms=round(1000 * (time.monotonic() - _arrival(req)), 1))
    _render(
        req, resp, 503,
        f"the request could not finish: {ex} (a request's deadline is {req.context.timeout:g} s after its arrival); "
        "a change it carried may or may not have been applied: retry the same request, with the same id, and it is applied once",
        {"Retry-After": "1"},
    )


def _on_database_unavailable_fast(req, resp, ex: DatabaseUnavailable, params) -> None:
    # No log line per request: the monitor logged the change once (db.DatabaseMonitor).
    _render(req, resp, 503, f"{ex}; retry shortly", {"Retry-After": "1"})


def _on_unreplicated_commit(req, resp, ex: UnreplicatedCommit, params) -> None:
    log.error("commit_not_replicated", error=str(ex))
    _render(req, resp, 503, "the change was not confirmed by the database's standby; retry the same request: it is not done twice", {"Retry-After": "1"})


def _on_database_not_ready(req, resp, ex: psycopg.Error, params) -> None:
    # The schema not applied yet, a read-only server during a failover, or a role without the
    # grants this version needs (its roles.sql not applied): the database is there but cannot
    # serve us, the same answer as /ready gives.
    log.error("database_not_ready", error=f"{ex.__class__.__name__}: {str(ex).strip()}")
    _render(req, resp, 503, f"the database is not ready ({ex.__class__.__name__}); retry shortly", {"Retry-After": "5"})


def _serialize_http_error(req, resp, ex: falcon.HTTPError) -> None:
    # Falcon's own errors (unknown route, wrong method, invalid query parameter) look like ours.
    named = {404: f"path: nothing at {req.path}", 405: f"method: {req.method} is not allowed on {req.path}"}
    _render(req, resp, ex.status_code, ex.description or named.get(ex.status_code, ex.title))


def _on_unexpected(req, resp, ex: Exception, params) -> None:
    log.exception("unhandled_error")
    _render(req, resp, 500, "internal error; it has been logged")


# ---------------------------------------------------------------------------------------------
# Request bodies and responses.

def _json_default(value: Any) -> Any:
    # Money goes out as a JSON number spelled exactly as the Decimal is (200.00), never via float.
    if isinstance(value, decimal.Decimal) and value.is_finite():
        return orjson.Fragment(format(value, "f"))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(media: Any) -> bytes:
    """JSON as UTF-8 bytes (orjson); Decimals as numbers with their exact digits."""
    return orjson.dumps(media, default=_json_default)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def parse_json(raw: bytes) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys; anything malformed is a 400."""
    try:
        # RFC 8259: JSON between systems is UTF-8; json.loads(bytes) would also guess UTF-16/32.
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise Problem(400, "body: JSON is nested too deeply") from None
    except ValueError as exc:  # includes UnicodeDecodeError and over-long integers
        raise Problem(400, f"body: malformed JSON ({exc})") from None


def read_body(req: falcon.Request) -> bytes:
    """The raw body, refused with 413 before reading when it is larger than MAX_BODY_BYTES."""
    length = req.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise Problem(413, f"body: {length} bytes is over the limit of {MAX_BODY_BYTES} bytes")
    raw = req.bounded_stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise Problem(413, f"body: over the limit of {MAX_BODY_BYTES} bytes")
    if raw.strip():
        mime = (req.content_type or "").split(";")[0].strip().lower()
        if mime != falcon.MEDIA_JSON and not mime.endswith("+json"):
            raise Problem(415, f"Content-Type: {req.content_type or 'none'!r} is not supported; send application/json")
    return raw


class SchemaValidator:
    """Validates request bodies against the JSON Schemas in openapi.yaml (one source of truth).

    Two validators of the same schema: fastjsonschema's, compiled to Python code once at start,
    decides (compiled code: a small fraction of the CPU jsonschema's walk costs, which would be a
    large share of a start's; docs/performance.md), and
    jsonschema words a rejection with its best_match error. They read the same schema dict, and
    "uuid" is checked by jsonschema's own format checker in both. fastjsonschema knows drafts 4
    to 7 and jsonschema 2020-12: the schemas may use only keywords both read alike
    (SHARED_KEYWORDS, checked here at start). One known difference remains, and the stricter
    reading stands: a pattern's `$` is the end of the text for fastjsonschema, as in JSON
    Schema's ECMA-262 regexes, and also the place before a final newline for jsonschema's `re`.
    tests/test_core.py checks that whatever the fast validator accepts, jsonschema accepts too.
    """

    def __init__(self, spec: dict[str, Any], name: str):
        schema = {**spec["components"]["schemas"][name], "components": spec["components"]}
        unknown = _keywords(spec["components"]["schemas"][name], spec["components"]["schemas"]) - SHARED_KEYWORDS
        if unknown:
            raise ValueError(f"schema {name} uses {sorted(unknown)}: not read alike by fastjsonschema and jsonschema (web.SHARED_KEYWORDS)")
        format_checker = jsonschema.FormatChecker()
        self._validator = jsonschema.Draft202012Validator(schema, format_checker=format_checker)
        self._first_error = _fast_validator(schema, {"uuid": functools.partial(format_checker.conforms, format="uuid")})

    def is_valid(self, body: Any) -> bool:
        return self._first_error(body) is None

    def __call__(self, body: Any) -> dict[str, Any]:
        fast_error = self._first_error(body)
        if fast_error is None:
            return body
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(body))
        if error is None:  # the `$` of a pattern (see above): worded from fastjsonschema's error
            field = ".".join(str(p) for p in fast_error.path[1:]) or "body"
            hint = (fast_error.definition or {}).get("title", "the documented format")
            raise Problem(400, f"{field}: expected {hint}, got {shown(str(fast_error.value))}")
        field = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "required":
            missing = next(f for f in error.validator_value if f not in error.instance)
            raise Problem(400, f"{missing}: is required")
        if error.validator == "additionalProperties":
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            raise Problem(400, f"{', '.join(extra)}: unknown field")
        if error.validator == "pattern":
            hint = error.schema.get("title", "the documented format")
            raise Problem(400, f"{field}: expected {hint}, got {error.instance!r}")
        if error.validator == "format":
            raise Problem(400, f"{field}: must be a {error.validator_value.upper()}, got {error.instance!r}")
        if error.validator == "type" and not field:
            raise Problem(400, "body: must be a JSON object")
        raise Problem(400, f"{field or 'body'}: {error.message}")


# The request schemas' keywords that draft 7 (fastjsonschema) and 2020-12 (jsonschema) read the
# same way, annotations included. A keyword of 2020-12 only (unevaluatedProperties, prefixItems,
# dependentRequired ...) would be ignored by the fast validator: a schema using one is refused at
# start. ($ref stands alone in these schemas: draft 7 ignores the keywords beside it.)
SHARED_KEYWORDS = frozenset(
    "type properties required additionalProperties pattern format enum const minLength maxLength "
    "minimum maximum items minItems maxItems $ref title description examples".split()
)


def _keywords(schema: Any, schemas: dict[str, Any], seen: frozenset = frozenset()) -> set[str]:
    """Every keyword a schema uses, through its properties, items and #/components/schemas refs."""
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    if "$ref" in schema:
        if set(schema) - {"$ref", "description", "title"}:
            found.add("$ref with siblings")
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name not in seen:
            found |= _keywords(schemas[name], schemas, seen | {name})
    for child in (*schema.get("properties", {}).values(), schema.get("items")):
        found |= _keywords(child, schemas, seen)
    return found


def _fast_validator(schema: dict[str, Any], formats: dict[str, Any]):
    """body -> its first error, or None when valid: compiled from the schema by fastjsonschema
    (defaults never filled in)."""
    validate = fastjsonschema.compile(schema, formats=formats, use_default=False)

    def first_error(body: Any) -> fastjsonschema.JsonSchemaValueException | None:
        try:
            validate(body)
        except fastjsonschema.JsonSchemaValueException as exc:
            return exc
        return None

    return first_error


def read_json_object(req: falcon.Request, validate: SchemaValidator, optional: bool = False) -> dict[str, Any]:
    raw = read_body(req)
    if not raw.strip():
        if optional:
            return {}
        raise Problem(400, "body: a JSON object is required")
    return validate(parse_json(raw))


def send(resp: falcon.Response, status: int, media: Any) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = dumps(media)


def shown(value: str, limit: int = 80) -> str:
    """What the client sent, quoted for a problem's detail, cut short when it is long."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_uuid(value: str, field: str) -> uuid.UUID:
    """The canonical 8-4-4-4-12 spelling only, as `format: uuid` documents (uuid.UUID alone would
    also take braces, urn:uuid: and hex without hyphens)."""
    if not _UUID.fullmatch(value):
        raise Problem(400, f"{field}: must be a UUID like 84ab6121-c4a8-4684-8cc2-b03024ec0f1d, got {shown(value)}")
    return uuid.UUID(value)


def format_timestamp(value: datetime.datetime | None, tz: ZoneInfo) -> str | None:
    """The challenge's 'YYYY-MM-DD HH:MM:SS', in the configured time zone."""
    if value is None:
        return None
    return value.astimezone(tz).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")


def money(value: decimal.Decimal | None) -> decimal.Decimal | None:
    return None if value is None else value.quantize(CENTS)


@functools.lru_cache(maxsize=1)
def openapi_spec() -> dict[str, Any]:
    with open(HERE / "openapi.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


# ---------------------------------------------------------------------------------------------
# Resources both services expose.


class Health:
    """Liveness: the process answers; no database involved."""

    def on_get(self, req, resp):
        send(resp, 200, {"status": "ok"})

    on_head = on_get  # RFC 9110: HEAD wherever GET is served (Falcon drops the body)


class Ready:
    """Readiness: the database answers, on the leader, with the schema there. From the pool's
    monitor (db.DatabaseMonitor): a fresh probe when one comes within its CHECK_WAIT (a few
    milliseconds on a healthy server), else its last one, so this never waits on a database that
    does not answer."""

    def __init__(self, pool: db.LeaderPool):
        self._monitor = pool.monitor

    def on_get(self, req, resp):
        health = self._monitor.check()
        if not health.up:
            raise Problem(503, f"{health.detail}; retry shortly", {"Retry-After": "1"})
        if not health.schema:
            raise Problem(503, "schema: tables are missing; apply schema.sql", {"Retry-After": "5"})
        send(resp, 200, {"status": "ready"})

    on_head = on_get


class OpenApi:
    def on_get(self, req, resp):
        send(resp, 200, openapi_spec())

    on_head = on_get


# ---------------------------------------------------------------------------------------------
# Deadlines: every request's database work ends within the configured time of its arrival.

# The WSGI environ key under which waitress (_TimedRequest, _Task) hands over the request's
# arrival, in time.monotonic() seconds: when its last byte came, before it waited for a thread.
ARRIVED = "clinic.arrived"


def _arrival(req) -> float:
    return req.env.get(ARRIVED) or req.context.get("arrived", time.monotonic())


class Deadlines:
    """Falcon middleware: a request's deadline is ``seconds`` after its arrival, waiting for a
    thread included; every wait for the database in it ends by then (db.set_deadline), and one
    that runs out is a 503 (DeadlineExceeded). Requests that do not touch the database (the
    probes, the OpenAPI document, 404s) are not cut short: they have nothing to wait for."""

    def __init__(self, seconds: float):
        self._seconds = seconds

    def process_request(self, req, resp):
        req.context.arrived = _arrival(req)
        req.context.timeout = self._seconds
        req.context.deadline_token = db.set_deadline(req.context.arrived + self._seconds)

    def process_response(self, req, resp, resource, req_succeeded):
        token = req.context.get("deadline_token")
        if token is not None:
            db.reset_deadline(token)


def base_app(pool: db.LeaderPool, metrics: Metrics, guards: list | None = None, request_timeout: float = 8.0) -> falcon.App:
    """A Falcon app with request telemetry, deadlines, problem-details errors and the routes both
    serve. ``guards`` is more middleware, run after those (so a refusal is logged and counted)."""
    app = falcon.App(middleware=[RequestTelemetry(metrics), Deadlines(request_timeout), *(guards or [])])
    app.set_error_serializer(_serialize_http_error)
    app.add_error_handler(Exception, _on_unexpected)
    app.add_error_handler(psycopg.OperationalError, _on_database_unavailable)
    app.add_error_handler(DeadlineExceeded, _on_deadline_exceeded)
    app.add_error_handler(DatabaseUnavailable, _on_database_unavailable_fast)
    app.add_error_handler(UnreplicatedCommit, _on_unreplicated_commit)
    app.add_error_handler(
        (psycopg.errors.UndefinedTable, psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.InsufficientPrivilege),
        _on_database_not_ready,
    )
    app.add_error_handler(Problem, _on_problem)
    app.add_route("/health", Health())
    app.add_route("/ready", Ready(pool))
    app.add_route("/metrics", MetricsResource(metrics.registry))
    app.add_route("/openapi.json", OpenApi())
    return app


# ---------------------------------------------------------------------------------------------
# Serving: waitress, with its own error answers made to look like ours.


class _ProblemErrorTask(waitress.task.ErrorTask):
    """Waitress answers some requests itself, before the app sees them (a body over
    max_request_body_size is refused from its Content-Length, before it is read): render those as
    problem details with a request id too."""

    def execute(self):
        error = self.request.error
        detail = f"body: over the limit of {MAX_BODY_BYTES} bytes" if error.code == 413 else error.body
        # Header names as waitress's parser keeps them: upper case, '-' as '_'.
        request_id = request_id_from(self.request.headers.get(REQUEST_ID_HEADER.upper().replace("-", "_")))
        body = json.dumps(problem_body(error.code, detail, request_id)).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.extend(
            [
                ("Content-Type", "application/problem+json"),
                (REQUEST_ID_HEADER, request_id),
                # What auth.NoStore gives the app's own responses.
                ("X-Content-Type-Options", "nosniff"),
                ("Cache-Control", "no-store"),
            ]
        )
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _TimedRequest(waitress.parser.HTTPRequestParser):
    """waitress's request parser, noting when the request has fully arrived."""

    arrived: float | None = None

    def received(self, data):
        consumed = super().received(data)
        if self.completed and self.arrived is None:
            self.arrived = time.monotonic()
        return consumed


class _Task(waitress.task.WSGITask):
    """waitress's WSGI task, handing the request's arrival to the app (ARRIVED)."""

    def get_environment(self):
        environ = super().get_environment()
        environ[ARRIVED] = getattr(self.request, "arrived", None)
        return environ


class _Channel(waitress.channel.HTTPChannel):
    parser_class = _TimedRequest
    task_class = _Task
    error_task_class = _ProblemErrorTask

    def send_continue(self):
        # waitress would invite the upload (100 Continue) of a body it already refused from its
        # Content-Length, and then not answer until the body came: let the 413 go out now instead.
        if self.request.error is not None:
            self.request.expect_continue = False
            return
        super().send_continue()


# waitress's settings, chosen rather than inherited. An idle or slow connection costs waitress a
# socket and a buffer but no thread (threads serve only requests that have fully arrived), so the
# connection limit can be well above the thread count; past it waitress stops accepting, which is
# what a slowloris client aims for. poll() instead of select(), whose 1,024-descriptor ceiling
# would sit below that limit. An idle connection is closed after CHANNEL_TIMEOUT seconds.
WAITRESS_SETTINGS = {
    "connection_limit": 1000,
    "channel_timeout": 30,
    "cleanup_interval": 10,
    "asyncore_use_poll": True,
    # Our headers are a few hundred bytes; waitress's default allows 256 KiB of them.
    "max_request_header_size": 16 * 1024,
    # waitress compares with >=, so +1 lets a body of exactly MAX_BODY_BYTES through.
    "max_request_body_size": MAX_BODY_BYTES + 1,
    "ident": "clinic-billing",
}


# Waitress threads serving requests (bench/ceiling_app.py serves with the same). With fewer, a
# request waits for a thread while others wait on the database; with more, each waits on the GIL
# more often (docs/performance.md has the measurement).
THREADS = 8


# Served on threads of their own (Lanes): a kubelet or a load balancer that cannot reach
# liveness within its timeout restarts or drops a healthy process, as it would whenever every
# request thread waits on a database that has stopped answering.
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
PROBE_THREADS = 2


class Lanes:
    """waitress's task dispatcher in two lanes: requests for PROBE_PATHS go to PROBE_THREADS
    threads of their own, every other request to the service's threads. None of the probes
    waits on the database (/ready and the metrics read the pool's monitor), so they answer in
    milliseconds while every other thread waits on a database that does not answer, or on the
    GIL behind a busy one. waitress hands each connection to one lane at a time, request by
    request, as it does with one dispatcher."""

    def __init__(self, threads: int, probe_threads: int = PROBE_THREADS):
        self.requests = waitress.task.ThreadedTaskDispatcher()
        self.probes = waitress.task.ThreadedTaskDispatcher()
        self.requests.set_thread_count(threads)
        self.probes.set_thread_count(probe_threads)

    def add_task(self, channel) -> None:
        first = channel.requests[0] if channel.requests else None
        lane = self.probes if first is not None and not first.error and first.path in PROBE_PATHS else self.requests
        lane.add_task(channel)

    def set_thread_count(self, count: int) -> None:
        self.requests.set_thread_count(count)

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        requests = self.requests.shutdown(cancel_pending, timeout)
        probes = self.probes.shutdown(cancel_pending, 1)
        return requests or probes


def make_server(app, port: int, host: str = "0.0.0.0", threads: int = THREADS):
    # _dispatcher is create_server's hook for the task dispatcher.
    server = waitress.server.create_server(app, host=host, port=port, threads=threads, _dispatcher=Lanes(threads), **WAITRESS_SETTINGS)
    server.channel_class = _Channel  # the server's hook for its connection class
    return server


def serve_in_thread(server) -> threading.Thread:
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    return thread


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signals(callback) -> None:
    """SIGTERM (docker stop) and SIGINT (Ctrl-C) both ask for a clean stop, once."""

    received = []

    def handler(signum, frame):
        # Ctrl-C under `make run` delivers SIGINT and then SIGTERM: the second must not break the
        # shutdown the first began.
        received.append(signum)
        if len(received) == 1:
            # Logged from another thread: this handler may have interrupted the main thread while
            # it held the log stream's (non-reentrant) lock.
            threading.Thread(target=log.info, args=("stop_requested",), kwargs={"signal": signal.Signals(signum).name}).start()
            callback()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
