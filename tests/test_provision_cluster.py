"""Provisioning on a multi-node Ray cluster: each provider's task runs on its own node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serve_app.demo.upstream import Knobs
from tests.conftest import ROOT, provider, run_cluster_script


def test_each_provider_is_provisioned_on_its_node() -> None:
    out = run_cluster_script("tests.multinode_provision")
    by_role = {s["role"]: s for s in out["report"]["statuses"]}
    assert by_role["ra"]["action"] == by_role["rb"]["action"] == "installed"
    assert by_role["ra"]["node"] == out["nodes"]["gpu_node_a"]
    assert by_role["rb"]["node"] == out["nodes"]["gpu_node_b"]
    assert out["head"] not in (by_role["ra"]["node"], by_role["rb"]["node"])
    assert by_role["ra"]["detail"] is None  # placed by its resource, not the fallback
    assert out["pulls"] == {"gpu_node_a": 1, "gpu_node_b": 1}


def test_the_cli_reports_a_broken_pull_and_exits_non_zero(upstream_factory, tmp_path: Path) -> None:
    ollama = upstream_factory("cli-ollama")
    ollama.knobs = Knobs(pull_fail_after=1)
    models = {
        "local": {
            "m/x": {"providers": [provider("cx", ollama.url, "ollama", model_path="x:1b")]},
            "cli-ollama": {"providers": [provider("cy", ollama.url, "ollama")]},
        },
        "active_models": {"local": ["m/x", "cli-ollama"]},
    }
    profiles = {"profiles": {"default": {"models": {"broken": "x:1b", "ok": "cli-ollama"}}}}
    (tmp_path / "models.json").write_text(json.dumps(models))
    (tmp_path / "profiles.json").write_text(json.dumps(profiles))
    args = ["--models-config", str(tmp_path / "models.json"), "--profiles"]
    args += [str(tmp_path / "profiles.json")]

    def cli(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scripts.provision_models", *args, *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )

    run = cli("--json")
    assert run.returncode == 1, run.stderr[-2000:]
    statuses = {s["role"]: s for s in json.loads(run.stdout)["statuses"]}
    assert statuses["broken"]["action"] == "error"
    assert statuses["broken"]["detail"].startswith("download_failed: pull x:1b: connection reset")
    assert statuses["ok"]["action"] == "exists"
    assert '"event":"pull progress"' in run.stderr  # progress reached the CLI's log
    run = cli("--roles", "ok")
    assert run.returncode == 0
    assert run.stdout.splitlines()[0].split()[:4] == ["role", "provider", "provider_id", "action"]
    assert run.stdout.splitlines()[1].split()[:4] == ["ok", "ollama", "cy", "exists"]
