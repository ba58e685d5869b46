"""Appointments API: start, end and list appointments; ending one queues its charge in the same transaction.

    python appointments.py        # serves on APPOINTMENTS_PORT (default 8080)
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
import uuid
from typing import Any, Iterable
from zoneinfo import ZoneInfo

import falcon
import psycopg_pool
from psycopg import sql
from psycopg.rows import dict_row

import auth
import paging
from config import CENTS, MAX_MONEY, Config, load_config_or_exit
from db import make_pool
from telemetry import ApiMetrics, get_logger, setup_logging
from web import (
    Problem,
    SchemaValidator,
    base_app,
    format_timestamp,
    make_server,
    money,
    on_stop_signals,
    openapi_spec,
    parse_uuid,
    read_json_object,
    send,
    shown,
)

log = get_logger("clinic.appointments")

# ---------------------------------------------------------------------------------------------
# Functional core: pricing, parsing and the end decision, no I/O.


def billed_minutes(duration: dt.timedelta) -> int:
    """Every started minute counts: 0 s -> 0, 1 s -> 1, 60 s -> 1, 61 s -> 2."""
    if duration < dt.timedelta(0):
        raise ValueError("duration must not be negative")
    microseconds = (duration.days * 86_400 + duration.seconds) * 1_000_000 + duration.microseconds
    return -(-microseconds // 60_000_000)


def price_for(duration: dt.timedelta, hourly_rate: decimal.Decimal) -> decimal.Decimal:
    """hourly_rate x started minutes / 60, rounded half-up to cents."""
    exact = hourly_rate * billed_minutes(duration) / 60
    return exact.quantize(CENTS, rounding=decimal.ROUND_HALF_UP)


# The same shape as the Timestamp pattern in openapi.yaml; [0-9], as \d would take any digit.
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})?")
FIRST_YEAR, LAST_YEAR = 1900, 9998


def parse_timestamp(value: str, tz: ZoneInfo, field: str) -> dt.datetime:
    """'YYYY-MM-DD HH:MM:SS' (read in tz) or ISO 8601 with an offset; kept to the whole second."""
    shape = _TIMESTAMP.fullmatch(value)
    if not shape:
        raise Problem(400, f"{field}: expected 'YYYY-MM-DD HH:MM:SS' or ISO 8601 like '2020-12-01T13:00:00-03:00', got {shown(value)}")
    if value[10] == "T" and shape.group(2) is None:
        raise Problem(400, f"{field}: an ISO 8601 time with 'T' needs an offset (Z or ±HH:MM), got {value!r}")
    try:
        parsed = dt.datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=tz)
        if not FIRST_YEAR <= parsed.astimezone(dt.timezone.utc).year <= LAST_YEAR:
            raise ValueError(f"year outside {FIRST_YEAR}..{LAST_YEAR}")
    except (ValueError, OverflowError) as exc:
        raise Problem(400, f"{field}: not a valid date and time ({exc}), got {value!r}") from None
    return parsed.replace(microsecond=0)


def new_appointment(body: dict[str, Any], tz: ZoneInfo, hourly_rate: decimal.Decimal) -> dict[str, Any]:
    """A validated start request (body already matched the AppointmentStart schema)."""
    start = body.get("start_date")
    return {
        "id": parse_uuid(body["id"], "id") if "id" in body else uuid.uuid4(),
        "physician_id": parse_uuid(body["physician_id"], "physician_id"),
        "patient_id": parse_uuid(body["patient_id"], "patient_id"),
        "start_date": None if start is None else parse_timestamp(start, tz, "start_date"),
        "hourly_rate": hourly_rate,
    }


def start_conflicts(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """The fields of a repeated start that differ from the stored appointment."""
    differs = [field for field in ("physician_id", "patient_id") if stored[field] != requested[field]]
    if requested["start_date"] is not None and not same_instant(stored["start_date"], requested["start_date"]):
        differs.append("start_date")
    return differs


def utc(value: dt.datetime) -> dt.datetime:
    # Arithmetic and comparisons in UTC only: between two datetimes of the same ZoneInfo, Python
    # compares and subtracts wall-clock times, which is wrong across a daylight-saving change.
    return value.astimezone(dt.timezone.utc)


def same_instant(stored: dt.datetime, requested: dt.datetime) -> bool:
    """Whether a requested time names the stored one. A local time in the hour that a
    daylight-saving change shows twice may mean either instant (the API shows both the same way)."""
    return any(utc(requested.replace(fold=fold)) == utc(stored) for fold in (0, 1))


def plan_end(row: dict[str, Any], requested: dt.datetime | None, now: dt.datetime) -> tuple[dt.datetime, decimal.Decimal] | None:
    """What ending this appointment means: (end_date, price), or None when it already ended so.

    Raises Problem 409 for a different end_date on an ended appointment, 422 for one before start.
    """
    if row["end_date"] is not None:
        if requested is None or same_instant(row["end_date"], requested):
            return None
        raise Problem(409, f"end_date: appointment {row['id']} already ended at {row['end_date'].isoformat()}; a different end_date cannot be applied")
    end, start = utc(now if requested is None else requested), utc(row["start_date"])
    if end < start:
        raise Problem(422, f"end_date: {end.isoformat()} is before start_date {start.isoformat()}")
    price = price_for(end - start, row["hourly_rate"])
    if price > MAX_MONEY:
        raise Problem(422, f"end_date: the appointment would cost {price}, over the maximum of {MAX_MONEY}")
    return end, price


LIST_PARAMS = ("physician_id", "patient_id", "status", "limit", "before")
STATUSES = ("open", "ended")


def parse_listing(params: dict[str, str]) -> dict[str, Any]:
    """GET /appointments's query, validated: Problem 400 names an unknown or malformed parameter."""
    params = paging.query_params(params, LIST_PARAMS)
    status = params.get("status")
    if status is not None and status not in STATUSES:
        raise Problem(400, f"status: must be one of {', '.join(STATUSES)}, got {shown(status)}")
    return {
        "physician_id": parse_uuid(params["physician_id"], "physician_id") if "physician_id" in params else None,
        "patient_id": parse_uuid(params["patient_id"], "patient_id") if "patient_id" in params else None,
        "status": status,
        "limit": paging.limit_param(params),
        "before": paging.parse_list_cursor("appointments", params["before"]) if "before" in params else None,
    }


