"""Profiles and provisioning: pure parsing, then the manager's Ray tasks against fake upstreams."""

from __future__ import annotations

import asyncio

import pytest
import ray

from serve_app.cluster.registry.actor import RegistryRef
from serve_app.core.config import ConfigError, ProviderConfig, parse_config
from serve_app.demo.upstream import FakeUpstream, Knobs
from serve_app.provision.manager import LLMModelManager
from serve_app.provision.profiles import parse_profiles, with_role_defaults
from serve_app.provision.tasks import ENSURED, placement
from tests.conftest import free_port, lora_dir, provider


def test_roles_take_both_forms_and_match_case_insensitively() -> None:
    profiles = parse_profiles(
        {
            "profiles": {
                "default": {
                    "models": {
                        "General": {"name": "m1", "parameters": {"top_p": 0.9, "num_predict": 64}},
                        "coding": "m2",
                    }
                }
            }
        }
    )
    roles = profiles.roles("default")
    assert roles["general"].name == "m1" and roles["general"].auto_download
    assert roles["coding"].name == "m2" and roles["coding"].provider == "ollama"
    with pytest.raises(ConfigError, match="no profile 'other'"):
        profiles.roles("other")


def test_role_parameters_are_defaults_the_request_overrides() -> None:
    role = parse_profiles(
        {
            "profiles": {
                "p": {
                    "models": {"r": {"name": "m1", "parameters": {"top_p": 0.9, "num_predict": 64}}}
                }
            }
        }
    ).roles("p")["r"]
    assert with_role_defaults({"model": "r", "top_p": 0.5}, role, "m1") == {
        "model": "m1",
        "top_p": 0.5,
        "max_tokens": 64,
    }
    assert with_role_defaults({"model": "r", "max_tokens": 5}, role, "m1")["max_tokens"] == 5


def test_bad_profiles_name_every_field() -> None:
    with pytest.raises(ConfigError) as info:
        parse_profiles(
            {
                "profiles": {
                    "p": {
                        "models": {
                            "a": {"provider": "ollama"},
                            "b": {"name": "x", "auto_download": "maybe"},
                        }
                    },
                    "q": {},
                }
            },
            "llm_models.json",
        )
    assert [path for path, _ in info.value.problems] == [
        "$.profiles.p.models.a.name",
        "$.profiles.p.models.b.auto_download",
        "$.profiles.q.models",
    ]


@pytest.fixture
def ollama(serve_url: str, upstream_factory) -> FakeUpstream:  # serve_url: Ray is up
    return upstream_factory("ollama-prov")


def _manager(ollama: FakeUpstream, dead: str) -> LLMModelManager:
    config = parse_config(
        {
            "local": {
                "m/general": {
                    "providers": [provider("op", ollama.url, "ollama", model_path="llama3:8b")]
                },
                "ollama-prov": {"providers": [provider("op2", ollama.url, "ollama")]},
                "m/broken": {
                    "providers": [provider("op3", ollama.url, "ollama", model_path="broken:1b")]
                },
                "m/down": {"providers": [provider("dead", dead, "ollama", model_path="down:1b")]},
                "m/vl": {"providers": [provider("vl", ollama.url, "vllm", model_path="qwen-7b")]},
                "m/manual": {
                    "providers": [
                        provider("om", ollama.url, "ollama", model_path="llama3:8b-manual")
                    ]
                },
            },
            "active_models": {
                "local": ["m/general", "ollama-prov", "m/broken", "m/down", "m/vl", "m/manual"]
            },
        }
    )
    roles = parse_profiles(
        {
            "profiles": {
                "default": {
                    "models": {
                        "general": "llama3:8b",
                        "ready": "ollama-prov",
                        "broken": "broken:1b",
                        "down": "down:1b",
                        "vl": {"name": "qwen-7b", "provider": "vllm"},
                        "cloud": {"name": "gpt-x", "provider": "openai"},
                        "manual": {"name": "llama3:8b-manual", "auto_download": False},
                    }
                }
            }
        }
    ).roles("default")
    return LLMModelManager(roles, config)


def _actions(report: dict) -> dict[str, tuple[str, str | None]]:
    return {s["role"]: (s["action"], s["detail"]) for s in report["statuses"]}


async def test_each_action_of_the_report(ollama: FakeUpstream) -> None:
    ollama.knobs = Knobs(pull_fail_after=None)
    manager = _manager(ollama, f"http://127.0.0.1:{free_port()}")
    report = await manager.ensure_models_installed(["general", "ready", "vl", "cloud", "down"])
    actions = _actions(report)
    assert actions["general"][0] == "installed"
    assert actions["ready"][0] == "exists"
    assert actions["vl"][0] == "error" and actions["vl"][1].startswith("missing_on_vllm")
    assert actions["cloud"] == ("skipped", "unsupported_provider")
    assert actions["down"][0] == "unavailable"
    status = next(s for s in report["statuses"] if s["role"] == "general")
    assert status["provider_id"] == "op" and status["provider"] == "ollama"
    # The test session's Ray node has address 127.0.0.1 (single-node mode), the providers'.
    assert status["node"] == ray.get_runtime_context().get_node_id()
    assert status["detail"] is None

    again = _actions(await manager.ensure_models_installed(["GENERAL"]))
    assert again == {"general": ("skipped", "already_ensured")}
    forced = _actions(await manager.ensure_models_installed(["general"], force=True))
    assert forced["general"][0] == "updated"
    assert ollama.count("/api/pull") == 2


