"""Manifest rules, manifest file writes and admin auth: pure logic, no Ray."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from serve_app.api.auth import admin_refusal
from serve_app.cluster.registry import store
from serve_app.cluster.registry.adapters import (
    AdapterRegistration,
    Load,
    adapter_report,
    check_registration,
    loads_due,
    next_number,
    retiring_names,
    with_listings,
    with_loaded,
    with_new_version,
    with_unloaded,
    without_adapter,
)
from serve_app.cluster.registry.manifest import (
    Manifest,
    effective_config,
    is_lora_name,
    unplaced_adapters,
    with_config,
)
from serve_app.core.config import ConfigError, ProviderConfig
from serve_app.core.errors import RouterError
from serve_app.core.schemas import Endpoint, RequestMeta
from serve_app.ingress.gateway import kv_prompts
from serve_app.pickers.handler import ModelHandler
from serve_app.routing.kv.tokens import PromptKeys
from tests.conftest import provider
from tests.e2e.tiny_model import write_tokenizer


def _config() -> dict:
    return {
        "llm_models": {
            "base": {
                "providers": [
                    provider("v1", "http://127.0.0.1:9001", "vllm"),
                    provider("o1", "http://127.0.0.1:9002", "ollama"),
                ],
                "providers_sleep": [provider("v2", "http://127.0.0.1:9003", "vllm")],
            },
            "plain": {"providers": [provider("p1", "http://127.0.0.1:9004")]},
            "inactive": {"providers": [provider("x1", "http://127.0.0.1:9005")]},
        },
        "active_models": {"llm_models": ["base", "plain"]},
    }


def _reg(**kw: object) -> AdapterRegistration:
    return AdapterRegistration.model_validate(
        {"base_model": "base", "name": "sql", "source": "/adapters/sql", **kw}
    )


@pytest.fixture
def manifest() -> Manifest:
    return with_config(Manifest(), _config(), "cfg.json")


def test_publishing_the_same_config_keeps_the_version(manifest: Manifest) -> None:
    assert manifest.version == 1
    assert with_config(manifest, _config(), "cfg.json") is manifest
    changed = _config()
    changed["llm_models"]["plain"]["providers"][0]["weight"] = 5
    assert with_config(manifest, changed, "cfg.json").version == 2


def test_an_invalid_config_is_refused_with_its_problems(manifest: Manifest) -> None:
    broken = _config()
    broken["llm_models"]["base"]["providers"][0]["input_size"] = "lots"
    with pytest.raises(ConfigError) as info:
        with_config(manifest, broken, "cfg.json")
    assert info.value.problems[0][0] == "$.llm_models.base.providers[0].input_size"


def test_registration_targets_only_vllm_providers_of_both_tiers(manifest: Manifest) -> None:
    assert [p.id for p in check_registration(manifest, _reg())] == ["v1", "v2"]


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"base_model": "nope"}, 404, "unknown_base_model"),
        ({"base_model": "inactive"}, 404, "unknown_base_model"),
        ({"name": "bad name"}, 400, "invalid_adapter_name"),
        ({"name": "sql@v1"}, 400, "invalid_adapter_name"),
        ({"name": "plain"}, 409, "adapter_name_clash"),
        ({"name": "inactive"}, 409, "adapter_name_clash"),
        ({"base_model": "plain"}, 400, "no_vllm_provider"),
    ],
)
def test_bad_registrations_are_refused(
    manifest: Manifest, fields: dict, status: int, code: str
) -> None:
    with pytest.raises(RouterError) as info:
        check_registration(manifest, _reg(**fields))
    assert (info.value.status, info.value.code) == (status, code)


def test_an_adapter_name_belongs_to_one_base_model(manifest: Manifest) -> None:
    config = _config()
    config["llm_models"]["plain"]["providers"] = [provider("p1", "http://127.0.0.1:9004", "vllm")]
    manifest = with_config(manifest, config, "cfg.json")
    manifest = with_new_version(manifest, _reg(), ["v1"], 0.0)
    with pytest.raises(RouterError) as info:
        check_registration(manifest, _reg(base_model="plain"))
    assert info.value.code == "adapter_name_clash"


def test_a_config_may_not_define_a_model_named_like_an_adapter(manifest: Manifest) -> None:
    manifest = with_new_version(manifest, _reg(), ["v1"], 0.0)
    config = _config()
    config["llm_models"]["sql"] = {"providers": [provider("s", "http://127.0.0.1:9009")]}
    with pytest.raises(ConfigError, match="registered adapter"):
        with_config(manifest, config, "cfg.json")


def test_new_versions_retire_the_old_one_and_route_to_the_new(manifest: Manifest) -> None:
    v1 = with_new_version(manifest, _reg(), ["v1", "v2"], 10.0)
    model = effective_config(v1).model_types["llm_models"].models["sql"]
    # Only providers with the version loaded, asked for it by its vLLM name.
    assert [(p.id, p.model_path) for p in model.providers] == [("v1", "sql@v1")]
    assert [(p.id, p.model_path) for p in model.providers_sleep] == [("v2", "sql@v1")]

    v2 = with_new_version(v1, _reg(source="/adapters/sql2"), ["v2"], 20.0)
    adapter = v2.adapters["sql"]
    assert (adapter.current.version, adapter.current.source) == (2, "/adapters/sql2")
    assert [(o.adapter, o.version, o.retired_in) for o in v2.retiring] == [("sql", 1, v2.version)]
    assert retiring_names(v2) == {"sql@v1"}
    model = effective_config(v2).model_types["llm_models"].models["sql"]
    # v1 has not loaded version 2: the sleeping provider that has is promoted, nothing stale.
    assert [(p.id, p.model_path) for p in model.providers] == [("v2", "sql@v2")]
    assert model.providers_sleep == []

    done = with_unloaded(v2, "sql@v1", {"v1"})
    assert done.retiring[0].loaded == ("v2",)
    assert with_unloaded(done, "sql@v1", {"v2"}).retiring == ()


def test_the_report_shows_versions_per_provider_and_says_ollama_is_unsupported(
    manifest: Manifest,
) -> None:
    m = with_new_version(manifest, _reg(), ["v1", "v2"], 0.0)
    m = with_new_version(m, _reg(), ["v1"], 0.0)
    [report] = adapter_report(m)
    rows = {r["provider"]: r for r in report["providers"]}
    assert rows["v1"] == {
        "provider": "v1",
        "api_type": "vllm",
        "status": "current",
        "loaded_versions": [2, 1],
    }
    assert rows["v2"]["status"] == "missing" and rows["v2"]["loaded_versions"] == [1]
    assert rows["o1"]["status"] == "unsupported" and "ollama" in rows["o1"]["detail"]
    assert report["version"] == 2 and report["retiring_versions"] == [1]


def _listing(*loras: str, source: str = "/adapters/sql") -> dict[str, str]:
    return {"base": "/models/base", **{name: source for name in loras}}


def test_a_server_that_lost_a_version_stops_serving_it_until_it_is_loaded_again(
    manifest: Manifest,
) -> None:
    m = with_new_version(manifest, _reg(), ["v1", "v2"], 0.0)
    # v1 restarted (lists no adapter), v2 is down: neither is routed the adapter any more.
    seen = with_listings(m, {"v1": _listing(), "v2": None})
    assert seen.version == m.version + 1 and seen.adapters["sql"].current.loaded == ()
    config = effective_config(seen)
    assert "sql" not in config.model_types["llm_models"].models
    # Still registered: a router answers 503 adapter_unavailable (retry), not 404.
    assert unplaced_adapters(seen, config) == {"sql"}
    assert unplaced_adapters(m, effective_config(m)) == set()
    handler = ModelHandler(config=config, unplaced=unplaced_adapters(seen, config))
    for name, code in (("sql", "adapter_unavailable"), ("nope", "model_not_found")):
        with pytest.raises(RouterError) as info:
            handler.candidates(RequestMeta(Endpoint.CHAT, name, False, 0, False, ""))
        assert info.value.code == code
    # Only the server that answered is loaded again.
    due = loads_due(seen, {"v1": _listing(), "v2": None})
    assert [(d.provider.id, d.lora, d.source) for d in due] == [("v1", "sql@v1", "/adapters/sql")]
    back = with_loaded(seen, due)
    assert back.adapters["sql"].current.loaded == ("v1",)
    assert with_loaded(back, due) is back  # nothing new
    # Loads on several servers in one round: one new version.
    both = with_loaded(seen, loads_due(seen, {"v1": _listing(), "v2": _listing()}))
    assert both.version == seen.version + 1 and both.adapters["sql"].current.loaded == ("v1", "v2")
    assert with_listings(back, {"v1": _listing("sql@v1")}) is back  # agrees: no new version


def test_listings_decide_what_is_loaded_for_the_providers_that_answered(
    manifest: Manifest,
) -> None:
    m = with_new_version(manifest, _reg(), ["v1"], 0.0)
    # v2 lists it (a load at registration timed out but happened): it is routed there too.
    found = with_listings(m, {"v2": _listing("sql@v1")})
    assert found.adapters["sql"].current.loaded == ("v1", "v2")
    # The same name from another path is not this version: not loaded there, to load again.
    other = with_listings(m, {"v1": _listing("sql@v1", source="/elsewhere")})
    assert other.adapters["sql"].current.loaded == ()
    # A server that does not say where an adapter came from is taken at its word.
    assert with_listings(m, {"v1": {"sql@v1": ""}}) is m
    # Retiring versions a server no longer lists are gone from it: nothing left to unload.
    v2 = with_new_version(found, _reg(source="/adapters/sql2"), ["v1", "v2"], 0.0)
    gone = with_listings(v2, {"v1": _listing("sql@v2", source="/adapters/sql2")})
    assert [r.loaded for r in gone.retiring] == [("v2",)] and retiring_names(gone) == {"sql@v1"}
    assert with_listings(gone, {"v2": _listing()}).retiring == ()


def test_a_load_for_a_version_no_longer_current_changes_nothing(manifest: Manifest) -> None:
    m = with_new_version(manifest, _reg(), [], 0.0)
    m = with_new_version(m, _reg(source="/adapters/sql2"), ["v1"], 0.0)
    v2 = ProviderConfig.model_validate(provider("v2", "http://127.0.0.1:9003", "vllm"))
    assert with_loaded(m, [Load("sql", 1, v2, "/adapters/sql")]) is m
    assert with_loaded(m, [Load("gone", 1, v2, "/adapters/sql")]) is m


def test_a_deleted_adapter_retires_and_its_name_never_reuses_a_loaded_version(
    manifest: Manifest,
) -> None:
    m = with_new_version(manifest, _reg(), ["v1", "v2"], 0.0)
    deleted = without_adapter(m, "sql")
    assert "sql" not in deleted.adapters and deleted.version == m.version + 1
    assert "sql" not in effective_config(deleted).model_types["llm_models"].models
    [old] = deleted.retiring
    assert (old.lora, old.loaded, old.retired_in) == ("sql@v1", ("v1", "v2"), deleted.version)
    assert loads_due(deleted, {"v1": _listing(), "v2": _listing()}) == []
    assert next_number(deleted, "sql") == 2  # sql@v1 is still loaded: registered again as v2
    again = with_new_version(deleted, _reg(), ["v1"], 0.0)
    assert again.adapters["sql"].current.version == 2
    assert next_number(with_unloaded(deleted, "sql@v1", {"v1", "v2"}), "sql") == 1
    with pytest.raises(KeyError):
        without_adapter(deleted, "sql")


def test_lora_names_are_recognised() -> None:
    assert is_lora_name("sql@v12") and not is_lora_name("sql") and not is_lora_name(None)
    assert not is_lora_name("user@example.com")


def test_the_manifest_file_is_replaced_whole_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.json"
    store.save(path, b"one")
    store.save(path, b"two")
    assert store.load(path) == b"two"
    assert os.listdir(path.parent) == ["registry.json"]  # no temp file left behind
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.load(tmp_path / "missing.json") is None


@pytest.mark.parametrize(
    ("header", "expected", "status"),
    [
        ("Bearer right", None, 503),
        (None, "right", 401),
        ("Basic right", "right", 401),
        ("Bearer ", "right", 401),
        ("Bearer wrong", "right", 403),
        ("Bearer righ", "right", 403),
    ],
)
def test_admin_refusals(header: str | None, expected: str | None, status: int) -> None:
    err = admin_refusal(header, expected)
    assert err is not None and err.status == status


def test_the_admin_token_is_accepted() -> None:
    assert admin_refusal("Bearer right", "right") is None
    assert admin_refusal("bearer right", "right") is None


def test_a_kv_aware_base_models_adapter_is_keyed_by_its_vllm_name_on_the_bases_blocks(
    manifest: Manifest, tmp_path: Path
) -> None:
    """An adapter of a kv_aware model routes on the same servers' blocks: it keeps the base's
    tokenizer and block size, and the ingress seeds its prompts' keys with the name vLLM loaded
    it under (its version's), the name vLLM's events carry for its blocks."""
    write_tokenizer(tmp_path)
    config = _config()
    config["llm_models"]["base"] |= {"tokenizer": str(tmp_path), "kv_block_size": 32}
    kv = with_new_version(with_config(manifest, config, "cfg.json"), _reg(), ["v1"], 0.0)
    effective = effective_config(kv)
    model = effective.model_types["llm_models"].models["sql"]
    assert (model.tokenizer, model.kv_block_size) == (str(tmp_path), 32)
    strategies = {"base": "kv_aware", "sql": "kv_aware"}
    keys = kv_prompts(effective, strategies, {"sql": "base"})
    assert keys["sql"] == PromptKeys(str(tmp_path), 32, "sql@v1")
    assert keys["base"] == PromptKeys(str(tmp_path), 32, None)
