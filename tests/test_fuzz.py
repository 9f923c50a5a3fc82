"""`make chaos`: schemathesis fuzzes every operation of the live OpenAPI document; no 5xx."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
import pytest

from tests.conftest import ADMIN_TOKEN, deploy, provider

pytestmark = [pytest.mark.serve, pytest.mark.chaos]


def test_schemathesis_finds_no_server_error(
    serve_url: str, upstream_factory, tmp_path: Path
) -> None:
    up = upstream_factory("fuzz")
    config = {
        "fuzz_models": {
            "m/fuzz": {"providers": [provider("fz", up.url, "ollama", model_path="llama3")]}
        },
        "active_models": {"fuzz_models": ["m/fuzz"]},
    }
    file = tmp_path / "models-config.json"  # what the fuzzed reload endpoint re-reads
    file.write_bytes(orjson.dumps(config))
    deploy(serve_url, config, models_config=str(file))
    # Twice: as served, and with every body's `model` pinned to the served model so that the
    # fuzzed messages, tools and prompts go all the way through the router to the upstream.
    with urllib.request.urlopen(f"{serve_url}/openapi.json", timeout=10) as resp:
        spec = json.load(resp)
    for op in spec["paths"].values():
        for method in op.values():
            body = method.get("requestBody", {}).get("content", {}).get("application/json")
            if body and "model" in body["schema"].get("properties", {}):
                body["schema"]["properties"]["model"] = {"const": "m/fuzz"}
    pinned = tmp_path / "openapi-pinned.json"
    pinned.write_text(json.dumps(spec))
    for schema in (f"{serve_url}/openapi.json", str(pinned)):
        _schemathesis(schema, serve_url)


def _schemathesis(schema: str, base_url: str) -> None:
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            schema,
            "--url",
            base_url,
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "40",
            "--seed",
            "1",
            "--request-timeout",
            "30",
            "--header",
            f"Authorization: Bearer {ADMIN_TOKEN}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(run.stdout[-1500:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
