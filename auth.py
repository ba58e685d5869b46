"""Access control: bearer tokens (RFC 6750), checked by a Falcon middleware before a resource runs,
and the response headers that keep personal data out of caches.

The tokens come from ``Config.api_token_hashes`` (SHA-256 digests; a plain token is never kept).
With none configured the service is open, as a local try wants, and says so at start.
"""

from __future__ import annotations

import hashlib
import hmac

from config import BEARER_TOKEN
from web import Problem

# Probes, scrapes and the API document: what orchestrators and monitoring reach without a token.
OPEN_ROUTES = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})
REALM = 'Bearer realm="clinic-billing"'


class BearerAuth:
    """Falcon middleware: every route but OPEN_ROUTES needs ``Authorization: Bearer <token>``.

    It runs after routing and before the resource (``process_resource``), so a refused request
    has not had its body read nor touched the database; unknown paths are 404 as before.
    """

    def __init__(self, token_hashes: tuple[str, ...]):
        self._digests = tuple(bytes.fromhex(h) for h in token_hashes)

    def process_resource(self, req, resp, resource, params):
        if not self._digests or req.uri_template in OPEN_ROUTES:
            return
        scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            raise Problem(401, "Authorization: send 'Bearer <token>'", {"WWW-Authenticate": REALM})
        if not self._accepts(token.strip()):
            # The token itself never goes into a message or a log line.
            raise Problem(401, "Authorization: the bearer token is not valid", {"WWW-Authenticate": f'{REALM}, error="invalid_token"'})

    def _accepts(self, token: str) -> bool:
        if not BEARER_TOKEN.fullmatch(token):
            return False
        digest = hashlib.sha256(token.encode()).digest()
        # Compared with every configured digest, never stopping early: the time taken says
        # nothing about which token, or how much of one, matched.
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        return matched


def guards(token_hashes: tuple[str, ...]) -> list:
    """The access middleware for ``web.base_app``, in order."""
    return [NoStore(), BearerAuth(token_hashes)]


def warn_if_open(log, token_hashes: tuple[str, ...]) -> None:
    if not token_hashes:
        log.warning("no_api_tokens_service_is_open", variable="API_TOKENS", hint="set API_TOKENS or API_TOKENS_FILE")


class NoStore:
    """Falcon middleware: responses may carry patient and money data, so no cache keeps them
    (``Cache-Control: no-store``), and no browser second-guesses their media type (``nosniff``)."""

    def process_response(self, req, resp, resource, req_succeeded):
        resp.set_header("X-Content-Type-Options", "nosniff")
        if req.uri_template not in OPEN_ROUTES:
            resp.set_header("Cache-Control", "no-store")
