"""models-config.json loading: llm-router's schema, and errors that name file, path and reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from serve_app.core.config import (
    STRATEGY_ENV,
    ConfigError,
    ProviderConfig,
    default_strategy,
    load_config,
    parse_config,
)
from serve_app.pickers.handler import ModelHandler

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "configs" / "models-config.example.json"


def base() -> dict:
    return {
        "t": {
            "m/one": {
                "providers": [
                    {
                        "id": "p1",
                        "api_host": "http://127.0.0.1:9/",
                        "api_type": "vllm",
                        "input_size": 100,
                    }
                ]
            }
        },
        "active_models": {"t": ["m/one"]},
    }


def problems(raw: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "cfg.json")
    assert "cfg.json" in str(info.value)
    return info.value.problems


def test_llm_router_example_loads_with_its_defaults() -> None:
    cfg = load_config(EXAMPLE)
    assert list(cfg.model_types) == ["google_models", "openai_models", "qwen_models"]
    gemma = cfg.model_types["google_models"].models["google/gemma-3-12b-it"]
    assert [p.id for p in gemma.providers_sleep] == ["gemma3_12b-vllm-66:7000"]
    gemini = cfg.model_types["google_models"].models["google/gemini-2.5-flash-lite"].providers[0]
    assert gemini.weight == 1.0 and gemini.keep_alive is None
    qwen = cfg.model_types["qwen_models"].models["qwen3-coder:30b"].providers[0]
    assert qwen.keep_alive == "35m" and qwen.api_type == "ollama"
    assert cfg.model_types["google_models"].routing.strategy is None  # the global default


def test_shipped_demo_config_loads() -> None:
    cfg = load_config(ROOT / "configs" / "models-config.json")
    assert set(cfg.model_type_of()) == {"demo/echo", "demo/llama"}


def test_path_comes_from_the_environment(tmp_path, monkeypatch) -> None:
    f = tmp_path / "x.json"
    f.write_text(json.dumps(base()))
    monkeypatch.setenv("LLM_ROUTER_MODELS_CONFIG", str(f))
    assert load_config().source == str(f)


def test_only_active_models_are_loaded_and_checked() -> None:
    raw = base()
    raw["t"]["m/off"] = {"providers": [{"id": "x", "api_type": "bogus"}]}
    raw["other"] = {"m/junk": "not even an object"}
    cfg = parse_config(raw)
    assert list(cfg.model_type_of()) == ["m/one"]


def test_numeric_string_input_size_and_keep_alive_forms() -> None:
    raw = base()
    p = raw["t"]["m/one"]["providers"][0]
    p.update(input_size="4096", keep_alive="")
    prov = parse_config(raw).model_types["t"].models["m/one"].providers[0]
    assert prov.input_size == 4096 and prov.keep_alive is None
    p.update(keep_alive="1h30m")
    assert parse_config(raw).model_types["t"].models["m/one"].providers[0].keep_alive == "1h30m"


@pytest.mark.parametrize(
    ("mutate", "path", "why"),
    [
        (
            lambda r: r["t"]["m/one"]["providers"][0].update(api_type="tgi"),
            '$.t["m/one"].providers[0].api_type',
            "openai",
        ),
        (
            lambda r: r["t"]["m/one"]["providers"][0].update(api_host="ftp://x"),
            '$.t["m/one"].providers[0].api_host',
            "http",
        ),
        (
            lambda r: r["t"]["m/one"]["providers"][0].update(api_host="http://:80"),
            '$.t["m/one"].providers[0].api_host',
            "host",
        ),
        (
            lambda r: r["t"]["m/one"]["providers"][0].update(input_size="lots"),
            '$.t["m/one"].providers[0].input_size',
            "numeric",
        ),
        (
            lambda r: r["t"]["m/one"]["providers"][0].update(keep_alive="soon"),
            '$.t["m/one"].providers[0].keep_alive',
            "duration",
        ),
        (
            lambda r: r["t"]["m/one"]["providers"][0].update(api_token="${SURELY_UNSET_VAR_42}"),
            '$.t["m/one"].providers[0].api_token',
            "SURELY_UNSET_VAR_42 is not set",
        ),
        (
            lambda r: r["t"]["m/one"]["providers"][0].pop("id"),
            '$.t["m/one"].providers[0].id',
            "required",
        ),
        (lambda r: r["t"]["m/one"].update(providers=[]), '$.t["m/one"].providers', "at least 1"),
        (
            lambda r: r["active_models"]["t"].append("m/missing"),
            "$.active_models.t[1]",
            "not defined",
        ),
        (
            lambda r: r["active_models"].update(nope=["m/one"]),
            "$.active_models.nope",
            "no model type",
        ),
        (lambda r: r.pop("active_models"), "$.active_models", "required"),
        (
            lambda r: r.update(routing={"t": {"strategy": "fastest"}}),
            "$.routing.t.strategy",
            "round_robin",
        ),
        (lambda r: r.update(routing={"ghost": {}}), "$.routing.ghost", "not an active"),
        (
            lambda r: r["t"]["m/one"].update(fallback_model="m/one"),
            '$.t["m/one"].fallback_model',
            "itself",
        ),
        (
            lambda r: r["t"]["m/one"].update(fallback_model="m/ghost"),
            '$.t["m/one"].fallback_model',
            "not an active model",
        ),
        (
            lambda r: r.update(routing={"t": {"lease_s": 0.1}}),
            "$.routing.t.lease_s",
            "greater than or equal to 1",
        ),
    ],
)
def test_bad_fields_are_named_with_their_json_path(mutate, path: str, why: str) -> None:
    raw = copy.deepcopy(base())
    mutate(raw)
    found = problems(raw)
    assert any(p == path and why in w for p, w in found), found


def test_duplicate_provider_ids_across_models_and_tiers() -> None:
    raw = base()
    raw["t"]["m/two"] = {
        "providers": [{"id": "p2", "api_host": "http://h", "api_type": "openai", "input_size": 1}],
        "providers_sleep": [
            {"id": "p1", "api_host": "http://h", "api_type": "openai", "input_size": 1}
        ],
    }
    raw["active_models"]["t"].append("m/two")
    [(path, why)] = problems(raw)
    assert path == '$.t["m/two"].providers_sleep[0].id'
    assert "duplicate provider id 'p1'" in why and '$.t["m/one"].providers[0].id' in why


def test_every_problem_is_reported_at_once() -> None:
    raw = base()
    raw["t"]["m/one"]["providers"][0].update(api_type="x", input_size=-1, weight=-2)
    assert len(problems(raw)) == 3


def test_unreadable_and_invalid_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{,}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_token_from_env_is_resolved_and_never_printed(monkeypatch) -> None:
    monkeypatch.setenv("MY_UPSTREAM_KEY", "abc-secret-999")
    raw = base()
    raw["t"]["m/one"]["providers"][0]["api_token"] = "${MY_UPSTREAM_KEY}"
    cfg = parse_config(raw)
    prov = cfg.model_types["t"].models["m/one"].providers[0]
    assert prov.api_token.get_secret_value() == "abc-secret-999"
    assert "abc-secret-999" not in repr(cfg) + str(cfg) + cfg.model_dump_json()


def test_nworkers_falls_back_to_one_with_a_warning(caplog) -> None:
    raw = base()
    providers = raw["t"]["m/one"]["providers"]
    values = [4, "3", 0, -2, "many", None, True, 2.5]
    template = providers[0]
    raw["t"]["m/one"]["providers"] = [
        {**template, "id": f"p{i}", "nworkers": v} for i, v in enumerate(values)
    ]
    with caplog.at_level("WARNING", logger="serve_app.core.config"):
        cfg = parse_config(raw)
    got = [p.nworkers for p in cfg.model_types["t"].models["m/one"].providers]
    assert got == [4, 3, 1, 1, 1, 1, 1, 1]
    assert len([r for r in caplog.records if "nworkers" in r.getMessage()]) == 6
    assert ProviderConfig.model_validate({**template, "id": "x"}).nworkers == 1


def test_default_strategy_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(STRATEGY_ENV, raising=False)
    assert default_strategy() == "balanced"
    monkeypatch.setenv(STRATEGY_ENV, "first_available_optim")
    assert default_strategy() == "first_available_optim"
    assert default_strategy("weighted") == "weighted"  # an explicit value wins
    handler = ModelHandler(config=parse_config(base()))
    assert handler.strategy_names == {"m/one": "first_available_optim"}
    raw = base()
    raw["routing"] = {"t": {"strategy": "dynamic_weighted"}}
    assert ModelHandler(config=parse_config(raw)).strategy_names == {"m/one": "dynamic_weighted"}
    monkeypatch.setenv(STRATEGY_ENV, "fastest")
    with pytest.raises(ConfigError) as info:
        default_strategy()
    assert "fastest" in str(info.value) and "first_available_optim_nworkers" in str(info.value)


def test_host_key_defaults_to_the_server_address() -> None:
    raw = base()["t"]["m/one"]["providers"][0]
    assert ProviderConfig.model_validate(
        {**raw, "api_host": "http://10.0.0.5:11434/"}
    ).host_key == ("10.0.0.5:11434")
    assert ProviderConfig.model_validate({**raw, "host": "gpu-71"}).host_key == "gpu-71"


def test_model_handler_llm_router_interface() -> None:
    handler = ModelHandler(str(EXAMPLE))
    api_model = handler.get_model_provider("google/gemma-3-12b-it")
    assert api_model.id in {"gemma3_12b-vllm-71:7000", "gemma3_12b-vllm-71:7001"}
    listed = handler.list_active_models()
    assert set(listed) == {"google_models", "openai_models", "qwen_models"}
    gpt = listed["openai_models"]["openai/gpt-3.5-turbo-0125"]
    assert gpt["id"] == "openai-gpt3_5-t-0125"
    assert "api_token" not in gpt and "model_path" not in gpt
    assert "YOUR_OPENAI_KEY" not in json.dumps(listed)
