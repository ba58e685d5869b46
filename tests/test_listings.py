"""Listings by keyset: GET /appointments (filters, Link paging, 400s) and GET /billing-entries,
the cursors each refuses, and the plans behind "a deep page costs what the first one does".

The plan and buffer tests load 150,000 appointments once for the module (about 6 s) and print
their plans: `pytest tests/test_listings.py -s -k "index or combinations or deep_page"` shows them.
"""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
import uuid
from typing import Any, NamedTuple

import falcon.testing
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

import appointments
import billing_worker
import ledger
import paging
from config import Config
from db import make_pool
from support import (
    LISTINGS_BATCH, LISTINGS_OPEN, as_role, assert_problem, create_database, drop_database, load_listings, make_backlog,
    wait_until,
)

NEXT = re.compile(r'<(?P<url>[^<>]+)>; rel="next"')


# ---------------------------------------------------------------------------------------------
# Helpers: follow the Link headers, and what the listings must hold, computed without the API.


class Page(NamedTuple):
    items: list[dict[str, Any]]
    link: str | None  # the URL of the next page, from the Link header


def follow(client: falcon.testing.TestClient, path: str, params: dict[str, Any], max_pages: int = 500) -> list[Page]:
    """Every page of a listing, from the first through each Link until a page comes without one."""
    url: str | None = path + "?" + urllib.parse.urlencode(params)
    pages: list[Page] = []
    while url is not None:
        target = urllib.parse.urlsplit(url)
        result = client.simulate_get(target.path, query_string=target.query)
        assert result.status_code == 200, result.text
        header = result.headers.get("Link")
        if header is None:
            url = None
        else:
            match = NEXT.fullmatch(header)
            assert match, f"not a Link to the next page: {header!r}"
            url = match["url"]
            assert url.startswith(path + "?"), f"not a full relative URL of {path}: {url!r}"
        pages.append(Page(result.json, url))
        assert len(pages) <= max_pages, "the Links never end"
    return pages


def link_query(url: str) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True)


def newest_first(rows: list[dict[str, Any]], at: str, key: str) -> list[str]:
    """The ids of rows in the listings' order, computed in Python: ``at`` DESC, then ``key`` DESC
    (uuid.UUID orders by its 128-bit value, as PostgreSQL orders uuid: byte by byte)."""
    return [str(row[key]) for row in sorted(rows, key=lambda row: (row[at], row[key]), reverse=True)]


def all_appointments(db) -> list[dict[str, Any]]:
    return db.execute("SELECT id, physician_id, patient_id, start_date, end_date FROM appointments").fetchall()


def released(client, params: dict[str, Any], count: int) -> dict[str, Any] | None:
    """A page of the change feed when it holds ``count`` entries, else None (not released yet)."""
    result = client.simulate_get("/billing-entries/changes", params=params)
    assert result.status_code == 200, result.text
    assert len(result.json["entries"]) <= count, result.json
    return result.json if len(result.json["entries"]) == count else None


def problem_detail(result) -> str:
    assert "Link" not in result.headers
    return assert_problem(result, 400)["detail"]


# ---------------------------------------------------------------------------------------------
# GET /appointments: every row once, in order, across ties and page boundaries.


@pytest.fixture
def tied_appointments(make_appointment, biller):
    """63 appointments: 30 share one start_date (so it spans several pages), the others around
    it, some of them with ties of two; open, pending and billed ones mixed."""
    shared = "2021-03-01 10:00:00"
    starts = [shared] * 30
    starts += [f"2021-02-{day:02d} 09:00:00" for day in range(1, 15)]  # 14 older, one each
    starts += [f"2021-04-{day:02d} 09:00:00" for day in range(1, 11) for _ in range(2)][:19]  # newer, in twos
    made = []
    for i, start in enumerate(starts):
        end = None if i % 5 == 0 else start[:11] + "11:30:00"
        made.append(make_appointment(start=start, end=end))
        if i == 40:
            biller.drain()  # those ended so far are billed, the later ones stay pending
    assert len(made) == 63
    return made


