"""Configuration: the one place that reads the environment (12-factor), and the money constants.

Bearer tokens are kept only as SHA-256 digests from here on (API_TOKENS, API_TOKENS_FILE).

``Config.from_env`` turns environment variables into a frozen ``Config``; everything else is
handed a ``Config``. Tests build one directly.
"""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
import os
import re
import sys
from typing import Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Largest value a NUMERIC(12,2) column holds.
MAX_MONEY = decimal.Decimal("9999999999.99")
CENTS = decimal.Decimal("0.01")

# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# A guessable token is no protection: secrets.token_urlsafe(32) gives 43 characters.
MIN_TOKEN_LENGTH = 32
_HASHED_TOKEN = re.compile(r"sha256:([0-9a-fA-F]{64})")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("json", "console")


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


def _seconds(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip() or str(default)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:  # NaN fails too
        raise ConfigError(f"{name} must be a number of seconds from {low:g} to {high:g}, got {raw!r}")
    return value


def _token_hashes(items, source: str) -> list[str]:
    """Each item a token, or sha256:<64 hex> of one; returns the SHA-256 hex digests."""
    hashes = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        hashed = _HASHED_TOKEN.fullmatch(item)
        if hashed:
            hashes.append(hashed.group(1).lower())
        elif BEARER_TOKEN.fullmatch(item) and len(item) >= MIN_TOKEN_LENGTH:
            hashes.append(hashlib.sha256(item.encode()).hexdigest())
        else:
            # The item itself stays out of the message: it may be a secret with a typo.
            raise ConfigError(
                f"{source}: an item is neither a bearer token ({MIN_TOKEN_LENGTH} or more letters, digits and -._~+/) nor sha256:<64 hex>"
            )
    return hashes


def _api_tokens(env: Mapping[str, str]) -> tuple[str, ...]:
    hashes = _token_hashes(env.get("API_TOKENS", "").split(","), "API_TOKENS")
    if env.get("API_TOKENS", "").strip() and not hashes:
        # Set, yet no token in it: a deployment meant to be closed would start open.
        raise ConfigError("API_TOKENS: set but holds no token")
    path = env.get("API_TOKENS_FILE", "").strip()
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"API_TOKENS_FILE: cannot read {path!r} ({exc.__class__.__name__})") from None
        from_file = _token_hashes(lines, "API_TOKENS_FILE")
        if not from_file:
            raise ConfigError(f"API_TOKENS_FILE: {path!r} holds no token")
        hashes += from_file
    return tuple(dict.fromkeys(hashes))


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...], fold=str.lower) -> str:
    value = fold(env.get(name, "").strip()) or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
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
    # LISTEN for the API's NOTIFY (off: poll only; for a connection on which LISTEN hears nothing,
    # such as one through a pooler in transaction mode, which needs more than this: docs/scaling.md).
    listen: bool = True
    # Rows per transaction of the worker. Each claim steps over the dead entries that billed rows
    # left in billing_queue_due since the last VACUUM, so a drain in fewer, larger batches walks
    # them fewer times; past 5,000 a drain is no faster (docs/performance.md), and a batch of 5,000
    # is one transaction of about 0.1-0.2 s.
    batch_size: int = 5000
    max_attempts: int = 10
    # Requests that may wait on the change feed at once (each holds a waitress thread meanwhile).
    feed_max_waiters: int = 8
    # A request's database work ends this long after its arrival (waiting for a thread or a pooled
    # connection counts), else it is a 503 with Retry-After; web.Deadlines. Above clinic_api's 5 s
    # statement_timeout, so that a slow statement begun within 3 s of the arrival is ended by the
    # server first, cleanly, and below the edge's 10 s `timeout server`
    # (deploy/haproxy/haproxy.cfg), so that the API answers first.
    request_timeout: float = 8.0
    log_level: str = "INFO"
    log_format: str = "json"
    # SHA-256 hex digests of the accepted bearer tokens; empty: the service is open.
    api_token_hashes: tuple[str, ...] = ()
    # For `python db.py apply-schema` only: the passwords it gives the services' database roles
    # (None: leave as they are). Kept out of repr, so out of any traceback or log line.
    api_role_password: str | None = dataclasses.field(default=None, repr=False)
    worker_role_password: str | None = dataclasses.field(default=None, repr=False)

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
        return cls(
            database_url=env.get("DATABASE_URL", "").strip() or cls.database_url,
            appointments_port=_int(env, "APPOINTMENTS_PORT", cls.appointments_port, 1, 65535),
            billing_port=_int(env, "BILLING_PORT", cls.billing_port, 1, 65535),
            hourly_rate=rate.quantize(CENTS),
            timezone=tz,
            poll_seconds=_seconds(env, "BILLING_POLL_SECONDS", cls.poll_seconds, 0.05, 3600),
            listen=_choice(env, "BILLING_LISTEN", "on", ("on", "off")) == "on",
            batch_size=_int(env, "BILLING_BATCH_SIZE", cls.batch_size, 1, 10000),
            max_attempts=_int(env, "BILLING_MAX_ATTEMPTS", cls.max_attempts, 1, 1000),
            feed_max_waiters=_int(env, "BILLING_FEED_MAX_WAITERS", cls.feed_max_waiters, 0, 256),
            request_timeout=_seconds(env, "REQUEST_TIMEOUT_SECONDS", cls.request_timeout, 0.1, 600),
            log_level=_choice(env, "LOG_LEVEL", cls.log_level, LOG_LEVELS, fold=str.upper),
            log_format=_choice(env, "LOG_FORMAT", cls.log_format, LOG_FORMATS),
            api_token_hashes=_api_tokens(env),
            api_role_password=env.get("CLINIC_API_PASSWORD") or None,
            worker_role_password=env.get("CLINIC_WORKER_PASSWORD") or None,
        )


def load_config_or_exit() -> Config:
    try:
        return Config.from_env()
    except ConfigError as exc:
        sys.exit(f"configuration error: {exc}")
