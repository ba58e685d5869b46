"""The functional core without a database: pricing, timestamps, the end decision, configuration."""

import datetime as dt
import uuid
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from appointments import billed_minutes, new_appointment, parse_timestamp, plan_end, price_for, start_conflicts
import db
from config import Config, ConfigError
from web import Problem, SchemaValidator, format_timestamp, openapi_spec, parse_json

RATE = Decimal("200.00")
UTC = dt.timezone.utc
SP = ZoneInfo("America/Sao_Paulo")


@pytest.mark.parametrize(
    "duration, price",
    [
        (dt.timedelta(minutes=60), "200.00"),
        (dt.timedelta(minutes=120), "400.00"),
        (dt.timedelta(minutes=90), "300.00"),
        (dt.timedelta(minutes=30), "100.00"),
        (dt.timedelta(minutes=61), "203.33"),
        (dt.timedelta(seconds=45), "3.33"),
        (dt.timedelta(0), "0.00"),
        (dt.timedelta(minutes=1, seconds=1), "6.67"),  # 2 started minutes: 6.666.. rounds half-up
    ],
)
def test_price_follows_the_rate_per_started_minute(duration, price):
    assert price_for(duration, RATE) == Decimal(price)
    assert str(price_for(duration, RATE)) == price


def test_price_rounds_half_up_to_cents():
    """0.30/h for 1 minute is 0.005, which rounds up to 0.01 (banker's rounding would give 0.00)."""
    assert price_for(dt.timedelta(minutes=1), Decimal("0.30")) == Decimal("0.01")


def test_billed_minutes_counts_every_started_minute():
    assert [billed_minutes(dt.timedelta(seconds=s)) for s in (0, 1, 59, 60, 61, 3600)] == [0, 1, 1, 1, 2, 60]


def test_negative_duration_is_refused():
    with pytest.raises(ValueError):
        billed_minutes(dt.timedelta(seconds=-1))


durations = st.integers(min_value=0, max_value=10 * 365 * 86400).map(lambda s: dt.timedelta(seconds=s))
rates = st.decimals(min_value=0, max_value=100000, places=2)


@given(durations, rates)
def test_price_is_never_negative(duration, rate):
    assert price_for(duration, rate) >= 0


@given(durations, durations, rates)
def test_price_is_monotonic_in_duration(a, b, rate):
    shorter, longer = sorted((a, b))
    assert price_for(shorter, rate) <= price_for(longer, rate)


@given(st.integers(min_value=0, max_value=24 * 365), rates)
def test_price_is_exact_on_whole_hours(hours, rate):
    assert price_for(dt.timedelta(hours=hours), rate) == rate * hours


@given(durations, rates)
def test_price_has_exactly_two_decimals(duration, rate):
    assert price_for(duration, rate).as_tuple().exponent == -2


def test_challenge_format_is_read_in_the_configured_zone():
    parsed = parse_timestamp("2020-12-01 13:00:00", SP, "start_date")
    assert parsed == dt.datetime(2020, 12, 1, 16, 0, tzinfo=UTC)


@pytest.mark.parametrize("text", ["2020-12-01T13:00:00-03:00", "2020-12-01T16:00:00Z", "2020-12-01T16:00:00+00:00"])
def test_iso_8601_with_offset_is_accepted(text):
    assert parse_timestamp(text, UTC, "start_date") == dt.datetime(2020, 12, 1, 16, 0, tzinfo=UTC)


def test_fractions_of_a_second_are_dropped():
    assert parse_timestamp("2020-12-01T16:00:00.999Z", UTC, "end_date") == dt.datetime(2020, 12, 1, 16, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "text",
    ["2020-12-01", "2020-12-01T13:00:00", "2020-13-01 13:00:00", "2020-12-01 25:00:00", "yesterday", "", "1800-01-01 00:00:00", "2020-12-01 13:00"],
)
def test_malformed_timestamps_are_a_400_naming_the_field(text):
    with pytest.raises(Problem) as info:
        parse_timestamp(text, UTC, "start_date")
    assert info.value.status == 400
    assert info.value.detail.startswith("start_date:")