def next_page_params(listing: dict[str, Any], last: dict[str, Any]) -> dict[str, str]:
    """The query of the page after the one that ended with ``last``: the same filters, a new cursor."""
    params = {name: str(listing[name]) for name in ("physician_id", "patient_id", "status") if listing[name] is not None}
    cursor = paging.list_cursor("appointments", paging.ListPosition(last["start_date"], last["id"]))
    return {**params, "limit": str(listing["limit"]), "before": cursor}


def representation(row: dict[str, Any], tz: ZoneInfo) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "start_date": format_timestamp(row["start_date"], tz),
        "end_date": format_timestamp(row["end_date"], tz),
        "physician_id": str(row["physician_id"]),
        "patient_id": str(row["patient_id"]),
        "price": money(row["price"]),
        "billing_status": row["billing_status"],
    }


# ---------------------------------------------------------------------------------------------
# Storage: each statement is its own short transaction (autocommit); none holds a lock across
# Python code.

INSERT_APPOINTMENT = """
INSERT INTO appointments (id, physician_id, patient_id, start_date, hourly_rate)
VALUES (%(id)s, %(physician_id)s, %(patient_id)s,
        coalesce(%(start_date)s, date_trunc('second', now())), %(hourly_rate)s)
ON CONFLICT (id) DO NOTHING
RETURNING id, start_date, end_date, physician_id, patient_id, price, NULL::text AS billing_status
"""

SELECT_APPOINTMENT = """
SELECT a.id, a.start_date, a.end_date, a.physician_id, a.patient_id, a.price,
       q.status AS billing_status
FROM appointments a
LEFT JOIN billing_queue q ON q.appointment_id = a.id
WHERE a.id = %(id)s
"""

# The appointment as an end finds it, with the database's clock for an end without end_date. Read
# without a lock: END_AND_QUEUE_CHARGE applies the end only if the appointment is still open
# then, and a concurrent end that came first is read again (AppointmentStore.end).
SELECT_FOR_END = """
SELECT a.id, a.start_date, a.end_date, a.physician_id, a.patient_id, a.price, a.hourly_rate,
       NULL::text AS billing_status, date_trunc('second', now()) AS now
FROM appointments a
WHERE a.id = %(id)s
"""

END_ATTEMPTS = 3

# The end and its pending charge in one statement, so one transaction (autocommit: the statement
# is its own). `end_date IS NULL` is re-checked on the row's latest version once its lock is
# held, so of concurrent ends exactly one updates the row and queues the charge; the others get
# no row back. NOTIFY wakes the worker at commit (and is dropped with a rollback, like the rest).
# The request id goes with the charge so that the worker's log lines for it carry the id of the
# request that ended the appointment.
END_AND_QUEUE_CHARGE = """
WITH ended AS (
    UPDATE appointments SET end_date = %(end_date)s, price = %(price)s
    WHERE id = %(id)s AND end_date IS NULL
    RETURNING id, price
), queued AS (
    INSERT INTO billing_queue (appointment_id, total_price, request_id)
    SELECT id, price, %(request_id)s FROM ended
    RETURNING appointment_id
)
SELECT pg_notify('billing_queue', appointment_id::text) FROM queued
"""


