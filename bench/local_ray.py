"""What the benchmarks share: a local Ray with a registry of its own (for those that run router
code in-process against real actors: bench.strategy_cost, bench.key_cost), the router on a
local Serve and the demo upstream (bench.run, bench.stream, bench.affinity), free loopback
ports, waiting for an HTTP answer, the CPU time the app's processes used."""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import orjson
import psutil

from serve_app.core.serve_env import apply_fast_serve_env

if TYPE_CHECKING:
    from serve_app.cluster.registry.actor import RegistryRef


async def us_per_request(one: Callable[[], Awaitable[None]], n: int) -> dict[str, float]:
    """Microseconds per call of `one` (an in-process cost), after a warm-up: `n` calls one
    after another (c1) and as 32 interleaved loops on the event loop (c32), the median of 5."""
    for _ in range(200):
        await one()

    async def loop(calls: int) -> None:
        for _ in range(calls):
            await one()
            await asyncio.sleep(0)

    out: dict[str, float] = {}
    for c in (1, 32):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            await asyncio.gather(*(loop(n // c) for _ in range(c)))
            times.append((time.perf_counter() - t0) / n * 1e6)
        out[f"c{c}_us_per_request"] = round(statistics.median(times), 1)
    return out


def run_in_local_ray(name: str, measure: Callable[[RegistryRef], Awaitable[dict]]) -> int:
    """Runs an in-process cost benchmark against a local Ray and prints its JSON report."""
    with local_registry(name) as registry:
        report = asyncio.run(measure(registry))
    print(orjson.dumps(report).decode())
    return 0


@contextmanager
def local_registry(name: str) -> Iterator[RegistryRef]:
    # The fast settings before Ray and Serve are imported: they read them at import.
    apply_fast_serve_env(single_node=True)
    import ray

    from serve_app.cluster.registry.actor import RegistryRef

    ray.init(include_dashboard=False, logging_level="error", log_to_driver=False)
    folder = tempfile.mkdtemp(prefix=f"{name}-")
    try:
        yield RegistryRef(name=name, path=f"{folder}/registry.json")
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


class LocalRouter:
    """The router app on a local Serve, redeployed with each config a benchmark needs."""

    def __init__(self, url: str, registry: RegistryRef) -> None:
        self.url = url
        self._registry = registry

    def deploy(self, config: dict, source: str, **args: object) -> None:
        """Deploy the app (AppArgs `args`) and return once it answers."""
        from ray import serve

        from serve_app.app import APP_NAME, AppArgs, router_app

        app_args = AppArgs(
            registry_name=self._registry.name, registry_path=self._registry.path, **args
        )
        serve.run(router_app(app_args, (config, source)), name=APP_NAME, route_prefix="/")
        wait_http(f"{self.url}/healthz")


@contextmanager
def local_router(name: str) -> Iterator[LocalRouter]:
    """Ray and Serve (HTTP on a free loopback port) with the fast settings; nothing deployed."""
    with local_registry(name) as registry:
        from ray import serve

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield LocalRouter(f"http://127.0.0.1:{port}", registry)
        finally:
            serve.shutdown()


@contextmanager
def demo_upstream(*args: str) -> Iterator[str]:
    """The demo upstream in its own process (`args`: its options), until the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "serve_app.demo.upstream", "--port", str(port), *args]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/v1/models")
        yield url
    finally:
        process.terminate()
        process.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(
    url: str, timeout: float = 60.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Until `url` answers 200; fails at once if `process` (what should answer) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def replica_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by the app's processes of each kind: the Serve replicas (ingress,
    router) and the actors they talk to on the request path (broker, monitor). Only this
    process's descendants (the Ray it started): another Ray on the same host is not counted.

    CPU per request is a steadier cost figure than throughput on a noisy two-core host.
    """
    kinds = {
        "ServeReplica:llm-router:Ingress": "ingress",
        "ServeReplica:llm-router:": "router",
        "ray::Broker": "broker",
        "ray::Monitor": "monitor",
    }
    out: dict[str, float] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        kind = next((k for marker, k in kinds.items() if marker in cmdline), None)
        if kind is not None:
            out[kind] = out.get(kind, 0.0) + times.user + times.system
    return out
