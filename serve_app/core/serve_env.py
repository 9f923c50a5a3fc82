"""Ray Serve settings for a low-overhead request path (docs/performance.md has what they save).

They are read by the Serve processes when Ray starts, so they must be in the environment of
whatever starts Ray (`ray start`, or the driver before `ray.init`), and before `ray.serve` is
imported in the driver.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from serve_app.local.loopback import LOOPBACK_ENV

# Both deployments are I/O-bound proxies, so they reserve only a sliver of a core (many model
# types fit on a small node). A fraction rather than 0: measured here, num_cpus=0 replicas
# answered ~1 ms slower at concurrency 1 (4.3 vs 3.3 ms p50).
REPLICA_CPUS = 0.1

FAST_SERVE_ENV = {
    # HAProxy takes HTTP straight to the ingress replicas instead of the Python proxy actor.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # gRPC handles, user code on the replica's main loop, no per-request stderr logging.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ...but write each log record at once: that mode holds 1000 records in memory (a failover
    # warning could wait for hours). The router logs nothing per request on the happy path.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # HAProxy drops a client silent this long while it owes bytes (its request, or reading its
    # answer); Serve's default is an hour. A live stream is never cut by it: while the client
    # waits on the server only `timeout server` (unset: none) runs. Its headers must arrive
    # within serve-router-haproxy's `timeout http-request` (serve_app/local/haproxy.py).
    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "60",
}


# Single-node only (`make run`, tests, bench); clusters keep Serve's defaults.
LOCAL_SERVE_ENV = {
    # A stopping ingress replica stays registered this long so HAProxy stops sending it new
    # requests first (Serve's default is 30 s, which made every local shutdown take 30 s). 1 s
    # was too short: HAProxy still sent a few new requests to the stopping replica during a
    # redeploy under load (3 of ~1800 cut in tests/test_drain.py); 5 s cut none.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # Ray then takes 127.0.0.1 as the node's address, and its GCS, raylet, dashboard agent and
    # every worker's gRPC server listen there instead of on all interfaces. (The variable is
    # named for Ray's single-node mode on Windows and macOS; on Linux it changes only the node
    # address and `ray start`'s cluster check.)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # ...and each replica's inter-deployment gRPC server (serve_app/local/loopback.py).
    LOOPBACK_ENV: "1",
    # HAProxy's access log goes to a UDP syslog target by default, from a socket bound on every
    # interface (nothing listens on 127.0.0.1:514 here): a unix socket that nobody binds drops
    # the line at once instead, with no socket open.
    "RAY_SERVE_HAPROXY_LOG_TARGET": os.path.join(
        tempfile.gettempdir(), "serve-router-haproxy.log.sock"
    ),
}
# Serve's HAProxy binds its stats and Prometheus frontends on every interface; this wrapper
# (serve_app/local/haproxy.py, installed with the package) moves them to loopback.
HAPROXY_WRAPPER = Path(sys.executable).parent / "serve-router-haproxy"
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"


def apply_fast_serve_env(*, single_node: bool = False) -> None:
    """Set the fast settings (and the single-node ones if asked) unless already set."""
    env = {**FAST_SERVE_ENV, **(LOCAL_SERVE_ENV if single_node else {})}
    if single_node and HAPROXY_WRAPPER.exists():
        env[HAPROXY_BINARY_ENV] = str(HAPROXY_WRAPPER)
    for key, value in env.items():
        os.environ.setdefault(key, value)
