"""The database: the connection pool both services use, and applying schema.sql.

    python db.py apply-schema     # what `make schema` and the compose `migrate` service run
"""

from __future__ import annotations

import pathlib
import sys

import psycopg
import psycopg_pool

from config import Config, load_config_or_exit

HERE = pathlib.Path(__file__).resolve().parent

# Served by /ready: the tables both services use exist.
SCHEMA_PRESENT = """
SELECT to_regclass('appointments') IS NOT NULL
   AND to_regclass('billing_queue') IS NOT NULL
   AND to_regclass('billing_entries') IS NOT NULL AS ok
"""


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


def apply_schema(database_url: str) -> None:
    """schema.sql as one simple-protocol query: one implicit transaction, all or nothing, and
    idempotent, so it is safe against a live database."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute((HERE / "schema.sql").read_text(encoding="utf-8"))


if __name__ == "__main__":
    if sys.argv[1:] != ["apply-schema"]:
        sys.exit("usage: python db.py apply-schema   (applies schema.sql to DATABASE_URL)")
    apply_schema(load_config_or_exit().database_url)
    print("schema.sql applied")
