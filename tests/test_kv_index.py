"""The KV block index (serve_app/routing/kv/index): keys from token ids, not engine hashes;
the longest held prefix per provider; removals, copies, media, adapters, the bound."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path

from serve_app.routing.kv.events import (
    MEDIUM_CPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    decode_batch,
)
from serve_app.routing.kv.index import BlockIndex
from serve_app.routing.kv.tokens import prompt_keys
from serve_app.routing.strategies import predicted_hit

BS = 4
TOKENS = list(range(100, 124))  # 6 full blocks


def _stored(
    hashes: Sequence[EngineHash],
    tokens: Sequence[int],
    parent: EngineHash | None = None,
    **extra: object,
) -> BlockStored:
    fields: dict = {"lora_id": None, "medium": "GPU", "lora_name": None, **extra}
    return BlockStored(list(hashes), parent, list(tokens), BS, **fields)


def _hashes(seed: int, n: int) -> list[int]:
    """An engine's hashes for n blocks (another seed: other values for the same blocks)."""
    return [seed * 1000 + i for i in range(n)]


def test_equal_tokens_match_whatever_the_engine_hashes_and_however_the_stores_are_cut() -> None:
    index = BlockIndex()
    a, b = _hashes(1, 6), [bytes([9, i]) for i in range(6)]  # int and sha256-style hashes
    index.apply("a", [_stored(a, TOKENS)])
    index.apply("b", [_stored(b[:2], TOKENS[:8]), _stored(b[2:], TOKENS[8:], parent=b[1])])
    assert index.match(prompt_keys(TOKENS, BS)) == {"a": 6, "b": 6}
    assert index.match(prompt_keys([*TOKENS[:10], 7, 7, 7, 7], BS)) == {"a": 2, "b": 2}
    assert index.match(prompt_keys([1, 2, 3, 4, *TOKENS], BS)) == {}


def test_each_provider_gets_its_longest_prefix_and_a_removed_block_cuts_it() -> None:
    index = BlockIndex()
    index.apply("long", [_stored(_hashes(1, 6), TOKENS)])
    index.apply("short", [_stored(_hashes(2, 2), TOKENS[:8])])
    index.apply("other", [_stored(_hashes(3, 2), [7] * 8)])
    keys = prompt_keys(TOKENS, BS)
    assert index.match(keys) == {"long": 6, "short": 2}
    index.apply("long", [BlockRemoved([_hashes(1, 6)[3]], "GPU")])
    assert index.match(keys) == {"long": 3, "short": 2}
    assert index.counts() == {"long": {"GPU": 5}, "short": {"GPU": 2}, "other": {"GPU": 2}}


def test_a_block_stored_twice_is_held_until_both_copies_are_removed() -> None:
    index = BlockIndex()
    h = _hashes(1, 2)
    index.apply("a", [_stored(h, TOKENS[:8]), _stored(h, TOKENS[:8])])
    index.apply("a", [BlockRemoved(h, "GPU")])
    assert index.match(prompt_keys(TOKENS, BS)) == {"a": 2}
    index.apply("a", [BlockRemoved(h, "GPU")])
    assert index.match(prompt_keys(TOKENS, BS)) == {}
    assert index.total == 0


def test_an_adapters_blocks_match_only_its_prompts() -> None:
    index = BlockIndex()
    lora = {"lora_name": "sql", "lora_id": 3, "extra_keys": [("sql",), ("sql",)]}
    index.apply("a", [_stored(_hashes(1, 2), TOKENS[:8], **lora)])
    assert index.match(prompt_keys(TOKENS, BS)) == {}
    assert index.match(prompt_keys(TOKENS, BS, lora="sql")) == {"a": 2}
    assert index.match(prompt_keys(TOKENS, BS, lora="other")) == {}


def test_blocks_hashed_with_keys_the_router_cannot_compute_are_not_indexed() -> None:
    """An image in block 1: block 0 is indexed; block 1 and every later block are not."""
    index = BlockIndex()
    h = _hashes(1, 3)
    index.apply("a", [_stored(h[:2], TOKENS[:8], extra_keys=[None, (("img", 0),)])])
    index.apply("a", [_stored(h[2:], TOKENS[8:12], parent=h[1])])
    assert index.match(prompt_keys(TOKENS, BS)) == {"a": 1}
    assert index.skipped["a"] == 2


