"""Telemetry: JSON logs, Prometheus metrics, and the Falcon middleware that feeds both per request.

- ``setup_logging`` makes every log line, ours and the libraries', one JSON object on stderr
  (``LOG_FORMAT=console`` for a person at a terminal), with ``ts``, ``level``, ``service``,
  ``event`` and, inside a request, its ``request_id``.
- ``ApiMetrics`` and ``WorkerMetrics`` hold one service's metrics in a registry of its own (so a
  test can build many apps in one process); ``/metrics`` serves it (``MetricsResource``).
- ``QueueCollector`` and ``BackupCollector`` show the billing queue's gauges and those of WAL
  archiving and base backups, which the pool's monitor reads.
- ``RequestTelemetry`` gives every request its id, one log line and its HTTP metrics.

Every metric name starts with ``clinic_``; docs/operations.md says what each one means.
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
import uuid

import falcon
import orjson
import prometheus_client as prom
import psycopg
import psycopg_pool
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Counters without their *_created twins: half the series, and nothing here needs them.
prom.disable_created_metrics()

# ---------------------------------------------------------------------------------------------
# Logs.


def setup_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Our structlog lines and the libraries' stdlib ones (waitress, psycopg's pool), rendered alike.

    Ours skip stdlib logging altogether (a filtering logger that writes the rendered line to
    stderr): that path costs a few microseconds a line, which matters at one line per request.
    """

    def add_service(logger, method_name, event_dict):
        event_dict.setdefault("service", service)
        return event_dict

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
    if fmt == "console":
        render = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
        ours, theirs = structlog.WriteLoggerFactory(sys.stderr), render
    else:
        render = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=orjson.dumps, default=str)]
        # orjson gives bytes: ours go to the byte stream, the stdlib's through a str renderer.
        ours = structlog.BytesLoggerFactory(sys.stderr.buffer)
        theirs = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(default=str)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _logger_name,
            timestamper,
            add_service,
            *render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=ours,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
                add_service,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *theirs],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # waitress warns "Task queue depth is N" for every request that waits for a thread: a line per
    # request exactly when the service is busiest. The latency histogram shows the same thing.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def get_logger(name: str):
    """A structlog logger whose lines say which module wrote them (``logger``, as the stdlib
    lines do; structlog reserves that keyword, hence the rename in ``_logger_name``)."""
    return structlog.get_logger(logger_name=name)


def _logger_name(logger, method_name, event_dict):
    if "logger_name" in event_dict:
        event_dict["logger"] = event_dict.pop("logger_name")
    return event_dict


REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID when it is 1-128 of [A-Za-z0-9._:-], else a new UUID."""
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header
    # A label for finding log lines, not a secret (a caller may send any id it likes): drawn from
    # `random`, seeded from the OS once, rather than from os.urandom, a system call per request.
    return str(uuid.UUID(int=random.getrandbits(128), version=4))


log = get_logger("clinic.http")

# ---------------------------------------------------------------------------------------------
# Metrics.

# 1 ms to 5 s: an end is a few ms; the alert on the API's p99 sits at 250 ms.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One service's registry: process metrics, the HTTP metrics, the queue's and the backups' gauges."""

    def __init__(self, service: str, pool: psycopg_pool.ConnectionPool | None = None):
        self.service = service
        self.registry = prom.CollectorRegistry(auto_describe=True)
        prom.ProcessCollector(registry=self.registry)
        prom.PlatformCollector(registry=self.registry)
        prom.GCCollector(registry=self.registry)
        self.http_requests = prom.Counter(
            "clinic_http_requests", "HTTP requests answered, by route template and status.",
            ["service", "route", "method", "status"], registry=self.registry,
        )
        self.http_duration = prom.Histogram(
            "clinic_http_request_duration_seconds", "Time from the request reaching the app to its response.",
            ["service", "route", "method"], buckets=HTTP_BUCKETS, registry=self.registry,
        )
        if getattr(pool, "monitor", None) is not None:  # not for a one-shot command's pool
            self.registry.register(QueueCollector(pool))
            self.registry.register(BackupCollector(pool))


class ApiMetrics(Metrics):
    def __init__(self, pool: psycopg_pool.ConnectionPool | None = None):
        super().__init__("appointments", pool)
        self.appointments_started = prom.Counter(
            "clinic_appointments_started", "Appointments started (not repeats of a start).", registry=self.registry
        )
        self.appointments_ended = prom.Counter(
            "clinic_appointments_ended", "Appointments ended, each queueing one charge (not repeats).", registry=self.registry
        )


