"""What both services share: configuration, the connection pool, problem errors and HTTP plumbing.

The only place that reads the environment is ``Config.from_env``; everything else gets a ``Config``.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import http
import json
import logging
import os
import pathlib
import re
import signal
import sys
import threading
import uuid
from typing import Any, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import falcon
import jsonschema
import psycopg
import psycopg.errors
import psycopg_pool
import simplejson
import waitress.channel
import waitress.server
import waitress.utilities
import yaml

log = logging.getLogger("clinic")

HERE = pathlib.Path(__file__).resolve().parent
MAX_BODY_BYTES = 64 * 1024
# Largest value a NUMERIC(12,2) column holds.
MAX_MONEY = decimal.Decimal("9999999999.99")
CENTS = decimal.Decimal("0.01")


class ConfigError(Exception):
    """A setting in the environment is missing or malformed; the message names the variable."""


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip() or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings of both services; the defaults here are the documented ones."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    appointments_port: int = 8080
    billing_port: int = 8081
    hourly_rate: decimal.Decimal = decimal.Decimal("200.00")
    timezone: ZoneInfo = ZoneInfo("UTC")
    poll_seconds: float = 10.0
    batch_size: int = 500
    max_attempts: int = 10
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        rate_raw = env.get("HOURLY_RATE", "").strip() or str(cls.hourly_rate)
        try:
            rate = decimal.Decimal(rate_raw)
        except decimal.InvalidOperation:
            raise ConfigError(f"HOURLY_RATE must be a decimal amount like 200.00, got {rate_raw!r}") from None
        if not rate.is_finite() or rate < 0 or rate > MAX_MONEY or rate != rate.quantize(CENTS):
            raise ConfigError(f"HOURLY_RATE must be between 0.00 and {MAX_MONEY} with at most two decimals, got {rate_raw!r}")
        tz_raw = env.get("APP_TIMEZONE", "").strip() or cls.timezone.key
        try:
            tz = ZoneInfo(tz_raw)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"APP_TIMEZONE must be an IANA time zone such as America/Sao_Paulo, got {tz_raw!r}") from None
        poll_raw = env.get("BILLING_POLL_SECONDS", "").strip() or str(cls.poll_seconds)
        try:
            poll = float(poll_raw)
        except ValueError:
            poll = -1.0
        if not 0.05 <= poll <= 3600:
            raise ConfigError(f"BILLING_POLL_SECONDS must be a number of seconds from 0.05 to 3600, got {poll_raw!r}")
        level = env.get("LOG_LEVEL", "").strip().upper() or cls.log_level
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        return cls(
            database_url=env.get("DATABASE_URL", "").strip() or cls.database_url,
            appointments_port=_int(env, "APPOINTMENTS_PORT", cls.appointments_port, 1, 65535),
            billing_port=_int(env, "BILLING_PORT", cls.billing_port, 1, 65535),
            hourly_rate=rate.quantize(CENTS),
            timezone=tz,
            poll_seconds=poll,
            batch_size=_int(env, "BILLING_BATCH_SIZE", cls.batch_size, 1, 10000),
            max_attempts=_int(env, "BILLING_MAX_ATTEMPTS", cls.max_attempts, 1, 1000),
            log_level=level,
        )


def load_config_or_exit() -> Config:
    try:
        return Config.from_env()
    except ConfigError as exc:
        sys.exit(f"configuration error: {exc}")


def make_pool(config: Config, name: str, max_size: int = 10, **session: str) -> psycopg_pool.ConnectionPool:
    """A pool that is not opened yet (no I/O here); the caller opens it.

    ``check`` tests each connection before handing it out, so a PostgreSQL restart costs the
    requests in flight at that moment and nothing after. ``session`` holds server settings for
    every connection (e.g. idle_in_transaction_session_timeout).
    """
    options = " ".join(f"-c {key}={value}" for key, value in session.items())
    return psycopg_pool.ConnectionPool(
        config.database_url,
        # min < max so that a pool that gave up reconnecting after a long outage grows again.
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True, "application_name": name, "options": options, "connect_timeout": 5},
        check=psycopg_pool.ConnectionPool.check_connection,
        timeout=5,
        open=False,
        name=name,
    )


# ---------------------------------------------------------------------------------------------
# Errors: one exception type, rendered as RFC 9457 problem details in one place.


class Problem(Exception):
    """Raised anywhere a request cannot be served; becomes an application/problem+json response."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


