"""Provisioning on a multi-node Ray cluster: each provider's task runs on its own node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_each_provider_is_provisioned_on_its_node() -> None:
    # Its own process: this session's Ray is single-node, and one process holds one Ray.
    run = subprocess.run(
        [sys.executable, "-m", "tests.multinode_provision"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    by_role = {s["role"]: s for s in out["report"]["statuses"]}
    assert by_role["ra"]["action"] == by_role["rb"]["action"] == "installed"
    assert by_role["ra"]["node"] == out["nodes"]["gpu_node_a"]
    assert by_role["rb"]["node"] == out["nodes"]["gpu_node_b"]
    assert out["head"] not in (by_role["ra"]["node"], by_role["rb"]["node"])
    assert by_role["ra"]["detail"] is None  # placed by its resource, not the fallback
    assert out["pulls"] == {"gpu_node_a": 1, "gpu_node_b": 1}
