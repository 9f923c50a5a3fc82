"""`make run`: the demo upstream and the router on 127.0.0.1, until Ctrl-C.

With `--no-demo` it serves only the models config (point it at a real Ollama or vLLM).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading

from serve_app.config import ConfigError, load_config
from serve_app.serve_env import apply_fast_serve_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="models config (default: $LLM_ROUTER_MODELS_CONFIG or "
                                         "configs/models-config.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-demo", action="store_true", help="do not start the demo upstream")
    parser.add_argument("--demo-port", type=int, default=8101)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    demo = None
    if not args.no_demo:
        demo = subprocess.Popen([sys.executable, "-m", "serve_app.demo_upstream",
                                 "--port", str(args.demo_port)])
    apply_fast_serve_env()
    import ray
    from ray import serve

    from serve_app.app import APP_NAME, router_app

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        ray.init(include_dashboard=False, logging_level="warning")
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(router_app(config), name=APP_NAME, route_prefix="/")
        models = ", ".join(m for g in config.model_types.values() for m in g.models)
        print(f"serve-router ready on http://{args.host}:{args.port} (models: {models})",
              flush=True)
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