def problem_body(status: int, detail: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "about:blank", "title": http.HTTPStatus(status).phrase, "status": status}
    if detail:
        body["detail"] = detail
    return body


def _render(resp: falcon.Response, status: int, detail: str | None, headers: Mapping[str, str] | None = None) -> None:
    resp.status = status
    resp.content_type = "application/problem+json"
    resp.text = json.dumps(problem_body(status, detail))
    for key, value in (headers or {}).items():
        resp.set_header(key, value)


def _on_problem(req, resp, ex: Problem, params) -> None:
    _render(resp, ex.status, ex.detail, ex.headers)


def _on_database_unavailable(req, resp, ex: psycopg.OperationalError, params) -> None:
    log.warning("database unavailable during %s %s: %s", req.method, req.path, ex)
    _render(resp, 503, "the database is unavailable; retry shortly", {"Retry-After": "1"})


def _on_database_not_ready(req, resp, ex: psycopg.Error, params) -> None:
    # The schema not applied yet, or a read-only server during a failover: the database is there
    # but cannot serve us, the same answer as /ready gives.
    log.error("database not ready during %s %s: %s", req.method, req.path, ex)
    _render(resp, 503, f"the database is not ready ({ex.__class__.__name__}); retry shortly", {"Retry-After": "5"})


def _serialize_http_error(req, resp, ex: falcon.HTTPError) -> None:
    # Falcon's own errors (unknown route, wrong method, invalid query parameter) look like ours.
    named = {404: f"path: nothing at {req.path}", 405: f"method: {req.method} is not allowed on {req.path}"}
    resp.content_type = "application/problem+json"
    resp.text = json.dumps(problem_body(ex.status_code, ex.description or named.get(ex.status_code, ex.title)))


def _on_unexpected(req, resp, ex: Exception, params) -> None:
    log.exception("unhandled error during %s %s", req.method, req.path)
    _render(resp, 500, "internal error; it has been logged")


# ---------------------------------------------------------------------------------------------
# Request bodies and responses.

_dumps = functools.partial(simplejson.dumps, use_decimal=True, ensure_ascii=False)


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
    """Validates request bodies against the JSON Schemas in openapi.yaml (one source of truth)."""

    def __init__(self, spec: dict[str, Any], name: str):
        schema = {**spec["components"]["schemas"][name], "components": spec["components"]}
        self._validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())

    def __call__(self, body: Any) -> dict[str, Any]:
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(body))
        if error is None:
            return body
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
    resp.text = _dumps(media)


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_uuid(value: str, field: str) -> uuid.UUID:
    """The canonical 8-4-4-4-12 spelling only, as `format: uuid` documents (uuid.UUID alone would
    also take braces, urn:uuid: and hex without hyphens)."""
    if not _UUID.fullmatch(value):
        raise Problem(400, f"{field}: must be a UUID like 84ab6121-c4a8-4684-8cc2-b03024ec0f1d, got {value!r}")
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

# Served by /ready: the tables both services use exist.
SCHEMA_PRESENT = """
SELECT to_regclass('appointments') IS NOT NULL
   AND to_regclass('billing_queue') IS NOT NULL
   AND to_regclass('billing_entries') IS NOT NULL AS ok
"""


class Health:
    """Liveness: the process answers; no database involved."""

    def on_get(self, req, resp):
        send(resp, 200, {"status": "ok"})

    on_head = on_get  # RFC 9110: HEAD wherever GET is served (Falcon drops the body)