@pytest.mark.parametrize("limit", [7, 10])
def test_following_links_lists_every_appointment_once_newest_first_across_tied_start_dates(api, db, tied_appointments, limit):
    """63 rows, 30 on one start_date: the Links give each once, by start_date then id, newest
    first; each full page but the last has a Link, the last (full at 7, 3 rows at 10) none."""
    pages = follow(api, "/appointments", {"limit": limit})
    listed = [item["id"] for page in pages for item in page.items]
    assert listed == newest_first(all_appointments(db), "start_date", "id")
    assert len(set(listed)) == len(listed) == 63
    assert [len(page.items) for page in pages] == [limit] * (63 // limit) + ([63 % limit] if 63 % limit else [])
    assert [page.link is None for page in pages] == [False] * (len(pages) - 1) + [True]
    for page in pages[:-1]:
        query = link_query(page.link)
        assert query.keys() == {"limit", "before"} and query["limit"] == [str(limit)]
    # The shared start_date crosses page boundaries: a page ends inside the tie and the next goes on.
    boundaries = [(a.items[-1]["start_date"], b.items[0]["start_date"]) for a, b in zip(pages, pages[1:])]
    assert ("2021-03-01 10:00:00", "2021-03-01 10:00:00") in boundaries
    # Each item is the appointment as GET /appointments/{id} shows it (billing_status included).
    for item in (item for page in pages for item in page.items):
        assert item == api.simulate_get(f"/appointments/{item['id']}").json
    statuses = {item["billing_status"] for page in pages for item in page.items}
    assert statuses == {None, "pending", "billed"}


def test_paging_reaches_across_the_whole_date_range_the_api_takes(api, db, make_appointment):
    """Cursors carry start_date in whole seconds since 1970, signed: pages of one row walk from
    9998 down to 1900, through ties on either side of 1970."""
    for start in ("9998-12-31 23:59:59", "1970-01-01 00:00:00", "1970-01-01 00:00:00", "1969-12-31 23:59:59",
                  "1969-12-31 23:59:59", "1900-01-01 00:00:00", "1900-01-01 00:00:00"):
        make_appointment(start=start)
    pages = follow(api, "/appointments", {"limit": 1})
    assert [item["id"] for page in pages for item in page.items] == newest_first(all_appointments(db), "start_date", "id")
    assert [page.items[0]["start_date"][:4] for page in pages] == ["9998", "1970", "1970", "1969", "1969", "1900", "1900"]


def test_the_default_page_is_100_and_an_empty_listing_is_an_empty_array(api, db):
    """No rows: [] and no Link; 101 rows: 100 then 1, the Link carrying limit=100."""
    empty = api.simulate_get("/appointments")
    assert empty.status_code == 200 and empty.json == [] and "Link" not in empty.headers
    db.execute(
        """INSERT INTO appointments (id, physician_id, patient_id, start_date, hourly_rate)
           SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), timestamptz '2021-01-01 00:00:00+00', 200.00
           FROM generate_series(1, 101)"""
    )
    pages = follow(api, "/appointments", {})
    assert [len(page.items) for page in pages] == [100, 1]
    assert link_query(pages[0].link)["limit"] == ["100"]
    assert [item["id"] for page in pages for item in page.items] == newest_first(all_appointments(db), "start_date", "id")


def test_head_answers_like_get_with_the_same_link_and_no_body(api, tied_appointments):
    """HEAD /appointments is served: 200, the same Link as GET, no body."""
    got = api.simulate_get("/appointments", params={"limit": 5, "status": "ended"})
    head = api.simulate_head("/appointments", params={"limit": 5, "status": "ended"})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Link"] == got.headers["Link"]


# ---------------------------------------------------------------------------------------------
# Filters: each and combined, exactly the matching rows, paged through Links that keep them.

PHYSICIANS = [uuid.UUID(int=0xA0 + i) for i in range(3)]
PATIENTS = [uuid.UUID(int=0xB0 + i) for i in range(3)]
TIED_STARTS = ["2021-05-01 08:00:00", "2021-05-01 09:00:00", "2021-05-02 08:00:00", "2021-05-03 08:00:00"]


@pytest.fixture
def clinic(make_appointment):
    """72 appointments: 3 physicians x 3 patients, 4 start dates (so ties everywhere), open and ended."""
    for i in range(72):
        start = TIED_STARTS[i % 4]
        make_appointment(
            start=start,
            end=None if i % 2 == 0 else start[:11] + "10:00:00",
            physician_id=str(PHYSICIANS[i % 3]),
            patient_id=str(PATIENTS[(i // 4) % 3]),
        )


FILTERS = {
    "physician": {"physician_id": PHYSICIANS[0]},
    "patient": {"patient_id": PATIENTS[1]},
    "open": {"status": "open"},
    "ended": {"status": "ended"},
    "physician+open": {"physician_id": PHYSICIANS[1], "status": "open"},
    "patient+ended": {"patient_id": PATIENTS[2], "status": "ended"},
    "physician+patient": {"physician_id": PHYSICIANS[2], "patient_id": PATIENTS[0]},
    "physician+patient+ended": {"physician_id": PHYSICIANS[0], "patient_id": PATIENTS[0], "status": "ended"},
}


def matches(row: dict[str, Any], wanted: dict[str, Any]) -> bool:
    if "physician_id" in wanted and row["physician_id"] != wanted["physician_id"]:
        return False
    if "patient_id" in wanted and row["patient_id"] != wanted["patient_id"]:
        return False
    status = wanted.get("status")
    return status is None or (row["end_date"] is None) == (status == "open")


@pytest.mark.parametrize("wanted", FILTERS.values(), ids=FILTERS.keys())
def test_each_filter_and_combination_lists_exactly_its_rows_through_links_that_keep_it(api, db, clinic, wanted):
    """The pages hold exactly the matching rows (computed in Python from a plain SELECT), newest
    first, each once; every Link carries the same filters, the limit and a cursor."""
    expected = newest_first([row for row in all_appointments(db) if matches(row, wanted)], "start_date", "id")
    limit = 2
    assert len(expected) > 2 * limit, "the fixture should give this filter several pages"
    params = {name: str(value) for name, value in wanted.items()}
    pages = follow(api, "/appointments", {**params, "limit": limit})
    assert [item["id"] for page in pages for item in page.items] == expected
    assert pages[-1].link is None and all(page.link for page in pages[:-1])
    for page in pages[:-1]:
        query = link_query(page.link)
        assert {name: values for name, values in query.items() if name != "before"} == {
            **{name: [value] for name, value in params.items()},
            "limit": [str(limit)],
        }
        assert len(query["before"]) == 1
    for item in (item for page in pages for item in page.items):
        assert matches({**item, **{k: uuid.UUID(item[k]) for k in ("physician_id", "patient_id")}}, wanted)


def test_a_filter_nobody_matches_is_an_empty_array_without_link(api, clinic):
    """An unknown physician's open appointments: 200 [] (not 404), no Link."""
    result = api.simulate_get("/appointments", params={"physician_id": str(uuid.uuid4()), "status": "open"})
    assert result.status_code == 200 and result.json == [] and "Link" not in result.headers


# ---------------------------------------------------------------------------------------------
# Cursors: each listing takes only its own.


class Readonly(NamedTuple):
    api: falcon.testing.TestClient
    billing_api: falcon.testing.TestClient
    cursors: dict[str, str]  # a real cursor of each kind, as the services hand them out


@pytest.fixture(scope="module")
def readonly(admin_url, template_db):
    """One database for the tests that only read (the 400s and the cursors), so that each of them
    does not pay for a fresh copy: three appointments, ended and billed, and a cursor of each kind."""
    name = f"clinic_test_readonly_{uuid.uuid4().hex[:8]}"
    url = create_database(admin_url, name, template=template_db)
    config = Config(database_url=url, batch_size=50)
    pool = make_pool(config, "tests-readonly")
    try:
        with pool:
            api = falcon.testing.TestClient(appointments.create_app(config, pool))
            billing_api = falcon.testing.TestClient(ledger.create_app(config, pool))
            for hour in (10, 11, 12):
                body = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": f"2021-06-01 {hour}:00:00"}
                created = api.simulate_post("/appointments", json=body)
                assert created.status_code == 201, created.text
                ended = api.simulate_post(f"/appointments/{created.json['id']}/end", json={"end_date": f"2021-06-01 {hour}:30:00"})
                assert ended.status_code == 200, ended.text
            assert billing_worker.Biller(pool, config.batch_size, config.max_attempts).drain().billed == 3
            appointments_link = api.simulate_get("/appointments", params={"limit": 1}).headers["Link"]
            entries_link = billing_api.simulate_get("/billing-entries", params={"limit": 1}).headers["Link"]
            # The feed hands out an entry once every older transaction of the server has ended
            # (another test run may hold one for a moment).
            changes = wait_until(lambda: released(billing_api, {"limit": 1}, 1), 10, what="the entries past the feed's horizon")
            yield Readonly(api, billing_api, {
                "appointments": link_query(NEXT.fullmatch(appointments_link)["url"])["before"][0],
                "entries": link_query(NEXT.fullmatch(entries_link)["url"])["before"][0],
                "feed": changes["cursor"],
                "feed_start": paging.FEED_START,
            })
    finally:
        drop_database(admin_url, name)


BAD_LISTINGS = {
    "physician_id not a UUID": ("physician_id=not-a-uuid", "physician_id"),
    "physician_id without hyphens": (f"physician_id={uuid.UUID(int=7).hex}", "physician_id"),
    "physician_id empty": ("physician_id=", "physician_id"),
    "patient_id not a UUID": ("patient_id=12345", "patient_id"),
    "status closed": ("status=closed", "status"),
    "status in capitals": ("status=OPEN", "status"),
    "status empty": ("status=", "status"),
    "limit 1001 (the rule: test_core)": ("limit=1001", "limit"),
    "before garbage": ("before=garbage", "before"),
    "before empty": ("before=", "before"),
    "before not base64url": ("before=%21%21%21%21", "before"),
    "unknown parameter": ("bogus=1", "bogus"),
    "unknown beside good ones": ("status=open&physcian_id=x", "physcian_id"),
    "status repeated": ("status=open&status=ended", "status"),
    "limit repeated, even with one value": ("limit=5&limit=5", "limit"),
    "physician_id repeated": (f"physician_id={PHYSICIANS[0]}&physician_id={PHYSICIANS[1]}", "physician_id"),
}


@pytest.mark.parametrize("query, name", BAD_LISTINGS.values(), ids=BAD_LISTINGS.keys())
def test_a_malformed_listing_is_400_naming_the_parameter(readonly, query, name):
    """A problem+json 400 whose detail starts with the parameter's name, and no Link."""
    detail = problem_detail(readonly.api.simulate_get("/appointments", query_string=query))
    assert detail.startswith(f"{name}: "), detail


def test_an_unknown_parameter_is_called_so(readonly):
    """The detail says what is wrong with it: unknown, or given twice."""
    api = readonly.api
    assert problem_detail(api.simulate_get("/appointments", query_string="bogus=1")).startswith("bogus: unknown query parameter")
    assert problem_detail(api.simulate_get("/appointments", query_string="status=open&status=ended")).startswith("status: given 2 times")


# (route, parameter, kind of cursor it takes) x every kind it must refuse.
CURSOR_HOMES = [("/appointments", "before", "appointments"), ("/billing-entries", "before", "entries"), ("/billing-entries/changes", "after", "feed")]


@pytest.mark.parametrize(
    "route, name, foreign",
    [
        (route, name, kind)
        for route, name, own in CURSOR_HOMES
        for kind in ("appointments", "entries", "feed", "feed_start")
        if kind != own and not (own == "feed" and kind == "feed_start")
    ],
)
def test_a_cursor_is_refused_by_every_listing_but_its_own(readonly, route, name, foreign):
    """An /appointments cursor is no /billing-entries cursor, nor a feed's, and so on: 400 naming the parameter."""
    client = readonly.api if route == "/appointments" else readonly.billing_api
    detail = problem_detail(client.simulate_get(route, params={name: readonly.cursors[foreign]}))
    assert detail.startswith(f"{name}: "), detail


@pytest.mark.parametrize("route, name, own", CURSOR_HOMES)
def test_each_issued_cursor_is_taken_by_its_own_listing(readonly, route, name, own):
    """The control of the test above: the same requests with the right cursor are 200, and the
    page after the newest of the three is the other two."""
    client = readonly.api if route == "/appointments" else readonly.billing_api
    result = client.simulate_get(route, params={name: readonly.cursors[own]})
    assert result.status_code == 200, result.text
    assert len(result.json["entries"] if own == "feed" else result.json) == 2


def test_a_cursor_in_another_spelling_is_refused(readonly):
    """Only the canonical spelling: padded, or with its last character's spare bits set, is 400."""
    api, cursor = readonly.api, readonly.cursors["appointments"]
    assert api.simulate_get("/appointments", params={"before": cursor}).status_code == 200
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twisted = cursor[:-1] + alphabet[alphabet.index(cursor[-1]) ^ 1]  # decodes to the same bytes
    for other in (cursor + "=", cursor + "==", twisted, cursor[:-1], cursor + "A"):
        detail = problem_detail(api.simulate_get("/appointments", params={"before": other}))
        assert detail.startswith("before: "), (other, detail)


@pytest.mark.parametrize("at", [dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc),
                                dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc)], ids=["year 1", "1970", "year 9999"])
def test_a_forged_cursor_at_the_ends_of_time_is_answered_not_a_500(readonly, at):
    """Cursors are opaque, not secret: one made by hand for any instant Python can hold is a plain
    position, answered 200 with the rows before it (all three, or none)."""
    position = paging.ListPosition(at, uuid.UUID(int=0))
    expected = 3 if at.year == 9999 else 0  # the rows are from 2021 (appointments) and today (entries)
    for client, route, kind in ((readonly.api, "/appointments", "appointments"), (readonly.billing_api, "/billing-entries", "entries")):
        result = client.simulate_get(route, params={"before": paging.list_cursor(kind, position)})
        assert result.status_code == 200, result.text
        assert len(result.json) == expected


# ---------------------------------------------------------------------------------------------
# GET /billing-entries: the same paging, where ties on created_at are the normal case.


@pytest.fixture
def ledger_rows(db, biller, config):
    """130 entries billed in batches of 50: three created_at values, each shared by its batch."""
    make_backlog(db, 130)
    assert biller.drain().billed == 130
    rows = db.execute("SELECT appointment_id, created_at FROM billing_entries").fetchall()
    assert len({row["created_at"] for row in rows}) == 3 and config.batch_size == 50
    return rows


@pytest.mark.parametrize("limit", [7, 13])
def test_following_links_lists_every_billing_entry_once_newest_first_across_shared_created_at(billing_api, ledger_rows, limit):
    """Entries by created_at then appointment_id, newest first, each once; batches span pages."""
    pages = follow(billing_api, "/billing-entries", {"limit": limit})
    listed = [item["appointment_id"] for page in pages for item in page.items]
    assert listed == newest_first(ledger_rows, "created_at", "appointment_id")
    assert len(set(listed)) == len(listed) == 130
    assert [len(page.items) for page in pages] == [limit] * (130 // limit) + ([130 % limit] if 130 % limit else [])
    assert pages[-1].link is None and all(page.link for page in pages[:-1])
    for page in pages[:-1]:
        query = link_query(page.link)
        assert query.keys() == {"limit", "before"} and query["limit"] == [str(limit)]
    for item in (item for page in pages for item in page.items):
        assert item == billing_api.simulate_get(f"/billing-entries/{item['appointment_id']}").json


def test_billing_entries_limit_is_unchanged_newest_first_default_100(billing_api, ledger_rows):
    """Without limit: the newest 100 and a Link with limit=100; limit=130 (all, exactly) or 1000: no Link."""
    expected = newest_first(ledger_rows, "created_at", "appointment_id")
    default = billing_api.simulate_get("/billing-entries")
    assert default.status_code == 200 and isinstance(default.json, list)
    assert [item["appointment_id"] for item in default.json] == expected[:100]
    assert link_query(NEXT.fullmatch(default.headers["Link"])["url"])["limit"] == ["100"]
    for limit in (130, 1000):
        result = billing_api.simulate_get("/billing-entries", params={"limit": limit})
        assert [item["appointment_id"] for item in result.json] == expected and "Link" not in result.headers
    few = billing_api.simulate_get("/billing-entries", params={"limit": 3})
    assert [item["appointment_id"] for item in few.json] == expected[:3]


BAD_ENTRY_LISTINGS = {
    "limit 0 (the rule: test_core)": ("limit=0", "limit"),
    "before garbage": ("before=garbage", "before"),
    "before repeated": ("before=a&before=b", "before"),
    "an /appointments filter": ("status=open", "status"),
}


@pytest.mark.parametrize("query, name", BAD_ENTRY_LISTINGS.values(), ids=BAD_ENTRY_LISTINGS.keys())
def test_a_malformed_billing_entries_listing_is_400_naming_the_parameter(readonly, query, name):
    """/billing-entries takes limit and before only, each once and well formed."""
    detail = problem_detail(readonly.billing_api.simulate_get("/billing-entries", query_string=query))
    assert detail.startswith(f"{name}: "), detail


def test_the_listings_are_served_as_the_services_own_roles(db_url, make_appointment, biller):
    """clinic_api may run LIST_APPOINTMENTS with every filter, clinic_worker LIST_ENTRIES(_BEFORE)
    and the feed: the in-process fixtures log in as a superuser, production does not."""
    made = [make_appointment(start=f"2021-06-01 {hour}:00:00", end=f"2021-06-01 {hour}:30:00") for hour in (10, 11, 12)]
    made.append(make_appointment(start="2021-06-01 13:00:00"))
    biller.drain()
    one = made[1]
    api_config = Config(database_url=as_role(db_url, "appointments.py"))
    worker_config = Config(database_url=as_role(db_url, "billing_worker.py"))
    api_pool = make_pool(api_config, "tests-list-api")
    worker_pool = make_pool(worker_config, "tests-list-worker", **billing_worker.WORKER_SESSION)
    with api_pool, worker_pool:
        with api_pool.connection() as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("clinic_api",)
        api = falcon.testing.TestClient(appointments.create_app(api_config, api_pool))
        worker = falcon.testing.TestClient(ledger.create_app(worker_config, worker_pool))
        for params, count in (
            ({}, 4), ({"status": "open"}, 1), ({"status": "ended"}, 3),
            ({"physician_id": one["physician_id"]}, 1), ({"patient_id": one["patient_id"]}, 1),
            ({"physician_id": one["physician_id"], "patient_id": one["patient_id"], "status": "ended"}, 1),
        ):
            pages = follow(api, "/appointments", {**params, "limit": 1})
            assert len([item for page in pages for item in page.items]) == count, params
        assert len(follow(worker, "/billing-entries", {"limit": 1})) == 3
        first = wait_until(lambda: released(worker, {"limit": 2}, 2), 10, what="the entries past the feed's horizon")
        rest = released(worker, {"limit": 2, "after": first["cursor"]}, 1)
        assert rest is not None and rest["cursor"] != first["cursor"]


# ---------------------------------------------------------------------------------------------
# Plans, on enough rows for the planner to mean it.

# support.load_listings' data set (make bench's listings section pages through it too), ROWS of
# it: about 135 rows for each of the 997 physicians and 150 for each of the 1009 patients.
ROWS = 150_000


def md5_uuid(db, text: str) -> uuid.UUID:
    return db.execute("SELECT md5(%s)::uuid AS u", [text]).fetchone()["u"]


@pytest.fixture(scope="module")
def loaded(admin_url, template_db):
    """A database of its own with ROWS appointments, their queue rows and entries, vacuumed and
    analyzed (support.load_listings); the rows are consistent by construction, and counted below."""
    name = f"clinic_test_plans_{uuid.uuid4().hex[:8]}"
    url = create_database(admin_url, name, template=template_db)
    try:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            load_listings(conn, ROWS)
            ended = ROWS - LISTINGS_OPEN
            counts = conn.execute(
                """SELECT (SELECT count(*) FROM appointments) AS appointments,
                          (SELECT count(*) FROM appointments WHERE end_date IS NULL) AS open,
                          (SELECT count(*) FROM billing_queue) AS queued,
                          (SELECT count(*) FROM billing_entries) AS entries,
                          (SELECT count(DISTINCT txid) FROM billing_entries) AS transactions,
                          (SELECT count(*) FROM billing_entries e JOIN billing_queue q USING (appointment_id)) AS joined"""
            ).fetchone()
            assert counts == {"appointments": ROWS, "open": LISTINGS_OPEN, "queued": ended, "entries": ended,
                              "transactions": -(-ended // LISTINGS_BATCH), "joined": ended}
        yield url
    finally:
        drop_database(admin_url, name)


@pytest.fixture(scope="module")
def plans_db(loaded):
    with psycopg.connect(loaded, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture(scope="module")
def people(plans_db):
    """The busy physician and patient (15,000 rows each), a typical physician (about 135) and a
    typical patient who sees that physician once."""
    typical_physician = md5_uuid(plans_db, "physician 5")
    pair = plans_db.execute(
        "SELECT patient_id FROM appointments WHERE physician_id = %s AND patient_id <> md5('patient 0')::uuid LIMIT 1",
        [typical_physician],
    ).fetchone()
    return {
        "busy_physician": md5_uuid(plans_db, "physician 0"),
        "busy_patient": md5_uuid(plans_db, "patient 0"),
        "physician": typical_physician,
        "patient": pair["patient_id"],
    }


def nth(db, query: str, args: list, n: int) -> dict[str, Any]:
    """The row at 0-based position n of a listing, from plain SQL (the cursor of page n/limit + 1)."""
    row = db.execute(query + " OFFSET %s LIMIT 1", [*args, n]).fetchone()
    assert row is not None, (query, n)
    return row


APPOINTMENTS_ORDER = "SELECT start_date, id FROM appointments WHERE {} ORDER BY start_date DESC, id DESC"


def listing_args(**given) -> dict[str, Any]:
    """The arguments AppointmentStore.list passes: every name, None where unused, one more than a page."""
    before = given.pop("before", None)
    return {
        "physician_id": None, "patient_id": None, "limit": 101, **given,
        "before_at": before and before["start_date"], "before_id": before and before["id"],
    }


def explain(db, query, args: dict[str, Any], options: str = "") -> tuple[dict[str, Any], str]:
    """(the JSON plan, the text plan) of query with args."""
    query = sql.SQL(query) if isinstance(query, str) else query
    fmt = sql.SQL(f"EXPLAIN ({options + ', ' if options else ''}FORMAT {{}}) ")
    as_json = db.execute(fmt.format(sql.SQL("JSON")) + query, args).fetchone()["QUERY PLAN"][0]
    as_text = "\n".join(row["QUERY PLAN"] for row in db.execute(fmt.format(sql.SQL("TEXT")) + query, args))
    return as_json, as_text


def nodes(plan: dict[str, Any]):
    stack = [plan["Plan"]]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.get("Plans", []))


def scans_of(plan: dict[str, Any], table: str) -> list[tuple[str, str | None]]:
    return [(node["Node Type"], node.get("Index Name")) for node in nodes(plan) if node.get("Relation Name") == table]


def keyset_cases(db, people) -> dict[str, tuple[list[str], dict[str, Any], str]]:
    """Each single filter, on its first page and on a page deep in: (filters, args, the index)."""
    deep = nth(db, APPOINTMENTS_ORDER.format("TRUE"), [], 50_000)
    ended_deep = nth(db, APPOINTMENTS_ORDER.format("end_date IS NOT NULL"), [], 50_000)
    open_deep = nth(db, APPOINTMENTS_ORDER.format("end_date IS NULL"), [], 100)
    by_physician = nth(db, APPOINTMENTS_ORDER.format("physician_id = %s"), [people["busy_physician"]], 7_500)
    by_patient = nth(db, APPOINTMENTS_ORDER.format("patient_id = %s"), [people["busy_patient"]], 7_500)
    physician, patient = {"physician_id": people["busy_physician"]}, {"patient_id": people["busy_patient"]}
    return {
        "no filter": ([], listing_args(), "appointments_newest"),
        "no filter, deep": (["before"], listing_args(before=deep), "appointments_newest"),
        "physician": (["physician_id"], listing_args(**physician), "appointments_by_physician"),
        "physician, deep": (["physician_id", "before"], listing_args(**physician, before=by_physician), "appointments_by_physician"),
        "patient": (["patient_id"], listing_args(**patient), "appointments_by_patient"),
        "patient, deep": (["patient_id", "before"], listing_args(**patient, before=by_patient), "appointments_by_patient"),
        "open": (["open"], listing_args(), "appointments_open"),
        "open, deep": (["open", "before"], listing_args(before=open_deep), "appointments_open"),
        "ended": (["ended"], listing_args(), "appointments_ended"),
        "ended, deep": (["ended", "before"], listing_args(before=ended_deep), "appointments_ended"),
        "patient+ended": (["patient_id", "ended"], listing_args(**patient), "appointments_by_patient"),
        "patient+ended, deep": (["patient_id", "ended", "before"], listing_args(**patient, before=by_patient), "appointments_by_patient"),
        "physician+ended, deep": (["physician_id", "ended", "before"], listing_args(**physician, before=by_physician), "appointments_by_physician"),
    }


KEYSET_CASES = ["no filter", "no filter, deep", "physician", "physician, deep", "patient", "patient, deep", "open", "open, deep",
                "ended", "ended, deep", "patient+ended", "patient+ended, deep", "physician+ended, deep"]

# A page deep into a busy physician's (or patient's) listing: their rows are 10 % of the table and
# spread evenly over time, and the heap is in start_date order, so walking appointments_newest
# back from the cursor and filtering (about 10 index entries, a heap page or two, per row shown)
# costs the planner about what its own index does; which of the two it takes depends on the
# sample ANALYZE drew. Either is a keyset walk without a sort (the buffer test below bounds it).
EITHER_WAY = {"physician, deep", "patient, deep", "patient+ended, deep", "physician+ended, deep"}
# With nearly every row ended, appointments_newest and appointments_ended cost the same to walk:
# either may be taken (the forgotten-open test below is where only appointments_ended will do).
NEARLY_ALL_ENDED = {"ended", "ended, deep"}


@pytest.mark.parametrize("case", KEYSET_CASES)
def test_each_listing_reads_its_index_backwards_without_seq_scan_or_sort(plans_db, people, case):
    """LIST_APPOINTMENTS for each filter (a busy physician or patient: more rows than a page)
    walks the index schema.sql made for it from the cursor on, and joins billing_queue by its key."""
    filters, args, index = keyset_cases(plans_db, people)[case]
    plan, text = explain(plans_db, appointments.list_query(filters), args)
    # (appointments_ended is appointments_newest's walk for a filter that has status=ended.)
    allowed = {index, "appointments_newest", "appointments_ended"} if case in EITHER_WAY | NEARLY_ALL_ENDED else {index}
    print(f"\n--- {case}: {filters}: {scans_of(plan, 'appointments')}\n{text}")
    kinds = [node["Node Type"] for node in nodes(plan)]
    assert "Seq Scan" not in kinds and "Sort" not in kinds and "Incremental Sort" not in kinds, text
    [(kind, used)] = scans_of(plan, "appointments")
    assert kind == "Index Scan" and used in allowed, text
    assert all(n.get("Scan Direction") == "Backward" for n in nodes(plan) if n.get("Index Name") == used), text
    assert scans_of(plan, "billing_queue") == [("Index Scan", "billing_queue_pkey")], text


# Combinations where the planner may rightly choose another path: (filters, who, a cursor?).
# The matching set of a typical physician is ~135 rows, of one (physician, patient) pair 1 row,
# of a physician's open appointments 0 to 1: when it expects fewer rows than a page, reading them
# all through a bitmap and sorting them is cheaper than walking an index in order.
COMBINATIONS = {
    "busy physician+open": (["physician_id", "open"], {"physician_id": "busy_physician"}, False),
    "physician+open": (["physician_id", "open"], {"physician_id": "physician"}, False),
    "physician+patient": (["physician_id", "patient_id"], {"physician_id": "physician", "patient_id": "patient"}, False),
    "physician, deep (a typical one: ~135 rows)": (["physician_id", "before"], {"physician_id": "physician"}, True),
}


@pytest.mark.parametrize("case", COMBINATIONS.keys())
def test_combinations_use_the_listing_indexes_and_sort_only_what_is_smaller_than_a_page(plans_db, people, case):
    """No Seq Scan; only the listing indexes; a Sort only over rows the planner expects to be
    fewer than a page (printed: which index, and whether it sorts)."""
    filters, who, deep = COMBINATIONS[case]
    given = {name: people[key] for name, key in who.items()}
    if deep:
        where = " AND ".join(f"{name} = %s" for name in given)
        given["before"] = nth(plans_db, APPOINTMENTS_ORDER.format(where), list(given.values()), 40)
    plan, text = explain(plans_db, appointments.list_query(filters), listing_args(**given))
    sorts = [node for node in nodes(plan) if node["Node Type"] in ("Sort", "Incremental Sort")]
    used = {node["Index Name"] for node in nodes(plan) if node.get("Index Name", "").startswith("appointments_")}
    print(f"\n--- {case}: {filters}: indexes {sorted(used)}, sort: {bool(sorts)}\n{text}")
    assert "Seq Scan" not in [node["Node Type"] for node in nodes(plan)], text
    assert used and used <= {"appointments_by_physician", "appointments_by_patient", "appointments_open", "appointments_newest",
                             "appointments_ended"}, text
    for sort in sorts:
        assert sort["Plan Rows"] <= 101, f"a sort over more than a page:\n{text}"


def entry_cases(db) -> dict[str, tuple[str, dict[str, Any], str]]:
    deep = nth(db, "SELECT created_at, appointment_id FROM billing_entries ORDER BY created_at DESC, appointment_id DESC", [], 50_000)
    position = nth(db, "SELECT txid::text AS txid, appointment_id FROM billing_entries ORDER BY txid, appointment_id", [], 50_000)
    return {
        "LIST_ENTRIES": (ledger.LIST_ENTRIES, {"limit": 101}, "billing_entries_newest"),
        "LIST_ENTRIES_BEFORE": (
            ledger.LIST_ENTRIES_BEFORE,
            {"limit": 101, "before_at": deep["created_at"], "before_id": deep["appointment_id"]},
            "billing_entries_newest",
        ),
        "FEED_FROM_START": (ledger.FEED_FROM_START, {"limit": 100}, "billing_entries_feed"),
        "FEED_AFTER": (ledger.FEED_AFTER, {"limit": 100, **position}, "billing_entries_feed"),
    }


@pytest.mark.parametrize("case", ["LIST_ENTRIES", "LIST_ENTRIES_BEFORE", "FEED_FROM_START", "FEED_AFTER"])
def test_the_ledger_listings_and_the_feed_read_their_index_in_order(plans_db, case):
    """/billing-entries by billing_entries_newest, the change feed by billing_entries_feed, also
    from a cursor 50,000 entries in: one index range, no Seq Scan, no Sort."""
    query, args, index = entry_cases(plans_db)[case]
    plan, text = explain(plans_db, query, args)
    print(f"\n--- {case}\n{text}")
    kinds = [node["Node Type"] for node in nodes(plan)]
    assert "Seq Scan" not in kinds and "Sort" not in kinds and "Incremental Sort" not in kinds, text
    assert scans_of(plan, "billing_entries") == [("Index Scan", index)], text


# ---------------------------------------------------------------------------------------------
# A deep page costs what the first one does: counted in buffers, not time.


def buffers(db, query, args: dict[str, Any]) -> tuple[int, str]:
    """Shared buffers (hit + read) the statement touched, and its EXPLAIN (ANALYZE, BUFFERS)."""
    plan, text = explain(db, query, args, "ANALYZE, BUFFERS")
    top = plan["Plan"]
    return top["Shared Hit Blocks"] + top["Shared Read Blocks"], text


def with_offset(query) -> sql.Composable:
    query = sql.SQL(query) if isinstance(query, str) else query
    return query + sql.SQL(" OFFSET %(offset)s")


def depth_cases(db, people):
    """(first page, a page deep in, the same page by OFFSET): (query, args) each."""
    cases = keyset_cases(db, people)
    entries = entry_cases(db)

    def listing(name: str, deep_name: str, offset: int):
        first, deep = cases[name], cases[deep_name]
        return (
            (appointments.list_query(first[0]), first[1]),
            (appointments.list_query(deep[0]), deep[1]),
            (with_offset(appointments.list_query(first[0])), {**first[1], "offset": offset}),
        )

    def ledger(first: str, deep: str):
        return (entries[first][:2], entries[deep][:2], (with_offset(entries[first][0]), {**entries[first][1], "offset": 50_001}))

    return {
        "appointments": listing("no filter", "no filter, deep", 50_001),
        "appointments?physician_id= (busy)": listing("physician", "physician, deep", 7_501),
        "appointments?status=ended": listing("ended", "ended, deep", 50_001),
        "billing-entries": ledger("LIST_ENTRIES", "LIST_ENTRIES_BEFORE"),
        "billing-entries/changes": ledger("FEED_FROM_START", "FEED_AFTER"),
    }


@pytest.mark.parametrize("case", ["appointments", "appointments?physician_id= (busy)", "appointments?status=ended",
                                  "billing-entries", "billing-entries/changes"])
def test_a_deep_page_reads_as_many_buffers_as_the_first_unlike_offset(plans_db, people, case):
    """EXPLAIN (ANALYZE, BUFFERS): page 1 and the page after row 50,000 (7,500 for the busy
    physician) read about the same number of buffers; the same page by OFFSET reads many times
    more (hundreds of times at row 50,000; printed, with its time, for contrast)."""
    first, deep, offset = depth_cases(plans_db, people)[case]
    first_buffers, first_text = buffers(plans_db, *first)
    deep_buffers, deep_text = buffers(plans_db, *deep)
    offset_buffers, offset_text = buffers(plans_db, *offset)
    print(f"\n--- {case}: buffers first {first_buffers}, deep {deep_buffers}, by OFFSET {offset_buffers}")
    print(f"first page:\n{first_text}\ndeep page:\n{deep_text}\nby OFFSET:\n{offset_text}")
    assert deep_buffers <= 2 * first_buffers + 10, (first_text, deep_text)
    assert first_buffers <= 2 * deep_buffers + 10, (first_text, deep_text)
    assert offset_buffers > 5 * deep_buffers, offset_text


# Appointments left open and forgotten pile up in a real clinic: FORGOTTEN of them, all newer than
# every ended one, the newest-first order a status=ended page must not walk through.
FORGOTTEN, ENDED_BEFORE = 200_000, 20_000
LOAD_FORGOTTEN = """
INSERT INTO appointments (id, physician_id, patient_id, start_date, end_date, hourly_rate, price)
SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(),
       timestamptz '2020-01-01 08:00:00+00' + g * interval '1 minute',
       CASE WHEN g <= %(ended)s THEN timestamptz '2020-01-01 08:30:00+00' + g * interval '1 minute' END,
       200.00, CASE WHEN g <= %(ended)s THEN 100.00 END
FROM generate_series(1, %(rows)s) g
"""


@pytest.fixture(scope="module")
def forgotten_open(admin_url, template_db):
    name = f"clinic_test_forgotten_{uuid.uuid4().hex[:8]}"
    url = create_database(admin_url, name, template=template_db)
    try:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            conn.execute(LOAD_FORGOTTEN, {"rows": ENDED_BEFORE + FORGOTTEN, "ended": ENDED_BEFORE})
            conn.execute("VACUUM ANALYZE appointments")
            yield conn
    finally:
        drop_database(admin_url, name)


def test_an_ended_listing_never_walks_past_forgotten_open_appointments(forgotten_open):
    """status=ended with 200,000 newer open appointments: appointments_ended, read backwards, and
    the first page reads about what an unfiltered first page does (no walk past the open rows)."""
    plan, text = explain(forgotten_open, appointments.list_query(["ended"]), listing_args())
    [(kind, used)] = scans_of(plan, "appointments")
    assert (kind, used) == ("Index Scan", "appointments_ended") and "Sort" not in text, text
    ended_buffers, ended_text = buffers(forgotten_open, appointments.list_query(["ended"]), listing_args())
    first_buffers, first_text = buffers(forgotten_open, appointments.list_query([]), listing_args())
    print(f"\n--- buffers: status=ended {ended_buffers}, no filter {first_buffers}\n{ended_text}")
    assert ended_buffers <= 2 * first_buffers + 10, (ended_text, first_text)


def test_a_deep_page_through_http_is_the_same_rows_as_sql_by_offset(loaded, plans_db, people):
    """The cursor of row 50,000 (as paging.list_cursor makes it) gives the page SQL's OFFSET
    gives, through the real resource: keyset and OFFSET agree on what page 501 is."""
    config = Config(database_url=loaded)
    pool = make_pool(config, "tests-deep-page")
    with pool:
        api = falcon.testing.TestClient(appointments.create_app(config, pool))
        for where, params in (("TRUE", {}), ("physician_id = %s", {"physician_id": people["busy_physician"]})):
            args = list(params.values())
            last = nth(plans_db, APPOINTMENTS_ORDER.format(where), args, 4_999)
            cursor = paging.list_cursor("appointments", paging.ListPosition(last["start_date"], last["id"]))
            page = api.simulate_get("/appointments", params={**{k: str(v) for k, v in params.items()}, "limit": 100, "before": cursor})
            expected = plans_db.execute(
                "SELECT id FROM (" + APPOINTMENTS_ORDER.format(where) + " OFFSET 5000 LIMIT 100) p", args
            ).fetchall()
            assert [item["id"] for item in page.json] == [str(row["id"]) for row in expected]
            assert "before" in link_query(NEXT.fullmatch(page.headers["Link"])["url"])
