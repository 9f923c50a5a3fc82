"""The `serve-router` command's pure parts: which files it reads, its tables, the status rows
and rates, the admin API's errors as one line; and that it imports no Ray before `run` has set
Ray's environment. (The command itself, installed from the wheel: test_package.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from serve_app.cli.admin import _api_error, with_rates
from serve_app.cli.files import DEMO_CONFIG, DEMO_PROFILES, documents
from serve_app.cli.output import table
from serve_app.cluster.health import Breaker
from serve_app.cluster.status import health_of, status_rows
from serve_app.core.config import parse_config
from serve_app.core.metrics import Tally, merge
from serve_app.routing.load import LoadSignal
from tests.conftest import ROOT


def test_the_command_imports_no_ray_before_run_sets_its_environment() -> None:
    """Ray reads its node-address setting when imported: imported first, a local run's
    replicas listened on loopback while the node's address was not (nothing answered)."""
    code = "import sys, serve_app.cli.main; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "False", done.stderr


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLM_ROUTER_MODELS_CONFIG", raising=False)
    monkeypatch.delenv("LLM_MODELS_CONFIG", raising=False)
    return tmp_path


def test_outside_a_checkout_the_demo_files_of_the_package_are_read(elsewhere: Path) -> None:
    assert documents(None, None) == (str(DEMO_CONFIG), str(DEMO_PROFILES))
    assert documents(None, "mine.json") == (str(DEMO_CONFIG), "mine.json")
    assert DEMO_CONFIG.is_file() and DEMO_PROFILES.is_file()


def test_named_files_come_first_then_the_environment_then_configs(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs/models-config.json").write_text("{}")
    # The router's own default; profiles left to the router (configs/llm_models.json if there).
    assert documents(None, None) == ("configs/models-config.json", None)
    monkeypatch.setenv("LLM_ROUTER_MODELS_CONFIG", "env.json")
    assert documents(None, None) == ("env.json", None)
    assert documents("arg.json", "p.json") == ("arg.json", "p.json")
    (elsewhere / "configs/models-config.json").unlink()
    monkeypatch.delenv("LLM_ROUTER_MODELS_CONFIG")
    monkeypatch.setenv("LLM_MODELS_CONFIG", "profiles-env.json")
    assert documents(None, None) == (str(DEMO_CONFIG), "profiles-env.json")


def test_tables_align_columns_and_show_none_as_a_dash() -> None:
    out = table(("model", "n"), [["demo/echo", 1], ["m", None]])
    assert out.splitlines() == ["model      n", "demo/echo  1", "m          -"]


def _provider(pid: str) -> dict[str, object]:
    return {
        "id": pid,
        "api_host": "http://127.0.0.1:1",
        "api_token": "",
        "api_type": "vllm",
        "input_size": 1024,
        "model_path": "",
    }


def test_status_rows_join_config_circuits_and_every_replicas_totals() -> None:
    config = parse_config(
        {
            "t": {"m": {"providers": [_provider("a"), _provider("b")]}},
            "u": {"n": {"providers": [_provider("c")], "providers_sleep": [_provider("z")]}},
            "active_models": {"t": ["m"], "u": ["n"]},
        }
    )
    tripped = Breaker(3, 30.0)
    tripped.trip("3 requests failed in a row: 503", now=1.0)
    closed = Breaker(3, 30.0)
    health = {
        "a": health_of(closed, True, LoadSignal(running=2, waiting=1, kv_usage=0.5)),
        "b": health_of(tripped, False, None),
        "z": health_of(closed, False, None),
    }
    one, two = Tally(), Tally()
    one.set("llm_router_provider_in_flight", ("a",), 2)
    two.set("llm_router_provider_in_flight", ("a",), 1)
    one.inc("llm_router_requests", ("m", "a", "200", "openai"), 5)
    two.inc("llm_router_requests", ("m", "a", "502", "ollama"), 2)
    two.inc("llm_router_requests", ("n", "c", "200", "openai"), 7)
    two.inc("llm_router_requests", ("m", "c", "200", "openai"), 1)  # not one of m's providers
    rows = status_rows(config, health, merge([one.snapshot(), two.snapshot()]))
    got = [(r.model, r.provider, r.tier, r.state, r.in_flight, r.requests, r.errors) for r in rows]
    assert got == [
        ("m", "a", "primary", "healthy", 3, 7, 2),
        ("m", "b", "primary", "circuit_open", 0, 0, 0),
        ("n", "c", "primary", "unprobed", 0, 7, 0),
        ("n", "z", "sleeping", "probe_failing", 0, 0, 0),
    ]
    assert rows[0].model_type == "t" and (rows[0].running, rows[0].kv_usage) == (2, 0.5)
    assert rows[1].reason == "3 requests failed in a row: 503"
    assert status_rows(config, {}, merge([]))[0].state == "unprobed"


def test_rates_come_from_two_readings() -> None:
    before = [{"model": "m", "provider": "a", "requests": 10, "errors": 1}]
    after = [
        {"model": "m", "provider": "a", "requests": 30, "errors": 2},
        {"model": "m", "provider": "new", "requests": 4, "errors": 0},  # not in the first
    ]
    rows = with_rates(before, after, 2.0)
    assert [(r["requests_per_s"], r["errors_per_s"]) for r in rows] == [(10.0, 0.5), (0.0, 0.0)]


def test_api_errors_are_one_line_with_status_and_code() -> None:
    body = orjson.dumps({"error": {"message": "no client key 'k'", "code": "key_not_found"}})
    assert _api_error(404, body) == "404 key_not_found: no client key 'k'"
    assert _api_error(502, b"<html>bad gateway</html>") == "502: <html>bad gateway</html>"
