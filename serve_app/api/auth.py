"""Who may call the admin API (`/api/v1/...`): holders of $LLM_ROUTER_ADMIN_TOKEN, and no one
when it is unset (the endpoints answer 503 rather than run open).

A token shorter than MIN_ADMIN_TOKEN_CHARS is refused at start (guessable), and failed attempts
are throttled per client address and in all (`AdminThrottle`), so the token cannot be guessed
at line rate. Pure: no HTTP, no Ray.
"""

from __future__ import annotations

import hmac
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping

from serve_app.core.config import ConfigError
from serve_app.core.errors import RouterError

ADMIN_TOKEN_ENV = "LLM_ROUTER_ADMIN_TOKEN"
MIN_ADMIN_TOKEN_CHARS = 32
MAKE_A_TOKEN = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def admin_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """$LLM_ROUTER_ADMIN_TOKEN; None when unset or empty (the admin API is off). ConfigError
    (one line, never the token itself) when it is too short to resist guessing."""
    token = environ.get(ADMIN_TOKEN_ENV) or None
    if token is not None and len(token) < MIN_ADMIN_TOKEN_CHARS:
        reason = (
            f"{len(token)} characters, at least {MIN_ADMIN_TOKEN_CHARS} are needed "
            f"(make one with: {MAKE_A_TOKEN})"
        )
        raise ConfigError(ADMIN_TOKEN_ENV, [("$", reason)], "setting")
    return token


def admin_refusal(authorization: str | None, expected: str | None) -> RouterError | None:
    """None when `authorization` carries the admin token; else the error to answer with."""
    if not expected:
        return RouterError(
            503,
            f"the admin API is disabled: set {ADMIN_TOKEN_ENV} in the router's environment",
            type="api_error",
            code="admin_disabled",
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return RouterError(
            401,
            "the admin API needs an `Authorization: Bearer <token>` header",
            type="authentication_error",
            code="missing_admin_token",
            headers={"www-authenticate": "Bearer"},
        )
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        return RouterError(
            403, "wrong admin token", type="permission_error", code="invalid_admin_token"
        )
    return None


def client_address(forwarded_for: list[str], peer: str | None) -> str:
    """The caller's address: the last `X-Forwarded-For` value (the one Serve's HAProxy appends
    under serve-router-haproxy's `option forwardfor`; earlier ones are the client's own word),
    else the connection's peer."""
    for header in reversed(forwarded_for):
        last = header.rsplit(",", 1)[-1].strip()
        if last:
            return last
    return peer or "unknown"


class AdminThrottle:
    """Failed admin attempts (wrong tokens) in a sliding window: after `per_client` from one
    address, or `overall` from all, within `window_s` seconds, admin calls from that address
    (or from all) answer 429 with Retry-After until the oldest failure leaves the window.

    Attempts refused here are not checked, so they neither count nor reveal anything; memory
    holds at most `overall` failures (addresses past the window are dropped)."""

    def __init__(
        self,
        per_client: int = 10,
        overall: int = 100,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_client = per_client
        self.overall = overall
        self.window_s = window_s
        self._clock = clock
        self._all: deque[tuple[float, str]] = deque()
        self._by_client: dict[str, deque[float]] = {}

    def _expire(self, now: float) -> None:
        while self._all and self._all[0][0] <= now - self.window_s:
            _, client = self._all.popleft()
            times = self._by_client[client]
            times.popleft()
            if not times:
                del self._by_client[client]

    def refusal(self, client: str) -> RouterError | None:
        """The 429 to answer `client` with while it (or everyone) is throttled; else None."""
        now = self._clock()
        self._expire(now)
        mine = self._by_client.get(client, ())
        if len(mine) >= self.per_client:
            oldest = mine[0]
        elif len(self._all) >= self.overall:
            oldest = self._all[0][0]
        else:
            return None
        retry_after = max(1, math.ceil(oldest + self.window_s - now))
        return RouterError(
            429,
            f"too many failed admin attempts; retry in {retry_after} s",
            type="rate_limit_error",
            code="admin_throttled",
            headers={"retry-after": str(retry_after)},
        )

    def failed(self, client: str) -> None:
        """Count a wrong token from `client`."""
        now = self._clock()
        self._expire(now)
        self._all.append((now, client))
        self._by_client.setdefault(client, deque()).append(now)