def test_timestamps_are_shown_in_the_configured_zone_to_the_second():
    value = dt.datetime(2020, 12, 1, 16, 0, 5, tzinfo=UTC)
    assert format_timestamp(value, SP) == "2020-12-01 13:00:05"
    assert format_timestamp(None, SP) is None


def _open(start="2020-12-01T13:00:00Z"):
    return {"id": uuid.uuid4(), "start_date": dt.datetime.fromisoformat(start), "end_date": None, "hourly_rate": RATE}


def test_ending_an_open_appointment_prices_it():
    row = _open()
    assert plan_end(row, row["start_date"] + dt.timedelta(hours=2), now=None) == (row["start_date"] + dt.timedelta(hours=2), Decimal("400.00"))


def test_ending_without_end_date_uses_now():
    row = _open()
    now = row["start_date"] + dt.timedelta(minutes=30)
    assert plan_end(row, None, now) == (now, Decimal("100.00"))


def test_ending_before_the_start_is_422():
    row = _open()
    with pytest.raises(Problem) as info:
        plan_end(row, row["start_date"] - dt.timedelta(seconds=1), now=None)
    assert info.value.status == 422 and "end_date" in info.value.detail


def test_a_price_over_numeric_12_2_is_422():
    row = _open("1900-01-01T00:00:00Z")
    with pytest.raises(Problem) as info:
        plan_end(row, dt.datetime(9998, 1, 1, tzinfo=UTC), now=None)
    assert info.value.status == 422


def test_repeating_an_end_is_a_no_op_and_another_end_date_is_409():
    row = {**_open(), "end_date": dt.datetime(2020, 12, 1, 14, tzinfo=UTC)}
    assert plan_end(row, None, now=None) is None
    assert plan_end(row, dt.datetime(2020, 12, 1, 11, tzinfo=SP), now=None) is None  # same instant
    with pytest.raises(Problem) as info:
        plan_end(row, dt.datetime(2020, 12, 1, 15, tzinfo=UTC), now=None)
    assert info.value.status == 409


def test_a_repeated_start_matches_when_start_date_is_omitted():
    stored = {"physician_id": uuid.uuid4(), "patient_id": uuid.uuid4(), "start_date": dt.datetime(2020, 1, 1, tzinfo=UTC)}
    assert start_conflicts(stored, {**stored, "start_date": None}) == []
    assert start_conflicts(stored, {**stored, "patient_id": uuid.uuid4()}) == ["patient_id"]
    assert start_conflicts(stored, {**stored, "start_date": dt.datetime(2020, 1, 2, tzinfo=UTC)}) == ["start_date"]


def test_new_appointment_generates_an_id_when_the_client_gives_none():
    body = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}
    first, second = (new_appointment(body, UTC, RATE) for _ in range(2))
    assert first["id"] != second["id"] and first["start_date"] is None and first["hourly_rate"] == RATE


