"""The registry actor on real Ray: persistence across kills, long-poll, acks, drain-then-unload."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from serve_app.cluster.follow import Followers
from serve_app.cluster.registry.actor import NAMESPACE, RegistryRef
from serve_app.cluster.registry.adapters import AdapterRegistration
from serve_app.cluster.registry.manifest import Manifest
from serve_app.demo.upstream import FakeUpstream
from tests.conftest import lora_dir, provider, wait_for


@pytest.fixture
def ref(serve_url: str, tmp_path: Path) -> Iterator[RegistryRef]:
    ref = RegistryRef(name=f"registry-{uuid.uuid4().hex[:8]}", path=str(tmp_path / "reg.json"))
    yield ref
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(ref.name, namespace=NAMESPACE), no_restart=True)


@pytest.fixture
def vllm(upstream_factory) -> FakeUpstream:
    return upstream_factory("vllm-reg")


def _config(url: str, weight: float = 1.0) -> dict:
    return {
        "llm_models": {"base": {"providers": [provider("reg-v", url, "vllm", weight=weight)]}},
        "active_models": {"llm_models": ["base"]},
    }


SQL = lora_dir("sql")


def _sql(source: str = SQL) -> AdapterRegistration:
    return AdapterRegistration(base_model="base", name="sql", source=source)


def _gone(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return True
    return False


def test_acknowledged_adapters_survive_killing_the_registry(
    ref: RegistryRef, vllm: FakeUpstream
) -> None:
    registry = ref.handle()
    assert ray.get(registry.publish_config.remote(_config(vllm.url), "cfg")).problems == []
    answer = ray.get(registry.register_adapter.remote(_sql(), 1.0))
    assert answer.status == 201
    assert vllm.loras == {"sql@v1": SQL}
    before: Manifest = ray.get(registry.current.remote())

    ray.kill(registry, no_restart=True)
    wait_for(lambda: _gone(ref.name), 30, "the registry to die")
    after: Manifest = ray.get(ref.handle().current.remote())  # a new actor, from the file
    assert after == before
    assert after.adapters["sql"].current.source == SQL


def test_a_crashed_registry_is_restarted_with_its_manifest(
    ref: RegistryRef, vllm: FakeUpstream
) -> None:
    registry = ref.handle()
    version = ray.get(registry.publish_config.remote(_config(vllm.url), "cfg")).version
    ray.kill(registry, no_restart=False)  # Ray restarts it (max_restarts=-1)

    def answers() -> bool:
        try:
            return ray.get(registry.current.remote(), timeout=5).version == version
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    wait_for(answers, 30, "the restarted registry to answer")


def test_long_poll_returns_on_change_and_times_out_without_one(
    ref: RegistryRef, vllm: FakeUpstream
) -> None:
    registry = ref.handle()
    v1 = ray.get(registry.publish_config.remote(_config(vllm.url), "cfg")).version
    pending = registry.wait_for_change.remote("f1", v1, [], 60)
    ready, _ = ray.wait([pending], timeout=0.5)
    assert not ready  # waits for a change instead of answering at once
    v2 = ray.get(registry.publish_config.remote(_config(vllm.url, weight=3), "cfg")).version
    changed: Manifest = ray.get(pending, timeout=10)
    assert changed.version == v2 > v1
    assert changed.models_config["llm_models"]["base"]["providers"][0]["weight"] == 3
    assert ray.get(registry.wait_for_change.remote("f1", v2, [], 0.1)) is None
    assert ray.get(registry.followers.remote()) == {"f1": v2}


def test_a_broken_config_changes_nothing(ref: RegistryRef, vllm: FakeUpstream) -> None:
    registry = ref.handle()
    v1 = ray.get(registry.publish_config.remote(_config(vllm.url), "cfg")).version
    broken = _config(vllm.url)
    del broken["llm_models"]["base"]["providers"][0]["api_host"]
    published = ray.get(registry.publish_config.remote(broken, "cfg"))
    assert published.problems == [("$.llm_models.base.providers[0].api_host", "Field required")]
    assert ray.get(registry.current.remote()).version == v1 == published.version


def test_the_ack_names_replicas_that_did_not_follow(ref: RegistryRef, vllm: FakeUpstream) -> None:
    registry = ref.handle()
    ray.get(registry.publish_config.remote(_config(vllm.url), "cfg"))
    ray.get(registry.current.remote("stuck-replica"))  # follows, then never polls again
    answer = ray.get(registry.register_adapter.remote(_sql(), 0.3))
    assert answer.status == 201
    assert b'"unconfirmed_replicas":["stuck-replica"]' in answer.body


def test_an_old_version_is_unloaded_only_once_no_replica_uses_it(
    ref: RegistryRef, vllm: FakeUpstream
) -> None:
    registry = ref.handle()
    ray.get(registry.publish_config.remote(_config(vllm.url), "cfg"))
    one, two = lora_dir("sql-v1"), lora_dir("sql-v2")
    ray.get(registry.register_adapter.remote(_sql(one), 1.0))
    v = ray.get(registry.current.remote("replica")).version
    answer = ray.get(registry.register_adapter.remote(_sql(two), 0.2))
    assert answer.status == 201 and vllm.loras == {"sql@v1": one, "sql@v2": two}

    # The replica has applied the new version but still has a request on v1.
    v2 = ray.get(registry.wait_for_change.remote("replica", v, [], 1)).version
    ray.get(registry.wait_for_change.remote("replica", v2, ["sql@v1"], 0.05))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert "sql@v1" in vllm.loras, "unloaded while a replica still used it"
        ray.get(registry.wait_for_change.remote("replica", v2, ["sql@v1"], 0.05))

    ray.get(registry.wait_for_change.remote("replica", v2, [], 0.05))
    wait_for(lambda: "sql@v1" not in vllm.loras, 10, "v1 to be unloaded")
    assert vllm.loras == {"sql@v2": two}
    unloads = [r.body for r in vllm.requests if r.path == "/v1/unload_lora_adapter"]
    assert unloads == [{"lora_name": "sql@v1"}]
    wait_for(
        lambda: ray.get(registry.current.remote()).retiring == (),
        10,
        "the manifest to forget v1",
    )


def test_a_follower_killed_without_leaving_is_forgotten_once_silent() -> None:
    """The registry's and the monitor's followers: one that left is gone at once; one that
    died (no long-poll under way, silent for the TTL) is gone then; one waiting on a long-poll
    stays however long it waits."""
    followers = Followers(ttl_s=0.05)
    followers.seen("left", 3)
    followers.seen("killed", 2)
    followers.seen("waiting", 3, waiting=1)
    followers.leave("left")
    assert followers.versions() == {"killed": 2, "waiting": 3}
    wait_for(lambda: "killed" not in followers.versions(), 5, "the killed one forgotten")
    assert followers.versions() == {"waiting": 3}  # still in its long-poll
    followers.done_waiting("waiting")  # its poll returned: heard from just now
    assert followers.versions() == {"waiting": 3}
    wait_for(lambda: not followers.versions(), 5, "a follower silent since forgotten")