# GET /appointments: newest first by start_date, ties broken by id, one more row than the page
# shows (there is a next page when it comes). The WHERE clause is made of LIST_FILTERS, one per
# filter given, so each combination is its own statement with its own plan: schema.sql has an
# index for each filter (appointments_newest, _by_physician, _by_patient, _open, _ended), read backwards
# from the cursor (keyset: page 500 costs what page 1 costs). For a physician or patient with a
# large share of all rows the planner may walk appointments_newest with a filter instead, at the
# same cost; a set smaller than a page may be fetched by bitmap and sorted (tests/test_listings.py).
LIST_APPOINTMENTS = """
SELECT a.id, a.start_date, a.end_date, a.physician_id, a.patient_id, a.price,
       q.status AS billing_status
FROM appointments a
LEFT JOIN billing_queue q ON q.appointment_id = a.id
WHERE {filters}
ORDER BY a.start_date DESC, a.id DESC
LIMIT %(limit)s
"""

LIST_FILTERS = {
    "physician_id": "a.physician_id = %(physician_id)s",
    "patient_id": "a.patient_id = %(patient_id)s",
    "open": "a.end_date IS NULL",
    "ended": "a.end_date IS NOT NULL",
    "before": "(a.start_date, a.id) < (%(before_at)s, %(before_id)s)",
}


def list_query(filters: Iterable[str]) -> sql.Composed:
    """LIST_APPOINTMENTS for the given LIST_FILTERS names (fixed SQL only, never a value)."""
    where = [sql.SQL(LIST_FILTERS[name]) for name in filters] or [sql.SQL("TRUE")]
    return sql.SQL(LIST_APPOINTMENTS).format(filters=sql.SQL(" AND ").join(where))