@pytest.mark.parametrize(
    "body, field",
    [
        ({"patient_id": str(uuid.uuid4())}, "physician_id"),
        ({"physician_id": "nope", "patient_id": str(uuid.uuid4())}, "physician_id"),
        ({"physician_id": str(uuid.uuid4()), "patient_id": 5}, "patient_id"),
        ({"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "colour": "red"}, "colour"),
        ({"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": 1}, "start_date"),
        ([], "body"),
    ],
)
def test_schema_errors_name_the_field(body, field):
    validate = SchemaValidator(openapi_spec(), "AppointmentStart")
    with pytest.raises(Problem) as info:
        validate(body)
    assert info.value.status == 400
    assert info.value.detail.startswith(f"{field}:"), info.value.detail


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[" * 5000, b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff\xfe{}", b'{"n": ' + b"9" * 5000 + b"}", b"Infinity"],
)
def test_hostile_json_is_a_400_not_an_exception(raw):
    with pytest.raises(Problem) as info:
        parse_json(raw)
    assert info.value.status == 400 and info.value.detail.startswith("body:")


def test_config_defaults_match_the_documentation():
    config = Config.from_env({})
    assert (config.appointments_port, config.billing_port, config.poll_seconds) == (8080, 8081, 10.0)
    assert (config.hourly_rate, str(config.timezone), config.batch_size, config.max_attempts) == (Decimal("200.00"), "UTC", 5000, 10)
    assert config.listen is True and Config.from_env({"BILLING_LISTEN": "OFF"}).listen is False
    assert config.request_timeout == 8.0 and Config.from_env({"REQUEST_TIMEOUT_SECONDS": "2.5"}).request_timeout == 2.5


@pytest.mark.parametrize(
    "name, value",
    [
        ("APPOINTMENTS_PORT", "http"),
        ("BILLING_PORT", "70000"),
        ("HOURLY_RATE", "abc"),
        ("HOURLY_RATE", "-1"),
        ("HOURLY_RATE", "1.005"),
        ("APP_TIMEZONE", "Mars/Olympus"),
        ("BILLING_POLL_SECONDS", "0"),
        ("BILLING_BATCH_SIZE", "0"),
        ("BILLING_MAX_ATTEMPTS", "x"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("BILLING_LISTEN", "no"),
        ("REQUEST_TIMEOUT_SECONDS", "0"),
        ("REQUEST_TIMEOUT_SECONDS", "nan"),
        ("REQUEST_TIMEOUT_SECONDS", "soon"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Config.from_env({name: value})


def test_a_duration_across_a_daylight_saving_change_is_real_time_not_wall_clock():
    """Sao Paulo, 2019-02-16: at midnight clocks went back to 23:00. 22:30 to the second 23:30 is
    two real hours, though both are in the same zone and the wall clock moved one."""
    row = {**_open(), "start_date": dt.datetime(2019, 2, 16, 22, 30, tzinfo=SP)}
    end = dt.datetime(2019, 2, 16, 23, 30, fold=1, tzinfo=SP)
    assert plan_end(row, end, now=None)[1] == Decimal("400.00")


def test_an_end_date_shown_in_the_repeated_hour_names_the_stored_end():
    """Both readings of a local time in the repeated hour match what the API showed."""
    stored = dt.datetime(2019, 2, 17, 2, 40, tzinfo=UTC)  # 23:40 -03:00, the second 23:40 there
    row = {**_open("2019-02-16T20:00:00Z"), "end_date": stored}
    shown = format_timestamp(stored, SP)
    assert shown == "2019-02-16 23:40:00"
    assert plan_end(row, parse_timestamp(shown, SP, "end_date"), now=None) is None


# --- keyset paging (paging.py) ---------------------------------------------------------------

import paging  # noqa: E402

POSITIONS = st.builds(paging.FeedPosition, st.integers(0, 2**64 - 1), st.uuids())
INSTANTS = st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(9998, 12, 31), timezones=st.just(UTC))


@given(POSITIONS)
def test_a_feed_cursor_gives_back_the_position_it_was_made_from(position):
    cursor = paging.feed_cursor(position)
    assert paging.parse_feed_cursor(cursor) == position
    assert len(cursor) <= 64


def test_the_start_of_the_feed_has_a_cursor_of_its_own_distinct_from_every_position():
    assert paging.parse_feed_cursor(paging.FEED_START) is None
    assert paging.feed_cursor(paging.FeedPosition(0, uuid.UUID(int=0))) != paging.FEED_START


@given(INSTANTS, st.uuids())
def test_a_listing_cursor_gives_back_its_position_to_the_microsecond_or_second(at, row_id):
    entries = paging.parse_list_cursor("entries", paging.list_cursor("entries", paging.ListPosition(at, row_id)))
    assert entries == (at, row_id)
    whole = at.replace(microsecond=0)
    appointments = paging.parse_list_cursor("appointments", paging.list_cursor("appointments", paging.ListPosition(whole, row_id)))
    assert appointments == (whole, row_id)


def test_each_listing_refuses_the_cursors_of_the_others_naming_the_parameter():
    row = paging.ListPosition(dt.datetime(2020, 12, 1, tzinfo=UTC), uuid.uuid4())
    feed = paging.feed_cursor(paging.FeedPosition(5, row.id))
    with pytest.raises(Problem, match="^before: "):
        paging.parse_list_cursor("appointments", paging.list_cursor("entries", row))
    with pytest.raises(Problem, match="^before: "):
        paging.parse_list_cursor("entries", paging.list_cursor("appointments", row))
    with pytest.raises(Problem, match="^before: "):
        paging.parse_list_cursor("entries", feed)
    with pytest.raises(Problem, match="^after: "):
        paging.parse_feed_cursor(paging.list_cursor("entries", row))


@pytest.mark.parametrize("cursor", ["", "x", "abc", "ZgAA==", "Zg AAAA", "F=", "Fg", "%00", "a" * 65, "ZgAAAAAAAALti8EbCtuJQEqr9WbJbeX8EB"])
def test_a_cursor_that_is_not_one_spelled_exactly_as_issued_is_400_naming_after(cursor):
    with pytest.raises(Problem, match="^after: ") as raised:
        paging.parse_feed_cursor(cursor)
    assert raised.value.status == 400


def test_query_parameters_unknown_or_repeated_are_400_naming_them():
    assert paging.query_params({"limit": "5"}, ("limit", "before")) == {"limit": "5"}
    with pytest.raises(Problem, match="^bogus, zz: unknown query parameter"):
        paging.query_params({"limit": "5", "zz": "1", "bogus": ""}, ("limit",))
    with pytest.raises(Problem, match="^limit: given 2 times"):
        paging.query_params({"limit": ["1", "2"]}, ("limit",))


# The rule for every listing's limit, in one place: `type: integer` from 1 to 1000, written in plain
# ASCII digits (Python's int() would also read '1_0', ' 5', '+5' and other scripts' digits). The
# listings' own tests check one bad value each, that the route applies this.
@pytest.mark.parametrize("raw", ["0", "1001", "", " 5", "5 ", "1_0", "+5", "-1", "-0", "1.5", "5.0", "1e2", "0x10", "١٢", "\u0665", "9999999"])
def test_a_limit_outside_1_to_1000_or_not_plain_digits_is_400_naming_it(raw):
    with pytest.raises(Problem, match="^limit: "):
        paging.limit_param({"limit": raw})


def test_the_next_link_is_an_rfc_8288_header_with_the_full_relative_url():
    link = paging.next_link("/appointments", {"status": "open", "limit": 2, "before": "YQ-_"})
    assert link == '</appointments?status=open&limit=2&before=YQ-_>; rel="next"'


def test_a_problem_quotes_what_was_sent_but_cuts_a_long_value_short_and_names_an_empty_parameter():
    with pytest.raises(Problem) as long_cursor:
        paging.parse_feed_cursor("a" * 4000)
    assert long_cursor.value.detail.startswith("after: 'aaaa") and "(4000 characters)" in long_cursor.value.detail
    assert len(long_cursor.value.detail) < 300
    with pytest.raises(Problem, match="^'': unknown query parameter"):
        paging.query_params({"": "1"}, ("limit",))


# --- the two validators of a request schema agree (web.SchemaValidator) -------------------------

_UUIDISH = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: "urn:uuid:" + str(u)),
    st.uuids().map(lambda u: str(u)[:-1]),
    st.uuids().map(lambda u: str(u).replace("-", "", 1) + "-"),
    st.text(alphabet="0123456789abcdefABCDEF-{}:urn", max_size=45),
)
_TIMESTAMPISH = st.one_of(
    st.datetimes().map(lambda d: d.isoformat(sep=" ", timespec="seconds")),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,7})?(Z|[+-][0-9]{2}:?[0-9]{2})?\n?", fullmatch=True),
    st.text(max_size=30),
)
_VALUES = st.one_of(_UUIDISH, _TIMESTAMPISH, st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2))
_BODIES = st.one_of(
    st.dictionaries(st.sampled_from(["id", "physician_id", "patient_id", "start_date", "end_date", "extra"]), _VALUES, max_size=5),
    st.fixed_dictionaries({"physician_id": _UUIDISH, "patient_id": _UUIDISH}, optional={"id": _UUIDISH, "start_date": _TIMESTAMPISH}),
    st.fixed_dictionaries({}, optional={"end_date": _TIMESTAMPISH}),
    _VALUES,
)


