"""The database: the connection pool both services use (it follows a replicated PostgreSQL's
leader), and applying schema.sql and roles.sql.

    python db.py apply-schema     # what `make schema` and the compose `migrate` service run

apply-schema also sets the passwords of the two services' roles from CLINIC_API_PASSWORD and
CLINIC_WORKER_PASSWORD, each when it is set (roles.sql holds no password).
"""

from __future__ import annotations

import contextlib
import pathlib
import random
import select
import sys
import threading
import time
from typing import Iterator

import psycopg
import psycopg.errors
import psycopg_pool
import psycopg_pool.pool
from psycopg import sql

from config import Config, load_config_or_exit

HERE = pathlib.Path(__file__).resolve().parent

# Served by /ready: the tables both services use exist.
SCHEMA_PRESENT = """
SELECT to_regclass('appointments') IS NOT NULL
   AND to_regclass('billing_queue') IS NOT NULL
   AND to_regclass('billing_entries') IS NOT NULL AS ok
"""


# Run on each new connection, and before handing out one whose server has sent something since it
# went idle (LeaderPool.check_leader).
ON_THE_LEADER = "SELECT NOT pg_is_in_recovery()"


class UnreplicatedCommit(psycopg.OperationalError):
    """A commit stopped waiting for the synchronous standby (a statement_timeout, a cancel, the
    session ended): it is committed on the leader only, and a failover now would lose it. So it
    is not acknowledged: the client gets a 503 and retries, and a retry finds it stored (or, after
    a failover that lost it, does it again)."""


def _is_unreplicated_commit(diagnostic: psycopg.errors.Diagnostic) -> bool:
    # PostgreSQL's syncrep.c: "canceling wait for synchronous replication due to user request" (a
    # WARNING, after which the COMMIT returns success) and "... and terminating connection due to
    # administrator command". Matched on the English message: lc_messages must stay English.
    return diagnostic.severity_nonlocalized == "WARNING" and "synchronous replication" in (diagnostic.message_primary or "")


class LeaderPool(psycopg_pool.ConnectionPool):
    """A connection pool that follows the leader of a replicated PostgreSQL, and finds it quickly.

    - Each new connection is checked to be on the leader: one to a server in recovery (a leader
      demoted in a failover, back as a standby that still answers) is closed, and the pool
      connects again: with a multi-host DATABASE_URL and target_session_attrs=read-write, libpq
      finds the new leader. A server cannot leave the leader's role without a restart, which
      ends its sessions, so the check holds for the connection's life. (Not behind a pooler
      such as PgBouncer, whose server connection may change under ours: there a demoted
      server's writes fail with ReadOnlySqlTransaction, a 503, until the pooler moves on.)
    - Before a connection is handed out, its socket is looked at without a round trip: a server
      that ended the session (a restart, a failover, pg_terminate_backend, an idle timeout) has
      sent its FATAL message and closed, and the socket is readable. Only then is the round
      trip spent (ON_THE_LEADER), which drops a dead connection and reads anything else a server
      may send between queries (a NOTICE, a changed parameter). So a PostgreSQL restart costs the
      requests in flight at that moment and nothing after, and a busy service pays no query per
      request for it (it did until issue 11: a quarter of an API start's time). A connection
      back in the pool for less than FRESH seconds is not even looked at (check_idle_connection).
    - Reconnecting: psycopg_pool doubles its wait after each failed attempt (1, 2, 4, 8 s ...),
      so after a failover of ten seconds the first connection to the new leader came up to 5 s
      after it took writes. Here every retry waits a jittered RETRY_SPACING instead, and all the
      retries of one pool share one schedule, so a pool tries at most about 1/RETRY_SPACING times
      a second however many connections it lost: quick to find a new leader, no flood on a
      server that is down. (The pool's hook for this is schedule_task, which runs its
      maintenance tasks.)
    - A commit that PostgreSQL reports as not confirmed by the synchronous standby raises
      UnreplicatedCommit when the connection goes back (``connection()``), instead of passing
      for acknowledged.
    """

    RETRY_SPACING = 0.25
    FRESH = 0.01

    def __init__(self, conninfo: str, **kwargs):
        self._retry_lock = threading.Lock()
        self._next_retry = 0.0
        super().__init__(conninfo, check=self.check_idle_connection, configure=self._configure, **kwargs)

    @classmethod
    def _configure(cls, conn: psycopg.Connection) -> None:
        cls.check_leader(conn)
        cls._watch_commits(conn)

    @staticmethod
    def _watch_commits(conn: psycopg.Connection) -> None:
        conn.unreplicated_commits = 0

        def notice(diagnostic: psycopg.errors.Diagnostic) -> None:
            if _is_unreplicated_commit(diagnostic):
                conn.unreplicated_commits += 1

        conn.add_notice_handler(notice)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection]:
        with super().connection(timeout=timeout) as conn:
            seen = conn.unreplicated_commits
            try:
                yield conn
            finally:
                conn.returned_at = time.monotonic()  # before the pool takes it back
            if conn.unreplicated_commits != seen:
                raise UnreplicatedCommit("the commit was not confirmed by the synchronous standby; retry: a retry finds it if it was kept")

    @staticmethod
    def check_leader(conn: psycopg.Connection) -> None:
        if not conn.execute(ON_THE_LEADER).fetchone()[0]:
            conn.close()  # closed, the pool drops it instead of taking it back
            raise psycopg.OperationalError("the server is in recovery (a standby): not the leader")

    @classmethod
    def check_idle_connection(cls, conn: psycopg.Connection) -> None:
        """The pool's check before handing out a connection: the round trip only when the
        server has written to this idle connection (see the class's docstring). A connection
        back for less than FRESH seconds is handed out as it is: the look at its socket is a
        system call that gives up the GIL, a tenth of a start's CPU under load (issue 11), and
        under load a connection comes back every few milliseconds. What that lets through is
        what the look would have missed anyway a moment later: a session that ended within
        FRESH seconds, like one that ends during the request (a 503 the client retries)."""
        if conn.closed:
            raise psycopg.OperationalError("the connection is closed")
        if time.monotonic() - getattr(conn, "returned_at", float("-inf")) < cls.FRESH:
            return
        if server_has_spoken(conn):
            cls.check_leader(conn)

    def schedule_task(self, task, delay: float) -> None:
        if isinstance(task, psycopg_pool.pool.AddConnection):
            with self._retry_lock:
                now = time.monotonic()
                at = max(now, self._next_retry) + self.RETRY_SPACING * random.uniform(0.5, 1.5)
                self._next_retry = at
            delay = at - now
        super().schedule_task(task, delay)


