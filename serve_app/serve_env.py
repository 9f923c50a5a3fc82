"""Ray Serve settings for a low-overhead request path (see shared/ray-serve-measurements.md).

They are read by the Serve processes when Ray starts, so they must be in the environment of
whatever starts Ray (`ray start`, or the driver before `ray.init`), and before `ray.serve` is
imported in the driver.
"""

from __future__ import annotations

import os

FAST_SERVE_ENV = {
    # HAProxy takes HTTP straight to the ingress replicas instead of the Python proxy actor.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # gRPC handles, user code on the replica's main loop, no per-request stderr logging.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}


def apply_fast_serve_env() -> None:
    """Set the fast settings unless the operator set them already."""
    for key, value in FAST_SERVE_ENV.items():
        os.environ.setdefault(key, value)
