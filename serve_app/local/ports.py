"""The ports a local run needs, and what an earlier run left behind when it was killed.

A `make run` killed with SIGKILL cannot stop what Ray started: Serve's HAProxy can outlive it
holding the router's port and its stats and Prometheus ports, and Ray's workers and node agents
linger while they notice that their node is gone.
Those are swept before a new start, but only when they provably belong to this install (their
program is this environment's Python or lies in it) and their parent is gone; anything else
holding a port is named in one line and left alone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterable
from typing import NamedTuple

import psutil

from serve_app.local.haproxy import config_file

HAPROXY_STATS_PORT_ENV = "RAY_SERVE_HAPROXY_STATS_PORT"
HAPROXY_METRICS_PORT_ENV = "RAY_SERVE_HAPROXY_METRICS_PORT"
# Serve writes each HAProxy's config under this folder (RAY_SERVE_HAPROXY_CONFIG_FILE_LOC).
SERVE_HAPROXY_DIR = os.path.dirname(
    os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/tmp/haproxy-serve/haproxy.cfg")
)


RAY_WORKER_SCRIPT = os.path.join("ray", "_private", "workers", "default_worker.py")


class Need(NamedTuple):
    """A port the run will listen on, and what to tell the user if something else has it."""

    port: int
    what: str
    remedy: str


def needed_ports(http_port: int, demo_port: int | None) -> list[Need]:
    stats = int(os.environ.get(HAPROXY_STATS_PORT_ENV, "8404"))
    metrics = int(os.environ.get(HAPROXY_METRICS_PORT_ENV, "9101"))
    needs = [
        Need(http_port, "the router's port", "or start with --port"),
        Need(stats, "HAProxy's stats port", f"or set {HAPROXY_STATS_PORT_ENV}"),
        Need(metrics, "HAProxy's Prometheus port", f"or set {HAPROXY_METRICS_PORT_ENV}"),
    ]
    if demo_port is not None:
        needs.append(Need(demo_port, "the demo upstream's port", "or run with --no-demo"))
    return needs


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server can listen there now (as servers do, with SO_REUSEADDR: connections
    of an earlier run waiting out TIME-WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ours(proc: psutil.Process) -> bool:
    """Its program is this environment's Python (Ray's workers) or lies in this environment
    (Serve's HAProxy)."""
    with contextlib.suppress(psutil.Error):
        exe = os.path.realpath(proc.exe())
        here = os.path.realpath(sys.prefix) + os.sep
        return exe == os.path.realpath(sys.executable) or exe.startswith(here)
    return False


def _parent(proc: psutil.Process) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error):
        return proc.parent()
    return None


def _name(proc: psutil.Process | None) -> str:
    with contextlib.suppress(psutil.Error):
        return "" if proc is None else proc.name()
    return ""


def _ray_worker(proc: psutil.Process) -> bool:
    """A Ray worker or agent: named `ray::...` once it runs, `default_worker.py` before."""
    if _name(proc).startswith("ray::"):
        return True
    with contextlib.suppress(psutil.Error):
        return any(arg.endswith(RAY_WORKER_SCRIPT) for arg in proc.cmdline()[:3])
    return False


def _orphaned_ray_process(proc: psutil.Process) -> bool:
    """A Ray worker or agent whose raylet is gone: its node died with the run."""
    return _ray_worker(proc) and _name(_parent(proc)) != "raylet"


def leftover(proc: psutil.Process) -> str | None:
    """What `proc` is, if a killed run of this install left it behind; else None."""
    try:
        name, cmdline = proc.name(), proc.cmdline()
    except psutil.Error:
        return None
    if not _ours(proc):
        return None
    if name == "haproxy":
        config = config_file(cmdline)
        if config is None or not config.startswith(SERVE_HAPROXY_DIR + os.sep):
            return None
        manager = _parent(proc)
        if _name(manager) != "ray::HAProxyManager" or _orphaned_ray_process(manager):
            return "Serve's HAProxy"
        return None
    if _orphaned_ray_process(proc):
        return f"Ray's {name.removeprefix('ray::') if name.startswith('ray::') else 'worker'}"
    return None


def sweep_leftovers() -> list[str]:
    """Stop what killed runs of this install left behind; one line for each."""
    found = [(p, what) for p in psutil.process_iter() if (what := leftover(p)) is not None]
    for proc, _ in found:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs([p for p, _ in found], timeout=3)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [
        f"stopped {what} (pid {p.pid}), left by an earlier run that was killed" for p, what in found
    ]


def _holders(port: int) -> list[psutil.Process]:
    pids = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
    }
    out = []
    for pid in sorted(pids):
        with contextlib.suppress(psutil.Error):
            out.append(psutil.Process(pid))
    return out


def busy_port(needs: Iterable[Need], host: str = "127.0.0.1") -> str | None:
    """One line naming the first needed port that is taken, who has it and how to free it."""
    for need in needs:
        if port_free(need.port, host):
            continue
        holders = _holders(need.port)
        if not holders:
            return (
                f"{host}:{need.port} ({need.what}) is in use by a process this user cannot see; "
                f"free it {need.remedy}"
            )
        proc = holders[0]
        with contextlib.suppress(psutil.Error):
            command = " ".join(proc.cmdline())[:120] or proc.name()
            return (
                f"{host}:{need.port} ({need.what}) is in use by pid {proc.pid} ({command}); "
                f"stop it (kill {proc.pid}) {need.remedy}"
            )
    return None
