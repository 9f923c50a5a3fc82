"""Strategies and provider planning: pure functions, exact expectations."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from serve_app.core.config import ModelConfig, ProviderConfig
from serve_app.core.errors import RouterError
from serve_app.core.schemas import Endpoint, RequestMeta
from serve_app.routing.selection import candidate_tiers, initial_states, plan_attempts
from serve_app.routing.strategies import (
    ConfigOrder,
    LeastInFlight,
    RoundRobin,
    Stats,
    WeightedRandom,
    make_strategy,
)

IDLE = Stats()


def prov(pid: str, **kw: object) -> ProviderConfig:
    fields = {
        "id": pid,
        "api_host": "http://127.0.0.1:1",
        "api_type": "openai",
        "input_size": 1000,
        **kw,
    }
    return ProviderConfig.model_validate(fields)


def meta(tokens: int = 10, tools: bool = False) -> RequestMeta:
    return RequestMeta(Endpoint.CHAT, "m", False, tokens, tools, "r")


def ids(providers: list[ProviderConfig]) -> list[str]:
    return [p.id for p in providers]


def test_weighted_random_first_pick_follows_weights() -> None:
    ps = [prov("a", weight=1.0), prov("b", weight=3.0), prov("c", weight=0.0)]
    strat = WeightedRandom(random.Random(7))
    firsts = Counter(strat.order(ps, IDLE)[0].id for _ in range(20_000))
    assert firsts["c"] == 0
    assert abs(firsts["b"] / 20_000 - 0.75) < 0.015
    assert sorted(ids(strat.order(ps, IDLE))) == ["a", "b", "c"]


def test_round_robin_rotates() -> None:
    ps = [prov("a"), prov("b"), prov("c")]
    rr = RoundRobin()
    assert [ids(rr.order(ps, IDLE)) for _ in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_least_in_flight_prefers_the_less_loaded_of_two() -> None:
    ps = [prov("a"), prov("b")]
    load = {"a": 5, "b": 1}
    strat = LeastInFlight(random.Random(1))
    assert all(strat.order(ps, Stats(in_flight=load))[0].id == "b" for _ in range(50))
    three = [prov("a"), prov("b"), prov("c")]
    load3 = {"a": 9, "b": 0, "c": 4}
    firsts = Counter(strat.order(three, Stats(in_flight=load3))[0].id for _ in range(3000))
    assert firsts["a"] == 0  # the most loaded never wins a pair
    assert ids(strat.order(three, Stats(in_flight=load3)))[1:] in (["c", "a"], ["b", "a"])


def test_make_strategy_rejects_unknown_names() -> None:
    with pytest.raises(ValueError):
        make_strategy("fastest")  # type: ignore[arg-type]


def plan(
    model: ModelConfig, m: RequestMeta, states=None, now: float = 0.0, attempts: int = 3
) -> list[str]:
    states = states or initial_states([model])
    candidates = candidate_tiers("m", model, m, states, now)
    return ids(plan_attempts(candidates, ConfigOrder(), IDLE, attempts))


def test_primaries_then_sleeping_each_tier_capped() -> None:
    model = ModelConfig(
        providers=[prov("a"), prov("b"), prov("c")], providers_sleep=[prov("s1"), prov("s2")]
    )
    assert plan(model, meta()) == ["a", "b", "c", "s1", "s2"]
    assert plan(model, meta(), attempts=2) == ["a", "b", "s1", "s2"]


def test_eligibility_by_input_size_and_tools() -> None:
    model = ModelConfig(
        providers=[prov("small", input_size=100), prov("tools", input_size=100, tool_calling=True)],
        providers_sleep=[prov("big", input_size=10_000)],
    )
    assert plan(model, meta(tokens=100)) == ["small", "tools", "big"]
    assert plan(model, meta(tokens=101)) == ["big"]
    assert plan(model, meta(tools=True)) == ["tools"]
    with pytest.raises(RouterError) as info:
        plan(model, meta(tokens=10_001))
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    with pytest.raises(RouterError) as info:
        plan(model, meta(tokens=101, tools=True))
    assert info.value.code == "context_length_exceeded" and "largest: 100" in info.value.message
    no_tools = ModelConfig(providers=[prov("x")])
    with pytest.raises(RouterError) as info:
        plan(no_tools, meta(tools=True))
    assert info.value.code == "tools_unsupported"


def test_recently_failed_and_busy_providers() -> None:
    model = ModelConfig(
        providers=[prov("a", max_concurrency=2), prov("b")], providers_sleep=[prov("s")]
    )
    states = initial_states([model])
    states["b"].down_until = 10.0
    assert plan(model, meta(), states, now=5.0) == ["a", "s"]
    states["a"].in_flight = 2
    assert plan(model, meta(), states, now=5.0) == ["s"]
    states["s"].down_until = 8.0
    # nothing ready: the marked-down ones are tried, soonest recovery first, not refused
    assert plan(model, meta(), states, now=5.0) == ["s", "b"]
    states["b"].down_until = states["s"].down_until = 0.0
    assert plan(model, meta(), states, now=5.0) == ["b", "s"]


def test_every_provider_at_its_limit_is_429() -> None:
    model = ModelConfig(providers=[prov("a", max_concurrency=1)])
    states = initial_states([model])
    states["a"].in_flight = 1
    with pytest.raises(RouterError) as info:
        plan(model, meta(), states)
    assert info.value.status == 429 and info.value.headers == {"retry-after": "1"}
