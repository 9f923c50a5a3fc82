"""Serve replicas' own gRPC listener on loopback, for single-node runs.

Each Serve replica opens an inter-deployment gRPC server (the handle path under
`RAY_SERVE_THROUGHPUT_OPTIMIZED`) on `[::]:0`, every interface, and ray 2.60 has no setting
for it. On one machine (`LOOPBACK_ENV` set, where Ray's node address is 127.0.0.1 too) the
replica binds it to 127.0.0.1 instead; callers reach it at the node's address, which is that.
"""

from __future__ import annotations

import os
from typing import Any

LOOPBACK_ENV = "SERVE_ROUTER_LOOPBACK_ONLY"
_ALL_INTERFACES = "[::]:"


def loopback_only() -> bool:
    return os.environ.get(LOOPBACK_ENV) == "1"


def keep_replica_grpc_on_loopback() -> None:
    """Call in the replica before it starts: first thing in the deployment's `__init__` (Serve
    pickles a deployment class by value, so its module's own top-level code does not run in
    the replica)."""
    if not loopback_only():
        return
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "on_loopback", False):
        return

    def add_port(server: Any, address: str) -> int:
        if address.startswith(_ALL_INTERFACES):
            address = "127.0.0.1:" + address.removeprefix(_ALL_INTERFACES)
        return original(server, address)

    add_port.on_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
