"""The database as both services reach it: deadlines on every wait for the server, the connection
pool (it follows a replicated PostgreSQL's leader, and stops sending work to a server that stopped
answering), the monitor that probes the server in the background, LISTEN connections that follow
the leader, and applying schema.sql and roles.sql.

    python db.py apply-schema     # what `make schema` and the compose `migrate` service run

apply-schema also sets the passwords of the two services' roles from CLINIC_API_PASSWORD and
CLINIC_WORKER_PASSWORD, each when it is set (roles.sql holds no password).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import pathlib
import random
import select
import socket
import sys
import threading
import time
import weakref
from typing import Callable, Iterator

import psycopg
import psycopg.errors
import psycopg_pool
import psycopg_pool.pool
from psycopg import sql

from config import Config, load_config_or_exit
from telemetry import get_logger

log = get_logger("clinic.db")

HERE = pathlib.Path(__file__).resolve().parent



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


# ---------------------------------------------------------------------------------------------
# Deadlines, enforced on our side of the socket.
#
# A server that stops answering without closing its connections (a hung disk, a paused VM, a
# frozen process, a network partition) cannot enforce its own statement_timeout, and TCP waits
# about 15 minutes before it gives up on a silent peer. So every wait for the server in a context
# with a deadline ends by that deadline: DeadlineConnection.wait bounds psycopg's own wait, and
# LeaderPool.connection bounds the wait for a pooled connection. The connection whose wait ran
# out is closed: what the server did with its last statement is unknown, and its session must
# never be reused. web.Deadlines gives each request the deadline REQUEST_TIMEOUT_SECONDS after
# its arrival; the worker gives each batch BATCH_DEADLINE_SECONDS (billing_worker.py).

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("clinic_deadline", default=None)


class DeadlineExceeded(psycopg.OperationalError):
    """The work's deadline passed while it waited for the server (or for a pooled connection).
    The connection it waited on is closed; a change it carried may or may not have committed, so
    the answer is "retry the same request": every change the API makes is idempotent."""


class DatabaseUnavailable(psycopg.OperationalError):
    """The monitor's last probe of the server failed: the request fails at once instead of
    waiting on it (see LeaderPool)."""


def set_deadline(at: float | None) -> contextvars.Token:
    """Replaces the deadline of this context (None: none); hand the token to reset_deadline."""
    return _DEADLINE.set(at)


def reset_deadline(token: contextvars.Token) -> None:
    _DEADLINE.reset(token)


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Every wait for the server inside ends within ``seconds``, or by the deadline already set
    if that comes first."""
    at = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(at if outer is None else min(at, outer))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


