"""llm-router's strategies and the shared-state bookkeeping: pure, exact sequences."""

from __future__ import annotations

from collections import Counter

import pytest

from serve_app.cluster.leases import Latency, LeaseTable, Pins
from serve_app.core.config import ProviderConfig, StrategyName
from serve_app.routing.strategies import (
    Balanced,
    DynamicWeighted,
    PinView,
    SmoothWeighted,
    Stats,
    slot_order,
)


def prov(pid: str, port: int = 1, **kw: object) -> ProviderConfig:
    return ProviderConfig.model_validate(
        {
            "id": pid,
            "api_host": f"http://127.0.0.1:{port}",
            "api_type": "ollama",
            "input_size": 1000,
            **kw,
        }
    )


def test_balanced_picks_the_least_used_then_config_order() -> None:
    ps = [prov("a"), prov("b"), prov("c")]
    uses: Counter[str] = Counter()
    picks = []
    for _ in range(7):
        first = Balanced().order(ps, Stats(uses=uses))[0].id
        uses[first] += 1
        picks.append(first)
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]
    # counts from elsewhere (other replicas) steer it: c is far behind
    assert [p.id for p in Balanced().order(ps, Stats(uses={"a": 9, "b": 4}))] == ["c", "b", "a"]


def test_weighted_is_smooth_and_exact_over_every_window() -> None:
    ps = [prov("a", weight=5), prov("b", weight=1), prov("c", weight=1)]
    strat = SmoothWeighted()
    picks = [strat.order(ps, Stats())[0].id for _ in range(70)]
    # nginx's smooth sequence: the heavy provider is spread out, not 5 in a row
    assert picks[:7] == ["a", "a", "b", "a", "c", "a", "a"]
    for start in range(len(picks) - 7):
        window = Counter(picks[start : start + 7])
        assert window == {"a": 5, "b": 1, "c": 1}, (start, window)
    order = strat.order(ps, Stats())
    assert len(order) == 3 and {p.id for p in order} == {"a", "b", "c"}


def test_dynamic_weighted_follows_latency_and_recovers() -> None:
    ps = [prov("fast", weight=1), prov("slow", weight=1)]
    strat = DynamicWeighted()
    equal = Counter(strat.order(ps, Stats())[0].id for _ in range(100))
    assert equal == {"fast": 50, "slow": 50}
    slow = Stats(latency={"fast": 0.1, "slow": 0.4})
    shares = Counter(strat.order(ps, slow)[0].id for _ in range(100))
    assert shares == {"fast": 80, "slow": 20}  # weights 1 : 0.25
    crawling = Stats(latency={"fast": 0.1, "slow": 100.0})
    floor = Counter(strat.order(ps, crawling)[0].id for _ in range(105))
    assert floor["slow"] == 5  # never starved: 5% of its weight
    recovered = Stats(latency={"fast": 0.1, "slow": 0.1})
    assert Counter(strat.order(ps, recovered)[0].id for _ in range(100)) == {
        "fast": 50,
        "slow": 50,
    }


def test_latency_average_moves_by_sample_count() -> None:
    lat = Latency()
    lat.add("p", 1.0, 1, alpha=0.5)
    assert lat.average["p"] == 1.0
    lat.add("p", 0.0, 1, alpha=0.5)
    assert lat.average["p"] == 0.5
    lat.add("p", 0.0, 2, alpha=0.5)  # two samples of 0 at once: as two single ones
    assert lat.average["p"] == pytest.approx(0.125)
    lat.add("p", 5.0, 0, alpha=0.5)
    assert lat.average["p"] == pytest.approx(0.125)


def fill(
    strategy: StrategyName, ps: list[ProviderConfig], n: int, model: str = "m"
) -> list[str | None]:
    """Takes n slots one after another, nothing released, pins kept as the broker does."""
    busy: Counter[str] = Counter()
    pins = Pins()
    out: list[str | None] = []
    for _ in range(n):
        order = slot_order(strategy, model, ps, busy, pins.view())
        if not order:
            out.append(None)
            continue
        busy[order[0].id] += 1
        pins.touch(order[0].host_key, model, 0.0)
        out.append(order[0].id)
    return out


def test_nworkers_fills_least_loaded_layer_by_layer() -> None:
    ps = [prov("p1", 1, nworkers=2), prov("p2", 2, nworkers=3), prov("p3", 3, nworkers=1)]
    assert fill("first_available_optim_nworkers", ps, 7) == [
        "p1",
        "p2",
        "p3",
        "p1",
        "p2",
        "p2",
        None,
    ]