def test_other_kv_groups_and_unknown_parents_are_skipped_and_media_kept_apart() -> None:
    index = BlockIndex()
    index.apply("a", [_stored(_hashes(1, 2), TOKENS[:8], group_idx=1)])
    index.apply("a", [_stored(_hashes(2, 1), TOKENS[8:12], parent=555)])
    assert index.match(prompt_keys(TOKENS, BS)) == {}
    assert index.skipped["a"] == 3
    index.apply("a", [_stored(_hashes(3, 2), TOKENS[:8], medium=MEDIUM_CPU)])
    assert index.match(prompt_keys(TOKENS, BS)) == {}
    assert index.match(prompt_keys(TOKENS, BS), medium=MEDIUM_CPU) == {"a": 2}


def test_clearing_drops_one_provider_and_its_bit_is_not_inherited() -> None:
    index = BlockIndex()
    index.apply("a", [_stored(_hashes(1, 6), TOKENS)])
    index.apply("b", [_stored(_hashes(2, 2), TOKENS[:8])])
    index.apply("a", [AllBlocksCleared()])
    keys = prompt_keys(TOKENS, BS)
    assert index.match(keys) == {"b": 2}
    index.apply("c", [_stored(_hashes(3, 1), TOKENS[:4])])  # takes a's freed bit
    assert index.match(keys) == {"b": 2, "c": 1}
    index.drop("b")
    assert index.match(keys) == {"c": 1}
    assert index.total == 1 and index.counts() == {"c": {"GPU": 1}}


def test_past_the_bound_the_largest_provider_loses_its_least_recently_stored_first() -> None:
    index = BlockIndex(max_entries=8)
    index.apply("big", [_stored(_hashes(1, 6), TOKENS)])
    index.apply("small", [_stored(_hashes(2, 2), TOKENS[:8])])
    index.apply("big", [_stored(_hashes(1, 1), TOKENS[:4])])  # a second copy: refreshed
    index.apply("small", [_stored(_hashes(2, 3)[2:], TOKENS[8:12], parent=_hashes(2, 2)[1])])
    assert index.total == 8
    assert index.evicted == {"big": 1}
    # big's block 1 went (block 0 was stored again since): its match stops after block 0.
    assert index.match(prompt_keys(TOKENS, BS)) == {"big": 1, "small": 3}


def test_a_recorded_real_vllm_stream_predicts_what_the_server_reported_cached() -> None:
    """vLLM 0.32's own events (tests/wire/vllm_kv_events.json, recorded by
    tests/e2e/record_kv_events.py: blocks of 32 in a 12-block cache, a prefix hit, a LoRA
    adapter's blocks, evictions, a reset): the index rebuilt from the batches that had arrived
    before each request predicts exactly the `cached_tokens` the server reported for it. The one
    exception is vLLM's: a reset publishes its AllBlocksCleared with the engine's next step,
    i.e. with the next request's own events, so the request right after a reset is predicted
    from the blocks before it."""
    doc = json.loads((Path(__file__).parent / "wire" / "vllm_kv_events.json").read_text())
    size = doc["block_size"]
    batches = [decode_batch(base64.b64decode(b["payload"])) for b in doc["batches"]]
    assert [b["seq"] for b in doc["batches"]] == list(range(len(batches)))
    kinds = {type(e).__name__ for batch in batches for e in batch.events}
    assert kinds == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
    assert any(getattr(e, "lora_name", None) for batch in batches for e in batch.events)
    index, applied, reset = BlockIndex(), 0, False
    for request in doc["requests"]:
        if "token_ids" not in request:  # the reset
            reset = True
            continue
        for batch in batches[applied : request["before_batches"]]:
            index.apply("vllm", batch.events)
        applied = request["before_batches"]
        ids = request["token_ids"]
        held = index.match(prompt_keys(ids, size, request["lora"])).get("vllm", 0)
        predicted = predicted_hit(held, size, len(ids))
        if reset:  # its AllBlocksCleared comes with this request's own batch
            assert predicted > request["cached_tokens"] == 0, request["step"]
            reset = False
        else:
            assert predicted == request["cached_tokens"], request["step"]
    cached = [r.get("cached_tokens") for r in doc["requests"]]
    assert any(cached) and 0 in cached  # hits and misses both
    for batch in batches[applied:]:
        index.apply("vllm", batch.events)
    last = doc["requests"][-1]["token_ids"]
    assert index.match(prompt_keys(last, size)) == {"vllm": len(last) // size}
