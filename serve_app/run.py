"""`make run`: the demo upstream and the router on 127.0.0.1, until Ctrl-C.

With `--no-demo` it serves only the models config (point it at a real Ollama or vLLM).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time

from serve_app.config import ConfigError, load_config
from serve_app.serve_env import apply_fast_serve_env

DEMO_PORT = 8101  # what configs/models-config.json points at


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        help="models config (default: $LLM_ROUTER_MODELS_CONFIG or configs/models-config.json)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-demo", action="store_true", help="do not start the demo upstream")
    parser.add_argument(
        "--watch", action="store_true", help="publish the models config whenever the file changes"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    demo = None
    if not args.no_demo:
        if _port_free(DEMO_PORT):
            demo = subprocess.Popen(
                [sys.executable, "-m", "serve_app.demo_upstream", "--port", str(DEMO_PORT)]
            )
        if demo is None or not _listening(demo, DEMO_PORT):
            print(
                f"the demo upstream could not listen on 127.0.0.1:{DEMO_PORT} (port in use?); "
                "free it or run with --no-demo",
                file=sys.stderr,
            )
            if demo is not None:
                demo.kill()
            return 2
    apply_fast_serve_env(single_node=True)
    import ray
    from ray import serve

    from serve_app.app import APP_NAME, AppArgs, router_app

    stop = threading.Event()
    try:
        ray.init(include_dashboard=False, logging_level="warning")
        serve.start(http_options={"host": args.host, "port": args.port})
        app = router_app(AppArgs(models_config=args.config, watch_config=args.watch))
        serve.run(app, name=APP_NAME, route_prefix="/")
        # After ray.init, which installs handlers of its own.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        models = ", ".join(m for g in config.model_types.values() for m in g.models)
        print(
            f"serve-router ready on http://{args.host}:{args.port} (models: {models})", flush=True
        )
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        if demo is not None:
            demo.terminate()
            demo.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
