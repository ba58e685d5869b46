"""Keyset paging for every listing and the change feed: opaque cursors, query parameters, Link headers.

A cursor is the position of the last row a page showed, packed and base64url-encoded, with a
first byte that says which listing it belongs to, so that one listing's cursor is refused by
another. The next page is the rows strictly past that position in the listing's order (keyset),
never an OFFSET: page 500 costs what page 1 costs. Clients treat cursors as opaque strings.

Pure functions, no I/O: the queries that read these positions live next to their resources.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import struct
import urllib.parse
import uuid
from typing import Iterable, NamedTuple

from web import Problem, shown

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

# The first byte of each kind of cursor, and how the rest is packed (big-endian).
_FEED_START = b"F"  # the change feed, before its first entry: nothing else follows
_FEED = b"f"  # the change feed: txid (unsigned 64 bits), appointment_id
_ENTRIES = b"e"  # /billing-entries: created_at (microseconds since 1970), appointment_id
_APPOINTMENTS = b"a"  # /appointments: start_date (seconds since 1970), id
_POSITION = struct.Struct(">Q16s")
_INSTANT = struct.Struct(">q16s")


class FeedPosition(NamedTuple):
    """An entry's place in the change feed: (txid, appointment_id); see schema.sql."""

    txid: int
    appointment_id: uuid.UUID


class ListPosition(NamedTuple):
    """A row's place in a newest-first listing: (its timestamp, its id)."""

    at: dt.datetime
    id: uuid.UUID


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode(cursor: str, kind: bytes, size: int) -> bytes | None:
    """The packed bytes after the kind, or None when the cursor is not one of this kind. Only the
    canonical spelling is accepted, so that a cursor compares equal to the one that was issued."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cursor):
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 1 + size or raw[:1] != kind or _encode(raw) != cursor:
        return None
    return raw[1:]


FEED_START = _encode(_FEED_START)


def feed_cursor(position: FeedPosition | None) -> str:
    if position is None:
        return FEED_START
    return _encode(_FEED + _POSITION.pack(position.txid, position.appointment_id.bytes))


def parse_feed_cursor(cursor: str, field: str = "after") -> FeedPosition | None:
    """None for the start of the feed; Problem 400 naming ``field`` for anything not issued by it."""
    if cursor == FEED_START:
        return None
    packed = _decode(cursor, _FEED, _POSITION.size)
    if packed is None:
        raise Problem(400, f"{field}: {shown(cursor)} is not a cursor of this feed; pass the cursor of the last page as it came, or leave {field} out to start from the beginning")
    txid, appointment_id = _POSITION.unpack(packed)
    return FeedPosition(txid, uuid.UUID(bytes=appointment_id))


def _microseconds(instant: dt.datetime) -> int:
    delta = instant - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def list_cursor(kind: str, position: ListPosition) -> str:
    if kind == "entries":
        return _encode(_ENTRIES + _INSTANT.pack(_microseconds(position.at), position.id.bytes))
    return _encode(_APPOINTMENTS + _INSTANT.pack(_microseconds(position.at) // 1_000_000, position.id.bytes))


def parse_list_cursor(kind: str, cursor: str, field: str = "before") -> ListPosition:
    packed = _decode(cursor, _ENTRIES if kind == "entries" else _APPOINTMENTS, _INSTANT.size)
    if packed is None:
        raise Problem(400, f"{field}: {shown(cursor)} is not a cursor of this listing; pass the one from the Link header of the previous page")
    number, row_id = _INSTANT.unpack(packed)
    microseconds = number if kind == "entries" else number * 1_000_000
    try:
        at = EPOCH + dt.timedelta(microseconds=microseconds)
    except OverflowError:
        raise Problem(400, f"{field}: {shown(cursor)} is not a cursor of this listing") from None
    return ListPosition(at, uuid.UUID(bytes=row_id))


# ---------------------------------------------------------------------------------------------
# Query parameters.


def query_params(params: dict, allowed: Iterable[str]) -> dict[str, str]:
    """The request's query parameters, each given at most once and each one of ``allowed``;
    Problem 400 naming the parameter otherwise (a typo must not silently widen a listing)."""
    allowed = tuple(allowed)
    unknown = sorted(name for name in params if name not in allowed)
    if unknown:
        # Each as it came (the detail starts with it), but an empty or over-long name quoted.
        named = ", ".join(name if 0 < len(name) <= 40 else shown(name, 40) for name in unknown)
        raise Problem(400, f"{named}: unknown query parameter; this route takes {', '.join(allowed)}")
    for name, value in params.items():
        if isinstance(value, list):
            raise Problem(400, f"{name}: given {len(value)} times; give it once")
    return dict(params)


def whole_number(params: dict[str, str], name: str, default: int, low: int, high: int, unit: str = "") -> int:
    """Plain ASCII digits only: int() would also take "1_0", " 5" and other scripts' digits."""
    raw = params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,6}", raw) or not low <= int(raw) <= high:
        raise Problem(400, f"{name}: must be a whole number{unit} from {low} to {high}, got {shown(raw)}")
    return int(raw)


def limit_param(params: dict[str, str]) -> int:
    return whole_number(params, "limit", 100, 1, 1000)


def next_link(path: str, params: dict[str, str]) -> str:
    """An RFC 8288 Link header value naming the next page (a full relative URL)."""
    return f'<{path}?{urllib.parse.urlencode(params)}>; rel="next"'