class Ready:
    """Readiness: the database answers and the schema is there."""

    def __init__(self, pool: psycopg_pool.ConnectionPool):
        self._pool = pool

    def on_get(self, req, resp):
        with self._pool.connection(timeout=2) as conn:
            ok = conn.execute(SCHEMA_PRESENT).fetchone()[0]
        if not ok:
            raise Problem(503, "schema: tables are missing; apply schema.sql", {"Retry-After": "5"})
        send(resp, 200, {"status": "ready"})

    on_head = on_get


class OpenApi:
    def on_get(self, req, resp):
        send(resp, 200, openapi_spec())

    on_head = on_get


def base_app(pool: psycopg_pool.ConnectionPool) -> falcon.App:
    """A Falcon app with problem-details errors and the health, ready and openapi routes."""
    app = falcon.App()
    app.set_error_serializer(_serialize_http_error)
    app.add_error_handler(Exception, _on_unexpected)
    app.add_error_handler(psycopg.OperationalError, _on_database_unavailable)
    app.add_error_handler((psycopg.errors.UndefinedTable, psycopg.errors.ReadOnlySqlTransaction), _on_database_not_ready)
    app.add_error_handler(Problem, _on_problem)
    app.add_route("/health", Health())
    app.add_route("/ready", Ready(pool))
    app.add_route("/openapi.json", OpenApi())
    return app


# ---------------------------------------------------------------------------------------------
# Serving.


def _waitress_problem_response(self, ident=None):
    # Waitress answers some requests itself (a body over max_request_body_size is refused from its
    # Content-Length, before it is read); render those as problem details too, like our own errors.
    detail = f"body: over the limit of {MAX_BODY_BYTES} bytes" if self.code == 413 else self.body
    body = json.dumps(problem_body(self.code, detail))
    return f"{self.code} {self.reason}", [("Content-Type", "application/problem+json")], body.encode()


_send_continue = waitress.channel.HTTPChannel.send_continue


def _continue_unless_refused(self):
    # waitress would invite the upload (100 Continue) of a body it already refused from its
    # Content-Length, and then not answer until the body came: let the 413 go out now instead.
    if self.request.error is not None:
        self.request.expect_continue = False
        return
    _send_continue(self)


def make_server(app, port: int, host: str = "0.0.0.0", threads: int = 8):
    waitress.utilities.Error.to_response = _waitress_problem_response
    waitress.channel.HTTPChannel.send_continue = _continue_unless_refused
    # waitress compares with >=, so +1 lets a body of exactly MAX_BODY_BYTES through.
    return waitress.server.create_server(
        app, host=host, port=port, threads=threads, max_request_body_size=MAX_BODY_BYTES + 1, ident="clinic-billing"
    )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signals(callback) -> None:
    """SIGTERM (docker stop) and SIGINT (Ctrl-C) both ask for a clean stop, once."""

    received = []

    def handler(signum, frame):
        # Ctrl-C under `make run` delivers SIGINT and then SIGTERM: the second must not break the
        # shutdown the first began.
        received.append(signum)
        if len(received) == 1:
            log.info("%s received, stopping", signal.Signals(signum).name)
            callback()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def serve_in_thread(server) -> threading.Thread:
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    return thread


def apply_schema(database_url: str) -> None:
    """schema.sql as one simple-protocol query: one implicit transaction, all or nothing, and
    idempotent, so it is safe against a live database."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute((HERE / "schema.sql").read_text(encoding="utf-8"))


def setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


if __name__ == "__main__":
    # python common.py apply-schema: what `make schema` and the compose `migrate` service run.
    if sys.argv[1:] != ["apply-schema"]:
        sys.exit("usage: python common.py apply-schema   (applies schema.sql to DATABASE_URL)")
    apply_schema(load_config_or_exit().database_url)
    print("schema.sql applied")
