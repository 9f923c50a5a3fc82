"""The kv_aware decision (serve_app/routing/kv/score): stay on the holder of the prompt's prefix
until its queue costs more than its hit saves; ties broken by load, then fairly per seed."""

from __future__ import annotations

from collections import Counter

from serve_app.core.config import KvAwareKnobs
from serve_app.routing.kv.score import ProviderView, cost, rank

KNOBS = KvAwareKnobs()
PROMPT = 4_000
HIT = 3_200  # the holder's cached prefix: 3,200 prompt tokens it need not compute


def _first(views: dict[str, ProviderView], seed: int = 0) -> str:
    return rank(PROMPT, views, KNOBS, seed)[0].provider


def test_an_idle_holder_wins() -> None:
    views = {"idle": ProviderView(), "holder": ProviderView(matched_tokens=HIT)}
    assert _first(views) == "holder"


def test_a_loaded_holder_keeps_the_prompt_while_its_queue_costs_less_than_its_hit_saves() -> None:
    # Each waiting request costs 512 tokens: 6 of them (3,072) < 3,200 saved; 7 (3,584) are not.
    keeps = {"idle": ProviderView(), "holder": ProviderView(matched_tokens=HIT, waiting=6)}
    spills = {"idle": ProviderView(), "holder": ProviderView(matched_tokens=HIT, waiting=7)}
    assert _first(keeps) == "holder"
    assert _first(spills) == "idle"
    # Known queued prefill counts token for token: 3,100 < 3,200 keeps, 3,300 spills.
    assert _first({**keeps, "holder": ProviderView(HIT, queued_prefill_tokens=3_100)}) == "holder"
    assert _first({**keeps, "holder": ProviderView(HIT, queued_prefill_tokens=3_300)}) == "idle"


def test_the_routers_own_requests_count_when_the_scrape_is_older_than_them() -> None:
    stale = ProviderView(matched_tokens=HIT, running=1, waiting=0, in_flight=9)  # 8 not yet seen
    assert _first({"idle": ProviderView(), "holder": stale}) == "idle"


def test_a_nearly_full_cache_costs_more_and_the_hit_never_covers_the_last_token() -> None:
    full = ProviderView(matched_tokens=HIT, kv_usage=0.99)
    assert cost(PROMPT, full, KNOBS)[0] > cost(PROMPT, ProviderView(), KNOBS)[0]
    assert cost(PROMPT, ProviderView(matched_tokens=PROMPT + 16), KNOBS) == (1.0, PROMPT - 1)


def test_ties_go_to_fewer_in_flight_then_to_a_per_seed_order_that_spreads() -> None:
    tied = {p: ProviderView() for p in ("a", "b", "c")}
    # One waiting request each (b's is this router's own): equal costs, b has more in flight.
    waiting = {p: ProviderView(waiting=1, in_flight=int(p == "b")) for p in tied}
    assert {_first(waiting, seed) for seed in range(100)} == {"a", "c"}
    assert _first(tied, seed=42) == _first(tied, seed=42)
    firsts = Counter(_first(tied, seed) for seed in range(3_000))
    assert set(firsts) == {"a", "b", "c"}
    assert min(firsts.values()) > 850  # about 1,000 each