@contextlib.contextmanager
def extend_deadline(seconds: float) -> Iterator[None]:
    """The deadline already set, ``seconds`` later (a long poll's wait is not the server's time)."""
    at = _DEADLINE.get()
    token = _DEADLINE.set(None if at is None else at + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


# A host that let a connection attempt or a statement run out of time is tried after the others
# for this long (HostOrder).
SLOW_HOST_SECONDS = 60.0


class HostOrder:
    """The order in which to try the hosts of a multi-host DATABASE_URL: as written, but any host
    that recently let an attempt or a statement run out of time comes last.

    libpq and psycopg try the hosts in the order written, and a host that accepts TCP but never
    answers (a frozen leader: the kernel still completes the handshake) costs connect_timeout (2 s
    at least) before the next host is tried, on every new connection. After a failover away from
    such a host, that would delay every reconnection to the new leader by those 2 s. A success
    on a host clears its mark. Shared by every connection of the process.
    """

    def __init__(self):
        self._slow_until: dict[tuple[str, str], float] = {}

    def order(self, attempts: list[dict[str, str]], skip_slow: bool = False) -> list[dict[str, str]]:
        """The attempts, slow hosts last; ``skip_slow``: without them, unless none is left."""
        now = time.monotonic()
        ordered = sorted(attempts, key=lambda a: self._slow_until.get(self.key(a), 0.0) > now)
        if skip_slow:
            return [a for a in ordered if self._slow_until.get(self.key(a), 0.0) <= now] or ordered
        return ordered

    def slow(self, host: str, port: str) -> None:
        self._slow_until[(host, port)] = time.monotonic() + SLOW_HOST_SECONDS

    def answered(self, host: str, port: str) -> None:
        self._slow_until.pop((host, port), None)

    @staticmethod
    def key(attempt: dict[str, str]) -> tuple[str, str]:
        return attempt.get("host") or attempt.get("hostaddr", ""), attempt.get("port", "")


HOSTS = HostOrder()


def host_attempts(conninfo: str) -> list[dict[str, str]]:
    """One {host, port[, hostaddr]} per host of a libpq connection string (comma-separated lists,
    a single port applying to every host), or [] for a single host."""
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    hosts = str(params.get("host") or "").split(",")
    addrs = str(params.get("hostaddr") or "").split(",")
    count = max(len(hosts), len(addrs))
    if count < 2:
        return []
    ports = str(params.get("port") or "").split(",")
    ports = ports * count if len(ports) == 1 else ports
    attempts = []
    for i in range(count):
        attempt = {"host": hosts[i] if len(hosts) == count else "", "port": ports[i]}
        if len(addrs) == count and addrs[i]:
            attempt["hostaddr"] = addrs[i]
        attempts.append({k: v for k, v in attempt.items() if v})
    return attempts


class DeadlineConnection(psycopg.Connection):
    """A psycopg connection whose every wait for the server ends by the context's deadline
    (``within``, ``set_deadline``), and whose multi-host connection attempts follow HostOrder.

    It keeps a duplicate of its socket's descriptor (``_handle``), so that ``cut()`` from another
    thread acts on this connection's TCP stream and no other: libpq may close its own descriptor
    at any moment (a deadline, a broken connection), and the number may then belong to another
    socket. ``close()`` closes the duplicate too.
    """

    _handle: socket.socket | None = None
    _host_key: tuple[str, str] | None = None  # the HostOrder key it was reached by, multi-host only

    def wait(self, gen, interval=None, timeout=None):
        kwargs = {} if interval is None else {"interval": interval}  # else psycopg's own default
        at = _DEADLINE.get()
        if at is None:
            return super().wait(gen, timeout=timeout, **kwargs)
        left = at - time.monotonic()
        if timeout is not None and timeout < left:
            return super().wait(gen, timeout=timeout, **kwargs)  # the caller's own bound (notifies)
        began = time.monotonic()
        try:
            if left <= 0:
                raise psycopg.errors.ConnectionTimeout("no time left")
            return super().wait(gen, timeout=left, **kwargs)
        except psycopg.OperationalError:
            # psycopg raises its (private) _WaitTimeout, an OperationalError, when the bound runs
            # out; anything else that fails at the deadline is, for the caller, the same thing.
            if time.monotonic() < at:
                raise
            waited = time.monotonic() - began
            if waited > 0 and self._host_key is not None:  # it waited on this host: others first for a while
                HOSTS.slow(*self._host_key)
            self.close()  # never reused: the pool discards a closed connection
            raise DeadlineExceeded(f"the database did not answer within the deadline (waited {waited:.2f} s)") from None

    @classmethod
    def connect(cls, conninfo: str = "", *, skip_slow_hosts: bool = False, **kwargs):
        """As psycopg's, the hosts tried in HostOrder's order; ``skip_slow_hosts``: not the hosts
        that recently timed out, unless no other is left (DatabaseMonitor, every other probe)."""
        attempts = host_attempts(conninfo)
        if not attempts:
            return cls._with_handle(super().connect(conninfo, **kwargs))
        params = {k: v for k, v in psycopg.conninfo.conninfo_to_dict(conninfo).items() if k not in ("host", "port", "hostaddr")}
        failures = []
        for attempt in HOSTS.order(attempts, skip_slow_hosts):
            key = HOSTS.key(attempt)
            try:
                conn = super().connect(psycopg.conninfo.make_conninfo("", **params, **attempt), **kwargs)
            except psycopg.OperationalError as exc:
                if isinstance(exc, psycopg.errors.ConnectionTimeout):
                    HOSTS.slow(*key)
                failures.append(f"{attempt.get('host') or attempt.get('hostaddr')}:{attempt.get('port', '')}: {str(exc).strip()}")
                continue
            HOSTS.answered(*key)
            conn._host_key = key
            return cls._with_handle(conn)
        raise psycopg.OperationalError("no host could be used: " + "; ".join(failures))

    @staticmethod
    def _with_handle(conn: DeadlineConnection) -> DeadlineConnection:
        conn._handle = socket.socket(fileno=os.dup(conn.pgconn.socket))
        return conn

    def close(self) -> None:
        super().close()
        if self._handle is not None:
            self._handle.close()

    def cut(self) -> None:
        """Ends this connection's TCP stream, from any thread (shutdown, not close: the
        descriptors stay their owners'). A thread waiting on it wakes with an error at once."""
        self.cut_at = time.monotonic()
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.shutdown(socket.SHUT_RDWR)


class LeaderPool(psycopg_pool.ConnectionPool):
    """A connection pool that follows the leader of a replicated PostgreSQL, finds it quickly, and
    stops sending work to a server that does not answer.

    - Each new connection is checked to be on the leader: one to a server in recovery (a leader
      demoted in a failover, back as a standby that still answers) is closed, and the pool
      connects again: with a multi-host DATABASE_URL and target_session_attrs=read-write, libpq
      finds the new leader (trying first the hosts that did not just time out: HostOrder). A
      server cannot leave the leader's role without a restart, which ends its sessions, so the
      check holds for the connection's life. (Not behind a pooler such as PgBouncer, whose
      server connection may change under ours: there a demoted server's writes fail with
      ReadOnlySqlTransaction, a 503, until the pooler moves on.)
    - Before a connection is handed out, its socket is looked at without a round trip: a server
      that ended the session (a restart, a failover, pg_terminate_backend, an idle timeout) has
      sent its FATAL message and closed, and the socket is readable. Only then is the round
      trip spent (ON_THE_LEADER), which drops a dead connection and reads anything else a server
      may send between queries (a NOTICE, a changed parameter). So a PostgreSQL restart costs the
      requests in flight at that moment and nothing after, and a busy service pays no query per
      request for it. A connection back in the pool for less than FRESH seconds is not even
      looked at (check_idle_connection).
    - Reconnecting: psycopg_pool doubles its wait after each failed attempt (1, 2, 4, 8 s ...),
      so after a failover of ten seconds the first connection to the new leader came up to 5 s
      after it took writes. Here every retry waits a jittered RETRY_SPACING instead, and all the
      retries of one pool share one schedule, so a pool tries at most about 1/RETRY_SPACING times
      a second however many connections it lost: quick to find a new leader, no flood on a
      server that is down. (The pool's hook for this is schedule_task, which runs its
      maintenance tasks.)
    - Deadlines: a checkout waits for a connection no longer than the context's deadline
      allows, and every connection is a DeadlineConnection.
    - Failing fast: a DatabaseMonitor (started with the pool, ``monitor=True``) probes the server
      on a connection of its own. While its last probe failed, ``connection()`` raises
      DatabaseUnavailable at once: a request gets its 503 in microseconds instead of holding a
      thread for its whole deadline on a server that is not answering, and /health, the other
      requests and the server itself are spared. When its probe times out twice in a row (the
      server accepts connections or holds them open, but does not answer), the idle connections are dropped
      (drain: they all lead to that server), and the connections in use and the LISTEN ones
      (``connect_unpooled``) are cut: the requests waiting on that server get their 503 now
      instead of at their deadlines, and everything reconnects, to the new leader after a
      failover. A request whose connection ran out of time or broke asks the monitor to probe
      at once instead of at its next turn.
    - A commit that PostgreSQL reports as not confirmed by the synchronous standby raises
      UnreplicatedCommit when the connection goes back (``connection()``), instead of passing
      for acknowledged.
    """

    RETRY_SPACING = 0.25
    FRESH = 0.01
    # Waiting for a new connection's leader check: the pool's workers have no other deadline.
    CONFIGURE_SECONDS = 5.0

    def __init__(self, conninfo: str, *, monitor: bool = True, kwargs: dict | None = None, **pool_kwargs):
        self._retry_lock = threading.Lock()
        self._next_retry = 0.0
        self._watched: weakref.WeakSet[psycopg.Connection] = weakref.WeakSet()  # LISTEN connections
        self._in_use: set[psycopg.Connection] = set()  # handed out by connection()
        self._watched_lock = threading.Lock()
        self.monitor = DatabaseMonitor(self) if monitor else None
        self._connect_kwargs = dict(kwargs or {})
        super().__init__(
            conninfo, connection_class=DeadlineConnection, check=self.check_idle_connection, configure=self._configure,
            kwargs=self._connection_kwargs, **pool_kwargs,
        )

    def _connection_kwargs(self) -> dict:
        """The pool's hook for each new connection's arguments: while the monitor says the server
        does not answer, new connections leave out the hosts that just timed out (HostOrder), so
        that after a frozen leader's failover they reach the new one without first waiting out
        the old one; the monitor's probes still try every host."""
        failing = self.monitor is not None and self.monitor.unavailable is not None
        return {**self._connect_kwargs, "skip_slow_hosts": failing}

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        super().open(wait=wait, timeout=timeout)
        if self.monitor is not None:
            self.monitor.start(probe_first=wait)

    def close(self, timeout: float = 5.0) -> None:
        if self.monitor is not None:
            self.monitor.close()
        super().close(timeout=timeout)

    def _configure(self, conn: psycopg.Connection) -> None:
        began = time.monotonic()
        with within(self.CONFIGURE_SECONDS):
            self.check_leader(conn)
        self._watch_commits(conn)
        if self.monitor is not None and time.monotonic() - began < DatabaseMonitor.TIMEOUT:
            self.monitor.leader_answered()  # a quick answer from the leader: proof enough to stop failing fast

    @staticmethod
    def _watch_commits(conn: psycopg.Connection) -> None:
        conn.unreplicated_commits = 0

        def notice(diagnostic: psycopg.errors.Diagnostic) -> None:
            if _is_unreplicated_commit(diagnostic):
                conn.unreplicated_commits += 1

        conn.add_notice_handler(notice)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection]:
        unavailable = self.monitor.unavailable if self.monitor is not None else None
        if unavailable:
            raise DatabaseUnavailable(unavailable)
        at = _DEADLINE.get()
        bound = self.timeout if timeout is None else timeout
        if at is not None:
            left = at - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the deadline passed before a database connection was asked for")
            bound = min(bound, left)
        try:
            with super().connection(timeout=bound) as conn:
                seen = conn.unreplicated_commits
                with self._watched_lock:
                    self._in_use.add(conn)
                try:
                    yield conn
                except psycopg.OperationalError as exc:
                    if getattr(conn, "cut_at", None) is not None and not isinstance(exc, DeadlineExceeded):
                        raise DeadlineExceeded("the database stopped answering (the monitor's probes timed out), and the wait for it was cut short") from None
                    if self.monitor is not None and conn.closed:
                        self.monitor.poke()  # timed out, or the server closed it: look now
                    raise
                finally:
                    with self._watched_lock:
                        self._in_use.discard(conn)
                    if getattr(conn, "cut_at", None) is not None:
                        conn.close()  # cut while it did no I/O: it looks alive, and is not
                    conn.returned_at = time.monotonic()  # before the pool takes it back
                if conn.unreplicated_commits != seen:
                    raise UnreplicatedCommit("the commit was not confirmed by the synchronous standby; retry: a retry finds it if it was kept")
        except psycopg_pool.PoolTimeout:
            if at is not None and time.monotonic() >= at:
                raise DeadlineExceeded(f"no database connection came free within the deadline ({bound:.2f} s)") from None
            raise

    def connect_unpooled(self, application_name: str, skip_slow_hosts: bool = False) -> psycopg.Connection:
        """A connection of its own (the pool's settings, autocommit), for a LISTEN or a probe;
        the caller closes it. Watched: cut when the server stops answering (see the class)."""
        kwargs = {**self._connect_kwargs, "application_name": application_name, "connect_timeout": CONNECT_TIMEOUT_SECONDS}
        conn = DeadlineConnection.connect(self.conninfo, skip_slow_hosts=skip_slow_hosts, **kwargs)
        with self._watched_lock:
            self._watched.add(conn)
        return conn

    def server_unresponsive(self) -> None:
        """The monitor found the server not answering: drop the idle connections, and cut the
        ones in use and the LISTEN ones, so that every wait on that server ends now, not at its
        deadline."""
        self.drain()
        with self._watched_lock:
            for conn in (*self._in_use, *self._watched):
                conn.cut()

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
        system call that gives up the GIL, a tenth of a start's CPU under load, and under load
        a connection comes back every few milliseconds. What that lets through is what the look
        would have missed anyway a moment later: a session that ended within FRESH seconds,
        like one that ends during the request (a 503 the client retries)."""
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


class Listen:
    """A LISTEN connection to the leader on one channel, made again whenever it is lost.

    The billing worker waits on it between passes and the change feed's bell in a thread of its
    own. Its connection is the pool's (LeaderPool.connect_unpooled): cut when the pool's monitor
    finds the server not answering, so that it LISTENs again, on the new leader after a failover.
    """

    CONNECT_DEADLINE_SECONDS = 5
    # Short slices, so that stop is honoured within half a second.
    SLICE_SECONDS = 0.5

    def __init__(self, pool: LeaderPool, channel: str, application_name: str, reconnect_every: float, stop: threading.Event):
        self._pool = pool
        self._channel = channel
        self._application_name = application_name
        self._reconnect_every = reconnect_every
        self._stop = stop
        self._conn: psycopg.Connection | None = None
        self._next_connect = 0.0
        self._failing = False  # said at warning once an outage, not at every try

    @property
    def listening(self) -> bool:
        return self._conn is not None

    def wait(self, seconds: float) -> str | None:
        """Why the wait ended: "notify" (a notification: every one queued is taken, one wake-up
        serves them all), "listen" (a fresh LISTEN: notifications sent while nobody listened are
        lost, so look), "timeout" (``seconds`` passed), or None (stop was set). Without a
        connection it sleeps, trying to LISTEN again every ``reconnect_every`` seconds."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            if self._conn is None:
                if time.monotonic() >= self._next_connect and self._connect():
                    return "listen"
                self._stop.wait(max(0.0, min(remaining, self._next_connect - time.monotonic(), self.SLICE_SECONDS)))
                continue
            try:
                if any(True for _ in self._conn.notifies(timeout=min(remaining, self.SLICE_SECONDS), stop_after=1)):
                    for _ in self._conn.notifies(timeout=0):
                        pass
                    return "notify"
            except psycopg.Error as exc:
                log.warning("listen_connection_lost_polling", channel=self._channel, error=str(exc).strip())
                self.close()
        return None

    def _connect(self) -> bool:
        self._next_connect = time.monotonic() + self._reconnect_every
        try:
            with within(self.CONNECT_DEADLINE_SECONDS):
                self._conn = self._pool.connect_unpooled(self._application_name)
                # A name of ours, never input; spelt bare, as pg_stat_activity then shows it.
                self._conn.execute(f"LISTEN {self._channel}")
        except psycopg.Error as exc:
            log.log(logging.DEBUG if self._failing else logging.WARNING, "cannot_listen_yet_polling", channel=self._channel, error=str(exc).strip())
            self._failing = True
            self.close()
            return False
        if self._failing:
            log.info("listening_again", channel=self._channel)
            self._failing = False
        return True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# Probed by DatabaseMonitor: on the leader (a standby cannot take the services' writes), and the
