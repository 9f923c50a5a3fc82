"""`serve-router run` (`make run`): the demo upstream and the router on 127.0.0.1, until Ctrl-C.

With `--no-demo` it serves only the models config (point it at a real Ollama or vLLM).

Every problem found before start (a config file, a setting, a busy port) is one line on stderr
and exit status 2. The first Ctrl-C (or SIGTERM, or SIGHUP: its terminal closed) stops in
order: the router stops taking requests and finishes those under way, Ray stops, the demo
upstream stops last. A second Ctrl-C stops everything at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import psutil

from serve_app.cli.files import add_document_arguments, documents
from serve_app.cli.output import say
from serve_app.core.config import ConfigError
from serve_app.core.door import LOOPBACK_HOSTS, is_loopback
from serve_app.core.serve_env import apply_fast_serve_env
from serve_app.local.ports import busy_port, needed_ports, port_free, sweep_leftovers
from serve_app.local.terminal import detached_child, own_ctrl_c

if TYPE_CHECKING:
    from ray.serve import Application

    from serve_app.app import AppArgs

DEMO_PORT = 8101  # what the demo's models config points at
# A whole-router stop, not a redeploy: the ingress replica stays registered this long for
# HAProxy (itself stopping) instead of the 5 s tests and redeploys keep (serve_env.py).
STOP_DRAINING_S = "1"
STOP_TIMEOUT_S = 30.0


def _listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if not port_free(port):
            return True
        time.sleep(0.05)
    return False


def _answering(host: str, port: int, timeout: float = 60.0) -> None:
    """Wait until the router answers on its port, on several new connections in a row:
    `serve.run` returns once the replicas are up, and Serve's HAProxy may still be reloading
    (while an old HAProxy process without the app's route listens beside the new one, a
    request got its 404)."""
    address = "127.0.0.1" if host in ("0.0.0.0", "") else host
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while time.monotonic() < deadline and in_a_row < 5:
        try:
            with urllib.request.urlopen(f"http://{address}:{port}/healthz", timeout=2) as resp:
                in_a_row = in_a_row + 1 if resp.status == 200 else 0
        except OSError:
            in_a_row = 0
        time.sleep(0.05)


def _kill_tree() -> None:
    """Everything this process started (Ray's processes, HAProxy, the demo), at once."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()


class Stop:
    """The first SIGINT/SIGTERM/SIGHUP asks for an orderly stop; the second stops at once.
    (SIGHUP's default ended this process alone: Ray and HAProxy went on without it.)"""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            _kill_tree()
            os._exit(128 + signum)
        self.requested.set()
        say("stopping (Ctrl-C again to stop at once)")


def _stop_serve() -> None:
    """Serve's shutdown, but without waiting on the controller's reply: it deletes the app
    (replicas finish their requests), stops HAProxy and then kills itself, which made Serve's
    own `serve.shutdown()` print a failed-task warning for the call still waiting."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    def controller() -> ray.actor.ActorHandle | None:
        try:
            return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            return None

    handle = controller()
    if handle is None:
        return
    ray.get(handle.graceful_shutdown.remote(False), timeout=STOP_TIMEOUT_S)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while controller() is not None and time.monotonic() < deadline:
        time.sleep(0.05)


DESCRIPTION = "Start the router (and the demo upstream) on this machine until Ctrl-C."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_document_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    parser.add_argument(
        "--no-demo",
        action="store_true",
        help=f"do not start the demo upstream (on 127.0.0.1:{DEMO_PORT})",
    )
    parser.add_argument(
        "--watch", action="store_true", help="publish the models config whenever the file changes"
    )


def app_args(args: argparse.Namespace) -> AppArgs:
    """The app's arguments for the files the command line names (cli/files.py)."""
    from serve_app.app import AppArgs

    found = documents(args.config, args.profiles)
    host = getattr(args, "host", None)
    return AppArgs(
        models_config=found.config,
        profiles_config=found.profiles,
        watch_config=getattr(args, "watch", False),
        # On loopback only, a page whose DNS name was rebound to 127.0.0.1 is refused.
        allowed_hosts=LOOPBACK_HOSTS if host is not None and is_loopback(host) else None,
    )


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", STOP_DRAINING_S)
    apply_fast_serve_env(single_node=True)  # before anything imports ray.serve
    from serve_app.app import APP_NAME, check_settings, router_app

    settings = app_args(args)
    try:
        checked = check_settings(settings)
    except ConfigError as exc:
        say(str(exc))
        return 2
    for line in sweep_leftovers():
        say(line)
    problem = busy_port(needed_ports(args.port, None if args.no_demo else DEMO_PORT), args.host)
    if problem is not None:
        say(problem)
        return 2
    models = ", ".join(m for g in checked.config.model_types.values() for m in g.models)
    with own_ctrl_c():
        return _serve(args, lambda: router_app(settings), APP_NAME, models)


def _serve(
    args: argparse.Namespace, build: Callable[[], Application], app_name: str, models: str
) -> int:
    """Start Ray, Serve and the app (the demo upstream first), wait for the stop, stop."""
    import ray
    from ray import serve

    demo = None
    if not args.no_demo:
        demo = subprocess.Popen(
            [sys.executable, "-m", "serve_app.demo.upstream", "--port", str(DEMO_PORT)],
            process_group=0,
            preexec_fn=detached_child,
        )
        if not _listening(demo, DEMO_PORT):
            say(f"the demo upstream did not start on 127.0.0.1:{DEMO_PORT}; try --no-demo")
            demo.kill()
            return 2
    stop = Stop()
    try:
        # Its own Ray, always: without an address, ray.init joins the cluster a `ray start` on
        # this machine last recorded (/tmp/ray/ray_current_cluster), even a dead one.
        ray.init(address="local", include_dashboard=False, logging_level="warning")
        stop.install()  # after ray.init, which installs handlers of its own
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build(), name=app_name, route_prefix="/")
        _answering(args.host, args.port)
        print(
            f"serve-router ready on http://{args.host}:{args.port} (models: {models})", flush=True
        )
        stop.requested.wait()
    except KeyboardInterrupt:  # before the handlers were installed
        say("stopping")
    finally:
        # In a thread, so that a second Ctrl-C is handled at once by the main thread.
        stopper = threading.Thread(target=_stop_in_order, args=(demo,), daemon=True)
        stopper.start()
        while stopper.is_alive():
            stopper.join(0.1)
    return 0


def _stop_in_order(demo: subprocess.Popen[bytes] | None) -> None:
    import ray

    try:
        if ray.is_initialized():
            _stop_serve()
    finally:
        ray.shutdown()
        if demo is not None:
            demo.terminate()
            demo.wait(10)
