"""vLLM's KV-cache event types as they go on the wire (`vllm/distributed/kv_events.py`).

A batch is a msgpack array `[ts, events, data_parallel_rank]`; each event a msgpack map tagged
`"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared"`, fields left at their default
omitted. The field order and defaults are vLLM's, so its own decoder reads ours.
"""

from __future__ import annotations

import msgspec

MEDIUM_GPU = "GPU"


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """What a subscriber learns of the engine's prefix cache."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared
ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(EventBatch)