# tables both services use exist (/ready answers 503 without them).
PROBE = """
SELECT NOT pg_is_in_recovery() AS leader,
       to_regclass('appointments') IS NOT NULL
   AND to_regclass('billing_queue') IS NOT NULL
   AND to_regclass('billing_entries') IS NOT NULL AS schema
"""


@dataclasses.dataclass(frozen=True)
class Health:
    """The monitor's last word: ``up`` None before its first probe."""

    up: bool | None = None
    schema: bool = False
    detail: str = "not probed yet"
    at: float = float("-inf")  # time.monotonic() of the probe


class DatabaseMonitor:
    """Probes the database in a thread of its own, on a connection of its own, every INTERVAL
    seconds (RETRY while it fails): the pool fails fast on its verdict, /ready and the metrics
    read it without touching the database.

    A probe is PROBE within TIMEOUT (plus connecting, CONNECT_TIMEOUT_SECONDS a host, when its
    connection has to be made again). One slow answer may be a busy server; when a second probe
    at once, on a new connection, runs out of time too, the server holds its connections but does
    not answer, and the pool drops its idle connections and cuts the ones in use and its LISTEN
    connections (server_unresponsive). After a probe that worked, the registered readings
    (telemetry's queue gauges) run within READING_TIMEOUT; one that fails is logged and left
    stale, and says nothing of the verdict. ``poke()`` asks for a probe now (a request whose
    connection timed out or broke); ``check`` waits a moment for a fresh one.
    """

    INTERVAL = 0.5
    RETRY = 0.25
    TIMEOUT = 1.0
    READING_TIMEOUT = 2.0
    # How long check() waits for a fresh probe: a healthy server answers in a few milliseconds,
    # and /ready and /metrics must answer within 100 ms whatever the server does.
    CHECK_WAIT = 0.03

    def __init__(self, pool: LeaderPool):
        self._pool = pool
        self._readings: list[Callable[[psycopg.Connection], None]] = []
        self._health = Health()
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()  # one probe at a time
        self._wake = threading.Event()
        self._probed = threading.Condition()
        self._round_began = float("-inf")  # the start of the last probe whose readings are done
        self._closing = False
        self._thread: threading.Thread | None = None
        self._attempts = 0
        self._reused = False  # whether the probe in progress runs on a connection made before
        self._schema_seen: bool | None = None  # by the last probe that worked
        self._down_since = 0.0

    @property
    def health(self) -> Health:
        return self._health

    @property
    def unavailable(self) -> str | None:
        """Why requests should not wait on the database now; None when they may try."""
        health = self._health
        return None if health.up is not False else health.detail

    def add_reading(self, reading: Callable[[psycopg.Connection], None]) -> None:
        """Runs reading(conn) after each probe that worked, within READING_TIMEOUT."""
        self._readings.append(reading)

    def start(self, probe_first: bool = False) -> None:
        if probe_first:
            self.probe()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self._pool.name}-monitor", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            # A probe in progress ends within its bounds: TIMEOUT, and connecting to each host.
            self._thread.join(timeout=self.TIMEOUT + 4 * CONNECT_TIMEOUT_SECONDS)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def poke(self) -> None:
        self._wake.set()

    def check(self, wait: float = CHECK_WAIT) -> Health:
        """A probe (and its readings) newer than now, if one comes within ``wait`` seconds;
        else the last one."""
        asked = time.monotonic()
        self.poke()
        if self._health.up is False and self._thread is not None:
            return self._health  # it was not answering a moment ago: no wait (the probe retries)
        with self._probed:
            self._probed.wait_for(lambda: self._round_began >= asked or self._thread is None, wait)
        if self._thread is None:  # not started (a test's app without the thread): probe here
            return self.probe()
        return self._health

    def leader_answered(self) -> None:
        """A new pooled connection passed its leader check quickly: requests may try again now,
        without waiting for this monitor's own probe (which may be waiting out a host that
        hangs, after a failover)."""
        if self._health.up is False and self._schema_seen is not None:
            self._publish(Health(True, self._schema_seen, "ok: a new connection reached the leader", time.monotonic()))
        self.poke()

    def _run(self) -> None:
        while not self._closing:
            try:
                health = self.probe()
            except Exception:  # noqa: BLE001 - the pool's verdict must not freeze with this thread
                log.exception("database_monitor_failed")
                health = self._health
            self._wake.wait(self.INTERVAL if health.up else self.RETRY)
            self._wake.clear()

    def probe(self) -> Health:
        with self._lock:
            if self._closing and self._thread is not None:
                return self._health
            began = time.monotonic()
            self._attempts += 1
            timed_out = False
            try:
                try:
                    health = self._probe_once(began)
                except psycopg.Error as exc:
                    # Once more at once, on a new connection: a session of its own that ended (a
                    # terminated backend) says little about the server, and a first slow answer
                    # may be a busy server's.
                    if not self._retry_worth(exc):
                        raise
                    timed_out = isinstance(exc, DeadlineExceeded)
                    health = self._probe_once(began)
            except psycopg.Error as exc:
                # Out of time, then no fresh answer either (out of time again, or no host would
                # take a new connection): the server holds its connections and answers nothing.
                if timed_out or isinstance(exc, (DeadlineExceeded, psycopg.errors.ConnectionTimeout)):
                    if self._publish(self._failed(began, f"the database does not answer ({str(exc).strip()})")):
                        self._pool.server_unresponsive()  # once, as it stops answering
                elif self._publish(self._failed(began, f"the database is unavailable ({exc.__class__.__name__}: {str(exc).strip()})")):
                    self._pool.drain()  # its idle connections died with it (a restart)
            else:
                self._publish(health)
                if health.up and health.schema:
                    self._read()
            with self._probed:
                self._round_began = max(self._round_began, began)
                self._probed.notify_all()
            return self._health

    def _retry_worth(self, exc: psycopg.Error) -> bool:
        """Whether a second attempt at once says more: yes when the first ran on a connection
        made before (it may be that session, not the server), or ran out of time (it may be a
        busy server). A connection just made and refused: no."""
        return self._reused or isinstance(exc, DeadlineExceeded)

    def _probe_once(self, began: float) -> Health:
        self._reused = self._conn is not None and not self._conn.closed
        with within(self.TIMEOUT):
            if not self._reused:
                # While it fails, every other attempt leaves out the hosts that just timed out:
                # after a frozen leader's failover, the new one is found at the next turn
                # instead of after waiting out the old one's connect timeout.
                skip = self._health.up is False and self._attempts % 2 == 0
                self._conn = self._pool.connect_unpooled(f"{self._pool.name}-monitor", skip_slow_hosts=skip)
            try:
                leader, schema = self._conn.execute(PROBE).fetchone()
            except psycopg.Error:
                self._conn.close()
                self._conn = None
                raise
        if not leader:
            raise psycopg.OperationalError("the server is in recovery (a standby): not the leader")
        self._schema_seen = bool(schema)
        return Health(True, bool(schema), "ok" if schema else "the tables are missing; apply schema.sql", began)

    def _read(self) -> None:
        """The readings, within READING_TIMEOUT: one that fails (a slow count on a huge backlog, a
        grant missing after a bad deploy) is logged and left stale."""
        for reading in self._readings:
            try:
                with within(self.READING_TIMEOUT):
                    reading(self._conn)
            except psycopg.Error as exc:
                log.warning("database_reading_failed", error=f"{exc.__class__.__name__}: {str(exc).strip()}")
                if self._conn.closed:
                    self._conn = None
                    return

    def _failed(self, began: float, detail: str) -> Health:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        return Health(False, False, detail, began)

    def _publish(self, health: Health) -> bool:
        """Makes ``health`` the verdict, unless a newer one came in meanwhile; True when that
        turned it from answering (or not probed yet) to not."""
        with self._probed:
            before = self._health
            if health.at < before.at:
                return False  # begun before a newer word (leader_answered) came in: stale
            self._health = health
        newly_down = health.up is False and before.up is not False
        if newly_down:
            self._down_since = health.at
            log.warning("database_unavailable_failing_fast", detail=health.detail)
        elif health.up and before.up is False:
            log.info("database_available_again", detail=health.detail, down_s=round(health.at - self._down_since, 3))
        return newly_down