class WorkerMetrics(Metrics):
    CHARGE_OUTCOMES = ("billed", "retried", "failed")
    WAKE_REASONS = ("notify", "poll", "listen")

    def __init__(self, pool: psycopg_pool.ConnectionPool | None = None, poll_seconds: float | None = None):
        super().__init__("billing-worker", pool)
        r = self.registry
        self.charges = prom.Counter("clinic_billing_charges", "What this worker did to charges.", ["outcome"], registry=r)
        self.batch_duration = prom.Histogram(
            "clinic_billing_batch_duration_seconds", "One claim-and-bill transaction.", buckets=BATCH_BUCKETS, registry=r
        )
        self.wakeups = prom.Counter("clinic_billing_wakeups", "Why a billing pass started.", ["reason"], registry=r)
        self.last_pass = prom.Gauge(
            "clinic_billing_last_pass_timestamp_seconds", "When this worker last finished a batch or pass without error.", registry=r
        )
        self.poll_interval = prom.Gauge(
            "clinic_billing_poll_interval_seconds", "BILLING_POLL_SECONDS: the longest wait between passes.", registry=r
        )
        # Every label value from the start, so that rate() sees the first increment.
        for outcome in self.CHARGE_OUTCOMES:
            self.charges.labels(outcome)
        for reason in self.WAKE_REASONS:
            self.wakeups.labels(reason)
        if poll_seconds is not None:
            self.poll_interval.set(poll_seconds)
        # Start-up counts as a pass: a worker that never manages one is stalled 3 polls from now,
        # not since 1970.
        self.last_pass.set_to_current_time()


# Index-served however large the ledger grows: billing_queue_due gives the pending count and the
# oldest due row (the min of its first column), billing_queue_failed the failed count; billed
# rows, nearly all of them, are in neither index.
QUEUE_STATS = """
SELECT (SELECT count(*) FROM billing_queue WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM billing_queue WHERE status = 'failed') AS failed,
       coalesce((SELECT extract(epoch FROM now() - min(available_at))
                 FROM billing_queue WHERE status = 'pending' AND available_at <= now()), 0) AS oldest_due_age
"""


class MonitorReading(Collector):
    """Gauges read from the database by the pool's monitor (db.DatabaseMonitor runs ``QUERY``
    after each probe that worked), never by the scraping thread: a scrape asks for a fresh probe
    and waits DatabaseMonitor.CHECK_WAIT for it at most (a few milliseconds on a healthy server),
    else shows the last one. So /metrics answers at once while the database hangs, and says so."""

    QUERY = ""
    # Older than this, the monitor is stuck (it probes every second at most, connecting included):
    # no value is better than a stale one.
    STALE_SECONDS = 10.0

    def __init__(self, pool):
        self._monitor = pool.monitor
        self._row: tuple | None = None
        self._monitor.add_reading(self._read)

    def _read(self, conn: psycopg.Connection) -> None:
        self._row = conn.execute(self.QUERY).fetchone()

    def fresh_row(self) -> tuple | None:
        """The last row read, if the database answered the last probe recently, else None."""
        health = self._monitor.check()
        fresh = time.monotonic() - health.at <= self.STALE_SECONDS
        return self._row if health.up and health.schema and fresh else None

    def describe(self):
        return []  # dynamic


class QueueCollector(MonitorReading):
    """The queue's gauges and clinic_db_up."""

    QUERY = QUEUE_STATS

    def collect(self):
        stats = self.fresh_row()
        yield GaugeMetricFamily(
            "clinic_db_up", "1 when the database answered the monitor's last probe, with the schema there, else 0.", value=int(stats is not None)
        )
        if stats is None:
            return
        pending, failed, oldest = stats
        rows = GaugeMetricFamily("clinic_billing_queue_rows", "Charges in the queue by status.", labels=["status"])
        rows.add_metric(["pending"], pending)
        rows.add_metric(["failed"], failed)
        yield rows
        yield GaugeMetricFamily(
            "clinic_billing_oldest_pending_age_seconds", "How long the oldest due pending charge has been due; 0 when none.",
            value=float(oldest),
        )


