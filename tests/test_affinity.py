"""Cache- and load-aware routing, pure: prompt blocks and their hash chains, the prefix index
and its journal, consistent hashing, load signals and the three strategies."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import orjson
import pytest

from serve_app.core.config import ProviderConfig, RoutingConfig
from serve_app.routing.load import (
    COLD_PENALTY,
    KV_WEIGHT,
    LoadSignal,
    load_figure,
    parse_ollama_ps,
    parse_vllm_metrics,
)
from serve_app.routing.prefix import (
    IndexJournal,
    PrefixIndex,
    block_hashes,
    prompt_text,
    request_blocks,
)
from serve_app.routing.sessions import Ring
from serve_app.routing.strategies import Stats, make_strategy

WIRE = Path(__file__).parent / "wire"


def prov(pid: str) -> ProviderConfig:
    return ProviderConfig.model_validate(
        {"id": pid, "api_host": "http://127.0.0.1:9", "api_type": "vllm", "input_size": 1000}
    )


PS = [prov("a"), prov("b"), prov("c")]


# --- blocks and chains ---------------------------------------------------------------------------


def test_block_hashes_are_a_chain_of_full_blocks_and_the_same_in_every_process() -> None:
    # Fixed values: Python's own hash() differs per process; replicas must agree.
    assert block_hashes("a" * 40, 16) == [1421536839330484490, 9158085631029619203]
    one = "x" * 48 + "common tail!" * 4
    two = "x" * 48 + "other tail.." * 4
    h1, h2 = block_hashes(one, 16), block_hashes(two, 16)
    assert len(h1) == len(h2) == 6  # 96 characters: six full blocks
    assert h1[:3] == h2[:3] and all(a != b for a, b in zip(h1[3:], h2[3:], strict=True))
    # The same block after a different prefix hashes differently (it is a chain).
    assert block_hashes("b" * 16 + "a" * 16, 16)[1] != block_hashes("a" * 32, 16)[1]
    assert block_hashes("a" * 47, 16) == block_hashes("a" * 32, 16)  # partial block left out
    assert len(block_hashes("é" * 16, 16)) == 2  # UTF-8 bytes


def test_a_conversation_growing_turn_by_turn_renders_to_growing_prefixes() -> None:
    history = [{"role": "system", "content": "S" * 300}, {"role": "user", "content": "hi"}]
    first = prompt_text({"model": "m", "messages": history, "temperature": 0.1})
    history += [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    second = prompt_text({"messages": history, "model": "m", "stream": True})
    assert second.startswith(first) and len(second) > len(first)
    # Parameters are not the prompt; roles and tool definitions are.
    assert prompt_text({"messages": history[:2], "max_tokens": 9}) == first
    assert prompt_text({"messages": [{**history[0], "role": "user"}, history[1]]}) != first
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert prompt_text({"messages": history[:2], "tools": tools}).endswith(first)


@pytest.mark.parametrize(
    ("one", "two"),
    [
        ({"prompt": "P" * 100}, {"prompt": "P" * 100 + "Q"}),  # completions, Ollama generate
        (
            {"system": "S" * 50, "messages": [{"role": "user", "content": "a"}]},  # Anthropic
            {
                "system": "S" * 50,
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}]},
                    {"role": "assistant", "content": "b"},
                ],
            },
        ),
        (
            {"instructions": "I" * 50, "input": [{"role": "user", "content": "x"}]},  # Responses
            {
                "instructions": "I" * 50,
                "input": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
            },
        ),
    ],
)
def test_every_dialect_renders_its_prompt_in_template_order(one: dict, two: dict) -> None:
    head = prompt_text(one)
    assert len(prompt_text(two)) > len(head) > 50 and prompt_text(two).startswith(head)


def test_request_blocks_of_bodies_that_are_no_json_object_are_empty() -> None:
    assert request_blocks(b"not json", 16) == []
    assert request_blocks(b"[1, 2]", 16) == []
    body = orjson.dumps({"messages": [{"role": "user", "content": "z" * 64}]})
    assert len(request_blocks(body, 16)) == 4


# --- the index and its journal -------------------------------------------------------------------


def test_index_matches_the_longest_prefix_and_evicts_tails_first() -> None:
    index = PrefixIndex(entries=6)
    chain = block_hashes("q" * 64, 16)  # 4 blocks
    index.add("a", chain)
    assert index.matches(["a", "b"], chain) == {"a": 4, "b": 0}
    assert index.matches(["a"], [*chain[:2], 999, 998]) == {"a": 2}
    assert index.matches(["a"], []) == {"a": 0}
    other = block_hashes("r" * 64, 16)
    index.add("a", other)  # 8 hashes for 6 entries: the two oldest go, the tails
    assert index.sizes() == {"a": 6}
    assert index.matches(["a"], other) == {"a": 4}
    assert index.matches(["a"], chain) == {"a": 2}  # its first blocks outlive its last ones
    copy = PrefixIndex(entries=6)
    for provider, dumped in index.dump().items():
        copy.add(provider, dumped)
    assert copy.dump() == index.dump()
    index.keep_only(["b"])
    assert index.sizes() == {}


def test_the_journal_gives_each_replica_what_it_lacks_and_a_reset_when_too_far_behind() -> None:
    journal = IndexJournal(entries=100, keep=3)
    c1, c2, c3, c4 = ([i * 10 + k for k in range(3)] for i in range(1, 5))
    journal.add("r1", [("a", c1), ("b", c2)])
    delta = journal.delta("r2", 0)
    assert (delta.seq, delta.chains, delta.reset) == (2, [("a", c1), ("b", c2)], False)
    assert journal.delta("r1", 0).chains == []  # its own chains it has already
    journal.add("r2", [("a", c3)])
    assert journal.delta("r1", 2).chains == [("a", c3)]
    journal.add("r2", [("c", c4)])  # the journal keeps 3: chain 1 is gone from it
    behind = journal.delta("r3", 0)
    assert behind.reset and sorted(p for p, _ in behind.chains) == ["a", "b", "c"]
    rebuilt = PrefixIndex(100)
    for provider, chain in behind.chains:
        rebuilt.add(provider, chain)
    assert rebuilt.dump() == journal.index.dump()
    assert journal.delta("r9", 99).reset  # ahead of the journal: it was restarted
    assert journal.added == {"r1": 2, "r2": 2}


# --- consistent hashing --------------------------------------------------------------------------


def test_sessions_spread_stay_put_and_only_the_lost_providers_move() -> None:
    ring = Ring(["a", "b", "c"])
    sessions = [f"user-{i}" for i in range(600)]
    home = {s: ring.walk(s)[0] for s in sessions}
    assert min(Counter(home.values()).values()) > 100  # each has its share
    assert Ring(["c", "a", "b"]).walk("user-1")[0] == home["user-1"]  # order-free
    without_b = Ring(["a", "c"])
    for s in sessions:
        now = without_b.walk(s)[0]
        if home[s] != "b":
            assert now == home[s]  # nobody else moves
        else:
            assert now == ring.walk(s)[1]  # b's go to their next provider on the ring
    assert Ring([]).walk("x") == ()
    assert sorted(ring.walk("x")) == ["a", "b", "c"]


def test_session_affinity_rehomes_while_its_provider_is_away_and_returns() -> None:
    strategy = make_strategy("session_affinity")
    stats = Stats(session="conversation-7")
    home = strategy.order(PS, stats)[0]
    again = make_strategy("session_affinity")  # another replica: same answer, no shared state
    assert again.order(list(reversed(PS)), stats)[0] == home
    away = [p for p in PS if p is not home]
    second = strategy.order(PS, stats)[1]
    assert strategy.order(away, stats)[0] == second  # failover and re-home agree
    assert strategy.order(PS, stats)[0] == home  # back: it is still the ring's choice
    homes = {strategy.order(PS, Stats(session=f"s{i}"))[0].id for i in range(50)}
    assert homes == {"a", "b", "c"}


def test_session_affinity_yields_to_load_beyond_the_bound() -> None:
    strategy = make_strategy("session_affinity", RoutingConfig(max_load_imbalance=2))
    home = strategy.order(PS, Stats(session="s"))[0]
    load = {p.id: 0.0 for p in PS}
    load[home.id] = 2.0  # at the bound: still home
    assert strategy.order(PS, Stats(session="s", load=load))[0] == home
    load[home.id] = 2.5
    first = strategy.order(PS, Stats(session="s", load=load))[0]
    assert first != home and load[first.id] == 0.0
    no_session = strategy.order(PS, Stats(load={"a": 3, "b": 1, "c": 2}))
    assert [p.id for p in no_session] == ["b", "c", "a"]


# --- prefix affinity -----------------------------------------------------------------------------


def test_prefix_affinity_keeps_the_holder_while_its_queue_costs_less_than_its_hit_saves() -> None:
    """kv_aware's cost on text blocks: 64-character blocks are 16 tokens each, so of a
    1,600-token prompt c was sent 80 blocks (1,280 tokens it need not compute) and b 10 (160).
    A request waiting at c costs 512: c keeps the prompt with two waiting (1,024 < 1,280 - 160)
    and b takes it with three; counted from the engine's signals, or from this replica's
    requests alone where a provider has none (Ollama, hosted APIs)."""
    routing = RoutingConfig(prefix_block_chars=64, max_load_imbalance=4)
    strategy = make_strategy("prefix_affinity", routing)
    index = PrefixIndex(1000)
    chain = block_hashes("p" * 6400, 64)  # 100 blocks
    index.add("b", chain[:10])
    index.add("c", chain[:80])

    def order(waiting_c: float = 0, **stats: object) -> list[str]:
        signals = {pid: LoadSignal(running=0, waiting=0) for pid in "abc"}
        signals["c"] = LoadSignal(running=0, waiting=waiting_c)
        base = {
            "text_blocks": chain,
            "index": index,
            "signals": signals,
            "load": {pid: s.waiting for pid, s in signals.items()},
            "prompt_tokens": 1600,
        }
        return [p.id for p in strategy.order(PS, Stats(**{**base, **stats}))]

    assert order(0) == ["c", "b", "a"]  # the longest prefix first, failover by cost
    assert order(2) == ["c", "b", "a"]
    assert order(3) == ["b", "a", "c"]
    # Without signals: this replica's requests there are the queue.
    assert order(signals={}, load={}, in_flight={"c": 2}) == ["c", "b", "a"]
    assert order(signals={}, load={}, in_flight={"c": 3}) == ["b", "a", "c"]
    # A prompt nobody was sent: the cost is the queue alone.
    cold = block_hashes("q" * 6400, 64)
    waiting = {"a": 1.0, "b": 0.0, "c": 2.0}
    busy = {pid: LoadSignal(running=0, waiting=w) for pid, w in waiting.items()}
    assert order(text_blocks=cold, signals=busy, load=waiting) == ["b", "a", "c"]
    # max_load_imbalance stays an outer bound: past it the next cheapest within it goes first.
    tight = make_strategy("prefix_affinity", routing.model_copy(update={"max_load_imbalance": 1}))
    stats = Stats(
        text_blocks=chain,
        index=index,
        signals={"c": LoadSignal(running=0, waiting=2)},
        load={"a": 0.0, "b": 0.0, "c": 2.0},
        prompt_tokens=1600,
    )
    assert [p.id for p in tight.order(PS, stats)] == ["b", "c", "a"]
    # Nothing to match: least loaded, then least used.
    assert order(text_blocks=[], load={"a": 1.0, "b": 0.0, "c": 2.0}) == ["b", "a", "c"]
    unindexed = Stats(text_blocks=chain, uses={"a": 5, "b": 1, "c": 3})
    assert [p.id for p in strategy.order(PS, unindexed)] == ["b", "c", "a"]


# --- kv_aware -------------------------------------------------------------------------------------


def test_kv_aware_stays_on_the_holder_until_its_queue_costs_more_than_its_hit_saves() -> None:
    """A 1,600-token prompt (100 blocks of 16) that c holds 80 blocks of: 1,280 tokens c need
    not compute. Each request waiting at c costs 512 (the default), so c keeps it with two
    waiting (1,024 < 1,280) and loses it to the idle a with three (1,536 > 1,280); b, which
    holds 10 blocks, comes between. The router's own prompts sent there and not yet answering
    count by their tokens. Without an index or a prompt: least loaded."""
    strategy = make_strategy("kv_aware", RoutingConfig(), block_size=16)
    keys = list(range(100))
    held = {"b": 160, "c": 1_280}  # 10 and 80 of its blocks: the tokens served from cache

    def order(waiting_c: float, **stats: object) -> list[str]:
        signals = {
            "a": LoadSignal(running=0, waiting=0),
            "b": LoadSignal(running=0, waiting=0),
            "c": LoadSignal(running=0, waiting=waiting_c),
        }
        base = {"prefix": keys, "held": held, "signals": signals, "prompt_tokens": 1600}
        return [p.id for p in strategy.order(PS, Stats(**{**base, **stats}))]

    assert order(0) == ["c", "b", "a"]
    assert order(2) == ["c", "b", "a"]
    assert order(3) == ["b", "a", "c"]
    assert strategy.spills == 1  # the last one: the holder lost it for load
    # The router's own requests there not yet running count as waiting too.
    assert order(0, in_flight={"c": 3}) == ["b", "a", "c"]
    # Tokens of its prompts not yet computed there: c saves 1,120 more than b, 1,280 more than a.
    assert order(0, queued_prefill={"c": 1_100}) == ["c", "b", "a"]
    assert order(0, queued_prefill={"c": 1_200}) == ["b", "c", "a"]
    assert order(0, queued_prefill={"c": 1_300}) == ["b", "a", "c"]
    # A nearly full cache: past 0.9 use, up to 8,192 tokens more.
    full = {"c": LoadSignal(running=0, waiting=0, kv_usage=1.0)}
    assert order(0, signals=full)[-1] == "c"
    assert order(0, prefix=[])[0] == "a"  # no prompt: least loaded, config order on ties
    assert order(0, held=None, load={"a": 2.0, "b": 1.0, "c": 3.0}) == ["b", "a", "c"]


def test_kv_aware_ranks_a_provider_without_events_by_its_text_prefix() -> None:
    """a and b publish KV events, c does not: c's share of the prompt is guessed from the text
    blocks routed to it (80 of 64 characters: 1,280 tokens) rather than counted as nothing,
    and a provider with events is never matched by text."""
    events = {"endpoint": "tcp://*:5557"}
    a, b = (prov(pid).model_copy(update={"kv_events": events}) for pid in "ab")
    candidates = [a, b, prov("c")]
    strategy = make_strategy("kv_aware", RoutingConfig(prefix_block_chars=64), block_size=16)
    text = PrefixIndex(1000)
    chain = block_hashes("p" * 6400, 64)
    text.add("b", chain)  # routed there, but b's engine reports what it holds
    text.add("c", chain[:80])

    def order(**stats: object) -> list[str]:
        base = {
            "prefix": list(range(100)),
            "held": {"a": 160},  # 10 blocks
            "text_blocks": chain,
            "index": text,
            "prompt_tokens": 1600,
        }
        return [p.id for p in strategy.order(candidates, Stats(**{**base, **stats}))]

    assert order() == ["c", "a", "b"]
    assert strategy.spills == 0
    # Its queue weighs against the guessed hit as against a reported one.
    assert order(signals={"c": LoadSignal(running=0, waiting=3)}) == ["a", "b", "c"]
    assert strategy.spills == 1
    # Without its text blocks c holds nothing: a's reported blocks win.
    assert order(text_blocks=[])[0] == "a"


def test_kv_events_and_tokenizer_are_checked_in_the_models_config() -> None:
    vllm = {"id": "v", "api_host": "http://127.0.0.1:9", "api_type": "vllm", "input_size": 1000}
    events = {"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}
    assert ProviderConfig.model_validate({**vllm, "kv_events": events}).kv_events is not None
    with pytest.raises(ValueError, match="only vllm providers publish"):
        ProviderConfig.model_validate({**vllm, "api_type": "ollama", "kv_events": events})
    with pytest.raises(ValueError, match="endpoint"):
        ProviderConfig.model_validate({**vllm, "kv_events": {"endpoint": "localhost:5557"}})
    with pytest.raises(ValueError):
        RoutingConfig.model_validate({"kv_aware": {"saturation_threshold": 1.0}})


# --- load signals --------------------------------------------------------------------------------


def test_vllm_metrics_recorded_from_a_real_server_parse_to_its_gauges() -> None:
    page = (WIRE / "vllm_metrics.txt").read_text()  # recorded by tests.e2e.record_wire
    assert parse_vllm_metrics(page) == LoadSignal(running=0.0, waiting=0.0, kv_usage=0.0)
    busy = re.sub(r"(vllm:num_requests_running\{[^}]*\}) \S+", r"\1 3.0", page)
    busy = re.sub(r"(vllm:num_requests_waiting\{[^}]*\}) \S+", r"\1 5.0", busy)
    busy = re.sub(r"(vllm:kv_cache_usage_perc\{[^}]*\}) \S+", r"\1 0.25", busy)
    # The by-reason breakdown of the waiting requests is not counted twice.
    assert "vllm:num_requests_waiting_by_reason{" in busy
    assert parse_vllm_metrics(busy) == LoadSignal(running=3.0, waiting=5.0, kv_usage=0.25)
    with pytest.raises(ValueError):
        parse_vllm_metrics("# nothing here\nother_metric 1\n")


def test_ollama_ps_lists_the_loaded_models() -> None:
    doc = {"models": [{"name": "llama3:latest", "model": "llama3:latest"}, {"model": "qwen"}]}
    assert parse_ollama_ps(doc) == LoadSignal(loaded=("llama3:latest", "qwen"))
    with pytest.raises(ValueError):
        parse_ollama_ps({"error": "x"})


def test_the_load_figure_takes_the_larger_queue_plus_kv_and_cold_models() -> None:
    assert load_figure(3, None) == 3.0  # no signals: in-flight only
    busy = LoadSignal(running=4.0, waiting=6.0, kv_usage=0.5)
    assert load_figure(2, busy) == 10.0 + KV_WEIGHT * 0.5  # others' requests count
    assert load_figure(12, busy) == 12.0 + KV_WEIGHT * 0.5  # ours are in its counts
    ollama = LoadSignal(loaded=("llama3:latest",))
    assert load_figure(1, ollama, "llama3") == 1.0
    assert load_figure(1, ollama, "qwen:7b") == 1.0 + COLD_PENALTY


def test_least_loaded_orders_by_load_then_use() -> None:
    strategy = make_strategy("least_loaded", rng=random.Random(1))
    stats = Stats(load={"a": 2.0, "b": 0.5, "c": 0.5}, uses={"b": 4, "c": 1})
    assert [p.id for p in strategy.order(PS, stats)] == ["c", "b", "a"]