def server_has_spoken(conn: psycopg.Connection) -> bool:
    """Whether anything (or the end of the stream) waits to be read on an idle connection's
    socket; no round trip. poll(), not select(): a service's descriptors may pass 1,024."""
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


# A connection attempt to a host that accepts TCP but does not answer gives up after this long
# (psycopg, like libpq, takes no less than 2 s), and then tries the next host.
CONNECT_TIMEOUT_SECONDS = 2

# libpq's TCP settings for every connection, so that a server cut off by the network (its packets
# dropped, nothing closing the connection) is noticed without waiting for TCP's own 15 minutes:
# an idle connection (a LISTEN) sends a keepalive probe after 5 s of silence, then every 2 s, and
# is dropped after 3 unanswered (11 s); data sent and not acknowledged for 11 s drops it too
# (tcp_user_timeout, in milliseconds; Linux). Deadlines usually end a wait long before. A frozen
# server's kernel still acknowledges both, which is what the deadlines and the monitor are for.
TCP_SETTINGS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3, "tcp_user_timeout": 11000}


def make_pool(config: Config, name: str, max_size: int = 10, monitor: bool = True, **session: str) -> LeaderPool:
    """A pool that is not opened yet (no I/O here); the caller opens it, which starts its monitor
    (``monitor=False`` for a one-shot command). ``session`` holds server settings for every
    connection (e.g. idle_in_transaction_session_timeout)."""
    options = " ".join(f"-c {key}={value}" for key, value in session.items())
    return LeaderPool(
        config.database_url,
        monitor=monitor,
        # min < max so that a pool that gave up reconnecting after a long outage grows again.
        min_size=1,
        max_size=max_size,
        kwargs={
            "autocommit": True, "application_name": name, "options": options,
            "connect_timeout": CONNECT_TIMEOUT_SECONDS, **TCP_SETTINGS,
        },
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