class AppointmentStore:
    def __init__(self, pool: psycopg_pool.ConnectionPool):
        self._pool = pool

    def get(self, appointment_id: uuid.UUID) -> dict[str, Any]:
        with self._pool.connection() as conn:
            row = conn.cursor(row_factory=dict_row).execute(SELECT_APPOINTMENT, {"id": appointment_id}).fetchone()
        if row is None:
            raise Problem(404, f"appointment_id: no appointment {appointment_id}")
        return row

    def list(self, listing: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of a listing (see parse_listing), newest first: limit + 1 of them at most."""
        filters = [name for name in ("physician_id", "patient_id", "before") if listing.get(name) is not None]
        if listing.get("status"):
            filters.append(listing["status"])
        before = listing.get("before")
        args = {
            "physician_id": listing.get("physician_id"),
            "patient_id": listing.get("patient_id"),
            "before_at": before and before.at,
            "before_id": before and before.id,
            "limit": listing["limit"] + 1,
        }
        with self._pool.connection() as conn:
            return conn.cursor(row_factory=dict_row).execute(list_query(filters), args).fetchall()

    def start(self, new: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """(created, row); a repeat of the same start returns the stored row.

        One statement, no explicit transaction: one round trip. When it inserts nothing, the
        appointment exists (committed: ON CONFLICT waits for a concurrent insert of the same id
        to end, and appointments are never deleted), and is read back.
        """
        with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(INSERT_APPOINTMENT, new).fetchone()
            if row is not None:
                return True, row
            stored = cur.execute(SELECT_APPOINTMENT, new).fetchone()
        differs = start_conflicts(stored, new)
        if differs:
            raise Problem(409, f"id: appointment {new['id']} already exists with another {', '.join(differs)}")
        return False, stored

    def end(self, appointment_id: uuid.UUID, requested: dt.datetime | None, request_id: str) -> tuple[bool, dict[str, Any]]:
        """(ended now, row); a repeat of the same end returns the stored row.

        Optimistic: read (SELECT_FOR_END), decide (plan_end), then apply only if the appointment
        is still open (END_AND_QUEUE_CHARGE), each statement its own transaction: two round trips
        and no row lock held between them. When a concurrent end came first, the decision is made
        again against what it stored: the same end is a repeat, another is a 409.
        """
        with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            for _ in range(END_ATTEMPTS):
                row = cur.execute(SELECT_FOR_END, {"id": appointment_id}).fetchone()
                if row is None:
                    raise Problem(404, f"appointment_id: no appointment {appointment_id}")
                plan = plan_end(row, requested, row["now"])
                if plan is None:
                    return False, cur.execute(SELECT_APPOINTMENT, {"id": appointment_id}).fetchone()
                end_date, price = plan
                args = {"id": appointment_id, "end_date": end_date, "price": price, "request_id": request_id}
                if cur.execute(END_AND_QUEUE_CHARGE, args).fetchone() is not None:
                    return True, {**row, "end_date": end_date, "price": price, "billing_status": "pending"}
                # Ended by a concurrent request between the two statements: decide again. Once is
                # enough (an ended appointment stays ended); the bound keeps a surprise (a trigger
                # or policy that drops the update) from spinning a thread.
        log.error("end_not_applied", appointment_id=str(appointment_id), attempts=END_ATTEMPTS)
        raise Problem(503, f"appointment_id: the end of {appointment_id} could not be applied; retry", {"Retry-After": "1"})


# ---------------------------------------------------------------------------------------------
# HTTP: one resource per URL, each handler a few lines.


class Appointments:
    """/appointments"""

    def __init__(self, store: AppointmentStore, config: Config, metrics: ApiMetrics):
        self._store, self._config, self._metrics = store, config, metrics
        self._validate = SchemaValidator(openapi_spec(), "AppointmentStart")

    def on_get(self, req, resp):
        listing = parse_listing(req.params)
        rows = self._store.list(listing)
        if len(rows) > listing["limit"]:
            rows = rows[: listing["limit"]]
            resp.set_header("Link", paging.next_link(req.path, next_page_params(listing, rows[-1])))
        send(resp, 200, [representation(row, self._config.timezone) for row in rows])

    on_head = on_get

    def on_post(self, req, resp):
        new = new_appointment(read_json_object(req, self._validate), self._config.timezone, self._config.hourly_rate)
        created, row = self._store.start(new)
        if created:
            self._metrics.appointments_started.inc()
        send(resp, 201 if created else 200, representation(row, self._config.timezone))
        resp.location = f"/appointments/{row['id']}"


class Appointment:
    """/appointments/{appointment_id}"""

    def __init__(self, store: AppointmentStore, config: Config):
        self._store, self._config = store, config

    def on_get(self, req, resp, appointment_id):
        row = self._store.get(parse_uuid(appointment_id, "appointment_id"))
        send(resp, 200, representation(row, self._config.timezone))

    on_head = on_get


class AppointmentEnd:
    """/appointments/{appointment_id}/end"""

    def __init__(self, store: AppointmentStore, config: Config, metrics: ApiMetrics):
        self._store, self._config, self._metrics = store, config, metrics
        self._validate = SchemaValidator(openapi_spec(), "AppointmentEnd")

    def on_post(self, req, resp, appointment_id):
        appointment_id = parse_uuid(appointment_id, "appointment_id")
        body = read_json_object(req, self._validate, optional=True)
        end = body.get("end_date")
        requested = None if end is None else parse_timestamp(end, self._config.timezone, "end_date")
        ended, row = self._store.end(appointment_id, requested, req.context.request_id)
        if ended:
            self._metrics.appointments_ended.inc()
        send(resp, 200, representation(row, self._config.timezone))


def create_app(config: Config, pool: psycopg_pool.ConnectionPool, metrics: ApiMetrics | None = None) -> falcon.App:
    metrics = metrics or ApiMetrics(pool)
    store = AppointmentStore(pool)
    app = base_app(pool, metrics, auth.guards(config.api_token_hashes), config.request_timeout)
    app.add_route("/appointments", Appointments(store, config, metrics))
    app.add_route("/appointments/{appointment_id}", Appointment(store, config))
    app.add_route("/appointments/{appointment_id}/end", AppointmentEnd(store, config, metrics))
    return app


def main() -> None:
    def stop():
        raise KeyboardInterrupt  # inside server.run(): waitress finishes the requests in flight

    try:
        on_stop_signals(stop)  # first, so that even a SIGTERM during start-up exits cleanly
        config = load_config_or_exit()
        setup_logging("appointments", config.log_level, config.log_format)
        auth.warn_if_open(log, config.api_token_hashes)
        pool = make_pool(config, "appointments")
        try:
            pool.open(wait=False)  # serve /health and 503s while the database is still coming up
            server = make_server(create_app(config, pool), config.appointments_port)
            log.info("appointments_api_up", port=config.appointments_port)
            server.run()
        finally:
            pool.close()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