def test_first_available_is_exclusive_in_config_order() -> None:
    ps = [prov("a", 1, nworkers=5), prov("b", 2), prov("c", 3)]
    assert fill("first_available", ps, 4) == ["a", "b", "c", None]  # nworkers ignored
    busy = {"a": 1}
    assert [p.id for p in slot_order("first_available", "m", ps, busy, PinView())] == ["b", "c"]


def test_optim_prefers_last_host_then_loaded_hosts_then_free_ones() -> None:
    ps = [prov("h1", 1), prov("h2", 2), prov("h3", 3), prov("h4", 4)]
    pins = PinView(
        owner={"127.0.0.1:2": "m", "127.0.0.1:3": "m", "127.0.0.1:4": "other"},
        last_host={"m": "127.0.0.1:3"},
    )
    order = slot_order("first_available_optim", "m", ps, {}, pins)
    assert [p.id for p in order] == ["h3", "h2", "h1"]  # h4 serves another model: skipped
    order = slot_order("first_available_optim", "m", ps, {"h3": 1}, pins)
    assert [p.id for p in order] == ["h2", "h1"]
    # the other model sees it the other way round
    assert [p.id for p in slot_order("first_available_optim", "other", ps, {}, pins)] == [
        "h4",
        "h1",
    ]


def test_optim_fill_reuses_the_host_that_served_the_model() -> None:
    # two providers on one host (a host is one model server), one elsewhere
    ps = [prov("far", 9), prov("near-a", 1), prov("near-b", 1)]
    pins = Pins()
    pins.touch("127.0.0.1:1", "m", 0.0)
    order = slot_order("first_available_optim", "m", ps, {}, pins.view())
    assert [p.id for p in order] == ["near-a", "near-b", "far"]


def test_nworkers_host_reuse_breaks_ties_between_equal_loads() -> None:
    ps = [prov("a", 1, nworkers=2), prov("b", 2, nworkers=2)]
    pins = PinView(owner={"127.0.0.1:2": "m"}, last_host={"m": "127.0.0.1:2"})
    order = slot_order("first_available_optim_nworkers", "m", ps, {}, pins)
    assert [p.id for p in order] == ["b", "a"]
    order = slot_order("first_available_optim_nworkers", "m", ps, {"b": 1}, pins)
    assert [p.id for p in order] == ["a", "b"]  # load first


def test_leases_expire_unless_renewed_and_come_back_after_a_restart() -> None:
    table = LeaseTable()
    a = table.grant("p1", "r1", now=0.0, lease_s=10.0)
    b = table.grant("p1", "r2", now=0.0, lease_s=10.0)
    assert table.busy == {"p1": 2}
    assert table.others("r1", ["p1", "p2"]) == {"p1": 1}
    table.renew("r1", [(a.id, "p1")], now=8.0, lease_s=10.0)
    assert [lease.id for lease in table.expire(10.0)] == [b.id]  # r2 stopped renewing
    assert table.busy == {"p1": 1}
    assert table.release("r2", [a.id]) == []  # not r2's to give back
    assert [lease.id for lease in table.release("r1", [a.id])] == [a.id]
    assert table.busy == {}
    fresh = LeaseTable()  # the broker restarted: a renewal re-creates what it knew
    fresh.renew("r1", [("old-1", "p1"), ("old-2", "p2")], now=0.0, lease_s=5.0)
    assert fresh.busy == {"p1": 1, "p2": 1}
    assert fresh.grant("p1", "r1", 0.0, 5.0).id not in {"old-1", "old-2"}


def test_pins_lapse_after_idle_ttl_but_not_while_busy() -> None:
    pins = Pins()
    pins.touch("h1", "m", now=0.0)
    pins.touch("h2", "n", now=0.0)
    pins.refresh("h2", now=50.0)
    assert pins.lapse(now=61.0, ttl={"m": 60.0, "n": 60.0}, busy_hosts=set()) == ["h1"]
    assert pins.view() == PinView(owner={"h2": "n"}, last_host={"n": "h2"})
    assert pins.lapse(now=500.0, ttl={"n": 60.0}, busy_hosts={"h2"}) == []
    assert pins.lapse(now=500.0, ttl={"n": 60.0}, busy_hosts=set()) == ["h2"]
    assert pins.view() == PinView()
