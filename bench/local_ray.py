"""What the benchmarks share: a local Ray with a registry of its own (for those that run router
code in-process against real actors: bench.strategy_cost, bench.key_cost), free loopback
ports, waiting for an HTTP answer, the CPU time the app's processes used."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from serve_app.serve_env import apply_fast_serve_env

if TYPE_CHECKING:
    from serve_app.registry.actor import RegistryRef


@contextmanager
def local_registry(name: str) -> Iterator[RegistryRef]:
    # The fast settings before Ray and Serve are imported: they read them at import.
    apply_fast_serve_env(single_node=True)
    import ray

    from serve_app.registry.actor import RegistryRef

    ray.init(include_dashboard=False, logging_level="error", log_to_driver=False)
    try:
        yield RegistryRef(name=name, path=f"{tempfile.mkdtemp(prefix=f'{name}-')}/registry.json")
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def replica_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by the app's processes of each kind: the Serve replicas (ingress,
    router) and the actors they talk to on the request path (broker, monitor). Linux /proc.

    CPU per request is a steadier cost figure than throughput on a noisy two-core host.
    """
    tick = os.sysconf("SC_CLK_TCK")
    kinds = {
        "ServeReplica:llm-router:Ingress": "ingress",
        "ServeReplica:llm-router:": "router",
        "ray::Broker": "broker",
        "ray::Monitor": "monitor",
    }
    out: dict[str, float] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = next((k for marker, k in kinds.items() if marker in cmdline), None)
        if kind is not None:
            out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out
