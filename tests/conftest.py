"""Real Ray + Serve (started once per session), fake upstreams on loopback threads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from random_order.config import Config as RandomOrder

from serve_app.core.serve_env import apply_fast_serve_env

ROOT = Path(__file__).resolve().parent.parent
apply_fast_serve_env(single_node=True)  # before ray.serve is imported anywhere in this process
# Ray workers inherit the driver's environment when ray.init starts the node; the replicas and
# the registry read the admin token and resolve `${ENV}` api tokens there.
ADMIN_TOKEN = "test-admin-token-4f6c1d2e9a8b7c30"  # 32+ characters, as the router requires
TOKEN_ENV, TOKEN_VALUE = "SERVE_ROUTER_TEST_TOKEN", "sekrit-token-123"
os.environ["LLM_ROUTER_ADMIN_TOKEN"] = ADMIN_TOKEN
os.environ[TOKEN_ENV] = TOKEN_VALUE

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray._common.utils import get_default_ray_temp_dir  # noqa: E402

from serve_app.app import APP_NAME, AppArgs, router_app  # noqa: E402
from serve_app.cluster.registry.actor import RegistryRef  # noqa: E402
from serve_app.demo.upstream import FakeUpstream, Knobs  # noqa: E402

# One registry for the session's deployments, on a private file.
REGISTRY = RegistryRef(
    name=f"test-registry-{uuid.uuid4().hex[:8]}",
    path=os.path.join(tempfile.mkdtemp(prefix="router-registry-"), "registry.json"),
)
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
# What a body sent as bytes needs (the router refuses a POST body of another type).
JSON_TYPE = {"content-type": "application/json"}
# Deployments get no roles unless a test names its own profiles (configs/llm_models.json has the
# demo's, which would pull models on the test upstreams).
NO_PROFILES = os.path.join(os.path.dirname(REGISTRY.path), "no-profiles.json")
with open(NO_PROFILES, "w") as f:
    f.write('{"profiles": {"default": {"models": {}}}}')


# Ports below the kernel's ephemeral range (32768-60999 on Linux by default), in an order of this
# process's own: a port the kernel hands out (bind to 0) is one an outgoing connection may take
# before the server it was meant for binds it (seen: HAProxy's metrics port, in a full run).
_PORTS = iter(random.Random(os.getpid()).sample(range(10_000, 32_768), 22_768))


def free_port() -> int:
    """A loopback port nothing listens on now."""
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port left below 32768")


def lora_dir(name: str) -> str:
    """A folder vLLM (and the demo upstream) takes for a LoRA adapter: adapter_config.json in it."""
    folder = Path(REGISTRY.path).parent / "adapters" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    return str(folder)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Await `check()` until it is true; fails naming `what` after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# What the tests hand out that no log may hold: the admin token, the upstream token, and every
# client key (they all begin so). Modules with secrets of their own add them.
SECRETS = [ADMIN_TOKEN, TOKEN_VALUE, "sk-sr-"]


def leaked_secrets(since: float) -> list[str]:
    """`file: secret` for every log file of the Ray sessions written since `since` (this
    process's and those of the runs the tests started in other processes: Ray's, Serve's and
    HAProxy's logs) that holds one of SECRETS."""
    root = Path(get_default_ray_temp_dir())
    sessions = [
        logs
        for logs in root.glob("session_2*/logs")
        if logs.is_dir() and logs.stat().st_mtime >= since
    ]
    assert sessions, f"no Ray session logs under {root}"
    needles = [secret.encode() for secret in SECRETS]
    return [
        f"{file}: {needle.decode()[:6]}..."
        for logs in sessions
        for file in logs.rglob("*")
        if file.is_file()
        for needle in needles
        if needle in file.read_bytes()
    ]


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(request: pytest.FixtureRequest) -> Iterator[None]:
    """Checked once every module has run (chaos too), whatever their order."""
    started = time.time()
    yield
    if any(item.get_closest_marker("serve") for item in request.session.items):
        assert leaked_secrets(started) == []


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` shuffles the modules (pytest-random-order); inside a module the tests keep
    their order: some walk one state on purpose (the console tests: one browser session, a
    role ensured once per replica), and the module is the unit that deploys what it needs."""
    for item in items:
        item.add_marker(pytest.mark.random_order(disabled=True))


# Skips are failures: a test that cannot run here (a missing tool, say) must not pass unseen.
# An expected failure (xfail) still counts as expected.
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    for line in _skipped:
        terminalreporter.write_line(f"FAILED (skipped): {line}", red=True)
    order = RandomOrder(config)
    if order.is_enabled:  # printed last, where a failed run's log ends
        terminalreporter.write_line(
            f"modules in random order: PYTEST_ADDOPTS=--random-order-seed={order.seed} "
            "make test runs this order again"
        )


@pytest.fixture(scope="session")
def serve_url() -> Iterator[str]:
    port = free_port()
    ray.init(include_dashboard=False, logging_level="error", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()  # stops HAProxy too; it would outlive ray.shutdown otherwise
        ray.shutdown()


def deploy(
    serve_url: str, raw_config: dict, max_body_bytes: int = 64 * 1024, **args: object
) -> AppArgs:
    """Deploy (or replace) the router app; return once HAProxy routes to it and every replica
    follows the config just published."""
    app_args = AppArgs(
        max_body_bytes=max_body_bytes,
        registry_name=REGISTRY.name,
        registry_path=REGISTRY.path,
        **{"profiles_config": NO_PROFILES, **args},
    )
    serve.run(router_app(app_args, (raw_config, "test-config")), name=APP_NAME, route_prefix="/")
    expected = sorted(n for t in raw_config["active_models"].values() for n in t)

    def serving() -> bool:
        try:
            listing = urllib.request.Request(f"{serve_url}/v1/models", headers=ADMIN)
            with urllib.request.urlopen(listing, timeout=2) as resp:
                data = json.load(resp)["data"]
                listed = [m["id"] for m in data if "parent" not in m and "root" not in m]
                return sorted(listed) == expected
        except OSError:
            return False

    wait_for(serving, 60, "the router to serve the new config")
    registry = REGISTRY.handle()
    version = ray.get(registry.current.remote()).version
    behind = ray.get(registry.wait_for_followers.remote(version, 40))
    assert not behind, f"replicas not following the config: {behind}"
    return app_args


@pytest.fixture(scope="session")
def upstream_factory() -> Iterator[Callable[[str], FakeUpstream]]:
    started: list[FakeUpstream] = []

    def make(name: str) -> FakeUpstream:
        up = FakeUpstream(name, Knobs())
        up.start_in_thread()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop_thread()


def run_cluster_script(module: str) -> dict:
    """Runs `python -m <module>` (a multi-node scenario) and returns the JSON of its last line.

    Its own process: this session's Ray is single-node, and one process holds one Ray.
    """
    run = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def samples(text: str, name: str) -> dict[str, float]:
    """A metric's samples on a Prometheus text page, by the sample's name and labels."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def replica_processes() -> dict[str, psutil.Process]:
    """The router app's Serve replicas (this session's Ray runs under this test process), by
    their process title (`ServeReplica:<app>:<deployment>` and the replica's id)."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = " ".join(proc.cmdline())
            if f"ServeReplica:{APP_NAME}:" in title:
                found[title] = proc
    return found


def ingress_process() -> psutil.Process:
    """The one ingress replica's process."""
    found = [p for title, p in replica_processes().items() if f"{APP_NAME}:Ingress" in title]
    assert len(found) == 1, found
    return found[0]


@contextlib.contextmanager
def peak_rss(proc: psutil.Process) -> Iterator[list[int]]:
    """Samples the process's RSS on a thread while the block runs: [before, peak] at the end."""
    before = proc.memory_info().rss
    out = [before, before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            out[1] = max(out[1], proc.memory_info().rss)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        yield out
    finally:
        done.set()
        watcher.join()


async def new_key(http: aiohttp.ClientSession, url: str, **fields: object) -> dict:
    """A client key made through the admin API (its answer: `key`, `id` and the fields)."""
    body = {"name": f"k-{time.monotonic_ns()}", **fields}
    async with http.post(f"{url}/api/v1/keys", json=body, headers=ADMIN) as resp:
        doc = await resp.json()
        assert resp.status == 201, doc
        return doc


def provider(pid: str, url: str, api_type: str = "openai", **extra: object) -> dict:
    return {
        "id": pid,
        "api_host": url,
        "api_token": "",
        "api_type": api_type,
        "input_size": 4096,
        "model_path": "",
        "keep_alive": None,
        "tool_calling": False,
        **extra,
    }


@pytest.fixture
async def http() -> aiohttp.ClientSession:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session