def server_has_spoken(conn: psycopg.Connection) -> bool:
    """Whether anything (or the end of the stream) waits to be read on an idle connection's
    socket; no round trip. poll(), not select(): a service's descriptors may pass 1,024."""
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def make_pool(config: Config, name: str, max_size: int = 10, **session: str) -> LeaderPool:
    """A pool that is not opened yet (no I/O here); the caller opens it. ``session`` holds server
    settings for every connection (e.g. idle_in_transaction_session_timeout)."""
    options = " ".join(f"-c {key}={value}" for key, value in session.items())
    return LeaderPool(
        config.database_url,
        # min < max so that a pool that gave up reconnecting after a long outage grows again.
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True, "application_name": name, "options": options, "connect_timeout": 5},
        timeout=5,
        open=False,
        name=name,
    )


# Applied in this order, as a superuser: the tables, then the roles and their grants.
SCHEMA_FILES = ("schema.sql", "roles.sql")

# The LOGIN roles roles.sql makes, and the variables their passwords come from.
ROLE_PASSWORD_VARIABLES = {"clinic_api": "CLINIC_API_PASSWORD", "clinic_worker": "CLINIC_WORKER_PASSWORD"}


def apply_schema(database_url: str) -> None:
    """schema.sql then roles.sql as one simple-protocol query: one implicit transaction, all or
    nothing, and idempotent, so it is safe against a live database."""
    script = "\n".join((HERE / name).read_text(encoding="utf-8") for name in SCHEMA_FILES)
    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(script)


def set_role_passwords(database_url: str, api_password: str | None, worker_password: str | None) -> list[str]:
    """Sets the password of clinic_api and of clinic_worker, each only when given (None or "" leaves
    it as it is); returns the roles changed. As a superuser, after roles.sql made the roles.

    The password never reaches the server, its logs or pg_stat_statements: libpq hashes it here
    (PQencryptPasswordConn, in the server's password_encryption, as psql's \\password does) and
    ALTER ROLE gets the hash. ALTER ROLE takes no bind parameters, so the hash is quoted as a
    literal by psycopg.sql.Literal.
    """
    wanted = {"clinic_api": api_password, "clinic_worker": worker_password}
    changed = [role for role, password in wanted.items() if password]
    if not changed:
        return []
    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        hashed = {role: conn.pgconn.encrypt_password(wanted[role].encode(), role.encode()).decode() for role in changed}
        with conn.transaction():
            # The lock roles.sql takes on the roles (cluster-wide): no concurrent update of one role.
            conn.execute("LOCK TABLE pg_catalog.pg_authid IN SHARE UPDATE EXCLUSIVE MODE")
            for role in changed:
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(hashed[role])))
    return changed


if __name__ == "__main__":
    if sys.argv[1:] != ["apply-schema"]:
        sys.exit("usage: python db.py apply-schema   (applies schema.sql and roles.sql to DATABASE_URL)")
    config = load_config_or_exit()
    apply_schema(config.database_url)
    print("schema.sql applied; roles.sql applied")
    for role in set_role_passwords(config.database_url, config.api_role_password, config.worker_role_password):
        print(f"password of {role} set from {ROLE_PASSWORD_VARIABLES[role]}")
