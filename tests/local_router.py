"""`serve-router run` as the tests start it in a process of its own: in front of a test upstream
(not the demo's, whose fixed port 8101 another run on the machine may hold)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from serve_app.demo.upstream import FakeUpstream
from tests.conftest import NO_PROFILES, provider
from tests.test_local_run import CHAT


def run_command(port: int, up: FakeUpstream, folder: Path) -> list[str]:
    """The command line of a router on `port` serving the model `chat` asks for from `up`."""
    config = folder / "models-config.json"
    model = {CHAT["model"]: {"providers": [provider(up.name, up.url)]}}
    config.write_text(json.dumps({"t": model, "active_models": {"t": list(model)}}))
    files = ["--config", str(config), "--profiles", NO_PROFILES, "--no-demo"]
    return [sys.executable, "-m", "serve_app.cli", "run", "--port", str(port), *files]