@pytest.mark.parametrize("name", ["AppointmentStart", "AppointmentEnd"])
@given(body=_BODIES)
@example(body={"end_date": "2020-12-01 13:00:00\n"})
@example(body={"physician_id": str(uuid.UUID(int=1)), "patient_id": str(uuid.UUID(int=2)), "start_date": "2020-12-01 13:00:00\n"})
def test_what_the_fast_validator_accepts_jsonschema_accepts_and_a_rejection_is_a_400(name, body):
    """The fast validator decides (web.SchemaValidator): nothing it lets through may be invalid for
    jsonschema, and every body it refuses is a 400 naming a field, also where only it refuses
    (a pattern's `$` before a final newline)."""
    import jsonschema

    validator = _VALIDATORS.setdefault(name, SchemaValidator(openapi_spec(), name))
    if validator.is_valid(body):
        assert jsonschema.exceptions.best_match(validator._validator.iter_errors(body)) is None
        assert validator(body) is body
    else:
        with pytest.raises(Problem) as refused:
            validator(body)
        assert refused.value.status == 400 and ": " in refused.value.detail


def test_a_schema_keyword_the_two_validators_read_differently_is_refused_at_start():
    spec = openapi_spec()
    schema = {**spec["components"]["schemas"]["AppointmentEnd"], "unevaluatedProperties": False}
    with pytest.raises(ValueError, match="unevaluatedProperties"):
        SchemaValidator({**spec, "components": {**spec["components"], "schemas": {**spec["components"]["schemas"], "X": schema}}}, "X")