async def test_a_role_pointed_at_another_model_is_ensured_again(ollama: FakeUpstream) -> None:
    """A new profile (or models config) keeps what was ensured only for roles that still name
    the same model on the same providers."""
    ollama.knobs = Knobs(pull_fail_after=None)
    manager = _manager(ollama, f"http://127.0.0.1:{free_port()}")
    assert _actions(await manager.ensure_models_installed(["general"]))["general"][0] in ENSURED
    config, roles = manager._config, manager._roles
    manager.update(roles, config)  # the same again: still ensured
    again = _actions(await manager.ensure_models_installed(["general"]))
    assert again == {"general": ("skipped", "already_ensured")}
    repointed = {**roles, "general": roles["manual"].model_copy(update={"auto_download": True})}
    manager.update(repointed, config)
    pulls = ollama.count("/api/pull")
    moved = _actions(await manager.ensure_models_installed(["general"]))
    assert moved["general"][0] == "installed" and ollama.count("/api/pull") == pulls + 1


async def test_a_pull_that_breaks_midway_is_an_error_with_the_reason(ollama: FakeUpstream) -> None:
    ollama.knobs = Knobs(pull_fail_after=2)
    manager = _manager(ollama, f"http://127.0.0.1:{free_port()}")
    actions = _actions(await manager.ensure_models_installed(["broken", "manual", "nope"]))
    assert actions["nope"][1].startswith("unknown_role")
    assert actions["broken"][0] == "error"
    assert actions["broken"][1].startswith("download_failed: pull broken:1b: connection reset")
    assert actions["manual"] == ("skipped", "auto_download_disabled")
    # Not cached: the next call tries again.
    ollama.knobs = Knobs()
    assert _actions(await manager.ensure_models_installed(["broken"]))["broken"][0] == "installed"


async def test_concurrent_calls_share_one_pull(ollama: FakeUpstream) -> None:
    ollama.knobs = Knobs(pull_step_s=0.1)
    manager = _manager(ollama, f"http://127.0.0.1:{free_port()}")
    first, second = await asyncio.gather(
        manager.ensure_models_installed(["general"]), manager.ensure_models_installed(["general"])
    )
    assert _actions(first) == _actions(second) and _actions(first)["general"][0] == "installed"
    assert ollama.count("/api/pull") == 1


async def test_role_adapters_are_registered_through_the_registry(
    serve_url: str, upstream_factory, tmp_path
) -> None:
    vllm = upstream_factory("vllm-tuned")
    registry = RegistryRef(name=f"prov-registry-{vllm.port}", path=str(tmp_path / "reg.json"))
    config_doc = {
        "gpu": {
            "m/base": {"providers": [provider("vt", vllm.url, "vllm", model_path="vllm-tuned")]}
        },
        "active_models": {"gpu": ["m/base"]},
    }
    await registry.handle().publish_config.remote(config_doc, "cfg")

    def manager(source: str, auto_update: bool) -> LLMModelManager:
        adapter = {"name": "sql", "source": source, "auto_update": auto_update}
        role = {"name": "vllm-tuned", "provider": "vllm", "adapters": [adapter]}
        roles = parse_profiles({"profiles": {"p": {"models": {"tuned": role}}}}).roles("p")
        return LLMModelManager(roles, parse_config(config_doc), registry)

    one, two = lora_dir("tuned-1"), lora_dir("tuned-2")
    first = _actions(await manager(one, False).ensure_models_installed())
    assert first["tuned"][0] == "exists"
    assert first["tuned:sql"] == ("installed", "version 1")
    assert vllm.loras == {"sql@v1": one}
    again = _actions(await manager(two, False).ensure_models_installed())
    assert again["tuned:sql"][0] == "exists"  # no auto_update: the registered version stays
    updated = _actions(await manager(two, True).ensure_models_installed())
    assert updated["tuned:sql"] == ("updated", "version 2")
    ray.kill(registry.handle(), no_restart=True)


def test_a_provider_on_no_ray_node_is_provisioned_where_the_caller_is(serve_url: str) -> None:
    # A documentation address (never contacted: placement only compares node addresses).
    config = ProviderConfig.model_validate(provider("far", "http://192.0.2.99:1", "ollama"))
    options, note = placement(config)
    assert note == "no single Ray node has IP 192.0.2.99; ran on the caller's node"
    strategy = options["scheduling_strategy"]
    assert strategy.node_id == ray.get_runtime_context().get_node_id() and not strategy.soft
