"""What the ingress checks on a request's head before anything else (pure): the Host it names
and the type of the body it carries.

A browser page can make a visitor's browser send requests to a router on loopback: a form POST
(`text/plain`, a form encoding) or a `fetch` of a typeless body needs no CORS preflight, and a
DNS name rebound to 127.0.0.1 makes the page same-origin with the router. Requiring JSON and,
on loopback, a loopback Host refuses both.
"""

from __future__ import annotations

from collections.abc import Iterable

from serve_app.core.errors import RouterError, quoted

# The names a client on this machine reaches a loopback router by (any port).
LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
# Methods whose body is parsed as JSON.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_loopback(address: str) -> bool:
    """Whether a listening address (`--host`) reaches only this machine."""
    return address.strip("[]").lower() in LOOPBACK_HOSTS or address.startswith("127.")


def host_name(host: str) -> str:
    """A Host header's name, without its port or an IPv6 literal's brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_refusal(host: str | None, allowed: Iterable[str] | None) -> RouterError | None:
    """None when `allowed` is None (no check) or the Host names one of them; else a 421."""
    if allowed is None:
        return None
    if host is not None and host_name(host) in allowed:
        return None
    return RouterError(
        421,
        f"this router answers only requests addressed to {', '.join(allowed)}; "
        f"got Host {quoted(host or '')}",
        code="host_not_allowed",
    )


def json_type(content_type: str | None) -> bool:
    """Whether a Content-Type is JSON: `application/json`, parameters (charset) allowed."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json"


def content_type_refusal(
    method: str, content_type: str | None, has_body: bool
) -> RouterError | None:
    """None unless a request with a body is not JSON: 415 (a body-less POST, e.g. a cancel,
    needs no type)."""
    if method not in BODY_METHODS or not has_body or json_type(content_type):
        return None
    return RouterError(
        415,
        f"the body must be JSON (Content-Type: application/json); got {quoted(content_type or '')}",
        code="unsupported_media_type",
        param="content-type",
    )