_VALIDATORS: dict = {}


def test_money_goes_out_as_a_plain_json_number_and_a_non_finite_decimal_is_refused():
    from web import dumps

    assert dumps({"price": Decimal("400.00"), "big": Decimal("1E+2")}) == b'{"price":400.00,"big":100}'
    with pytest.raises(TypeError):
        dumps({"price": Decimal("NaN")})


def test_a_multi_host_url_is_split_into_one_attempt_per_host():
    """What DeadlineConnection.connect tries, host by host: a single port applies to every host;
    a single host is left to psycopg."""
    assert db.host_attempts("postgresql://u@a:5432,b:5433/clinic?target_session_attrs=read-write") == [
        {"host": "a", "port": "5432"}, {"host": "b", "port": "5433"},
    ]
    assert db.host_attempts("host=a,b port=6000 dbname=x") == [{"host": "a", "port": "6000"}, {"host": "b", "port": "6000"}]
    assert db.host_attempts("postgresql://u@only:5432/clinic") == []


def test_a_host_that_timed_out_is_tried_last_and_left_out_when_others_remain():
    """HostOrder: the order as written, a slow host last until it answers again; skip_slow
    leaves it out, unless it is the only one."""
    order = db.HostOrder()
    a, b = {"host": "a", "port": "1"}, {"host": "b", "port": "1"}
    assert order.order([a, b]) == [a, b]
    order.slow("a", "1")
    assert order.order([a, b]) == [b, a]
    assert order.order([a, b], skip_slow=True) == [b]
    assert order.order([a], skip_slow=True) == [a]
    order.answered("a", "1")
    assert order.order([a, b], skip_slow=True) == [a, b]


def test_within_never_extends_a_deadline_already_set_and_extend_deadline_moves_it_later():
    """A nested bound can only tighten; a long poll's wait moves the request's deadline later."""
    with db.within(10):
        outer = db._DEADLINE.get()
        with db.within(60):
            assert db._DEADLINE.get() == outer
        with db.within(1):
            assert db._DEADLINE.get() < outer
        with db.extend_deadline(5):
            assert db._DEADLINE.get() == outer + 5
    assert db._DEADLINE.get() is None