# What protects the data beyond the replicas: WAL archiving (pg_stat_archiver, PostgreSQL's own
# record of its archive_command) and the newest base backup (base_backups, which the backup
# service fills from pgBackRest's info). Ages come from the database's clock, as the queue's do.
# Archiving is "failing" when its last attempt failed and none succeeded since: PostgreSQL retries
# a segment until it goes, so this stays 1 until the cause is fixed.
BACKUP_STATS = """
SELECT current_setting('archive_mode') <> 'off' AS archiving,
       a.archived_count, a.failed_count,
       coalesce(a.last_failed_time > coalesce(a.last_archived_time, '-infinity'), false) AS failing,
       extract(epoch FROM now() - a.last_archived_time) AS archived_age,
       (SELECT extract(epoch FROM now() - max(stopped_at)) FROM base_backups) AS backup_age
FROM pg_stat_archiver a
"""


class BackupCollector(MonitorReading):
    """WAL archiving and base backups: what the ClinicWalArchivingFailing and
    ClinicNoRecentBaseBackup alerts read. An age with nothing to measure from (no segment
    archived yet, no backup recorded) is left out."""

    QUERY = BACKUP_STATS

    def collect(self):
        stats = self.fresh_row()
        if stats is None:
            return
        archiving, archived, failed, failing, archived_age, backup_age = stats
        yield GaugeMetricFamily(
            "clinic_wal_archiving_enabled", "1 when the server archives its WAL (archive_mode is not off), else 0.", value=int(archiving)
        )
        yield CounterMetricFamily(
            "clinic_wal_archived_segments", "WAL segments (and history files) archived since the server's statistics were reset.", value=archived
        )
        yield CounterMetricFamily(
            "clinic_wal_archive_failures", "Failed attempts to archive a WAL segment since the server's statistics were reset.", value=failed
        )
        yield GaugeMetricFamily(
            "clinic_wal_archive_failing", "1 when the last attempt to archive a WAL segment failed and none succeeded since, else 0.",
            value=int(failing),
        )
        if archived_age is not None:
            yield GaugeMetricFamily(
                "clinic_wal_last_archived_age_seconds", "Seconds since a WAL segment was last archived.", value=float(archived_age)
            )
        if backup_age is not None:
            yield GaugeMetricFamily(
                "clinic_base_backup_age_seconds", "Seconds since the newest recorded base backup finished (table base_backups).",
                value=float(backup_age),
            )


class MetricsResource:
    """/metrics: the Prometheus text format; no token, no personal data."""

    def __init__(self, registry: prom.CollectorRegistry):
        self._registry = registry

    def on_get(self, req, resp):
        resp.content_type = prom.CONTENT_TYPE_LATEST
        resp.data = prom.generate_latest(self._registry)

    on_head = on_get


# ---------------------------------------------------------------------------------------------
# The middleware.


class RequestTelemetry:
    """Falcon middleware: a request id, one log line and the HTTP metrics for every request."""

    # Probes and scrapes come every few seconds; their lines would drown the rest at INFO.
    QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        self._series: dict[tuple[str, str, int], tuple] = {}  # label lookups, once per label set

    def process_request(self, req, resp):
        req.context.started = time.perf_counter()
        req.context.request_id = request_id_from(req.get_header(REQUEST_ID_HEADER))
        # Every line logged while serving this request carries its id (cleared at its end: waitress
        # threads serve one request after another).
        structlog.contextvars.bind_contextvars(request_id=req.context.request_id)

    def process_response(self, req, resp, resource, req_succeeded):
        elapsed = time.perf_counter() - req.context.started
        resp.set_header(REQUEST_ID_HEADER, req.context.request_id)
        # Label values from a closed set: the URI template, never a raw path with its ids.
        route = req.uri_template or "unmatched"
        method = req.method if req.method in falcon.COMBINED_METHODS else "other"
        status = resp.status_code
        series = self._series.get((route, method, status))
        if series is None:
            m = self._metrics
            series = self._series[route, method, status] = (
                m.http_requests.labels(m.service, route, method, str(status)),
                m.http_duration.labels(m.service, route, method),
            )
        series[0].inc()
        series[1].observe(elapsed)
        level = logging.DEBUG if route in self.QUIET_ROUTES and status < 400 else logging.INFO
        # The path only of a matched route (its ids): an unmatched one is whatever a client sent.
        log.log(level, "request", method=req.method, route=route, path=req.path if req.uri_template else None,
                status=status, duration_ms=round(elapsed * 1000, 3))
        structlog.contextvars.clear_contextvars()
