"""vLLM's KV-cache event wire format (`vllm/distributed/kv_events.py`), one definition for the
router's decoder and the simulator's encoder.

A PUB message is three frames: topic, sequence number (8 bytes, big-endian), payload. The
payload is a msgpack array `[ts, events, data_parallel_rank]`; each event a msgpack map tagged
`"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared"`, fields left at their default
omitted. Field order and defaults are vLLM's, so its own decoder reads what the simulator sends.

Versions move, so decoding tolerates what a newer vLLM may add: fields it does not know (map keys,
trailing array items) are ignored, and an event of an unknown type is skipped rather than losing
its batch. Block hashes are ints or bytes (vLLM sends sha256 digests as bytes unless
VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES); the router keys blocks by their token ids instead
(routing.kv.index), so their values never matter.
"""

from __future__ import annotations

from typing import Any

import msgspec

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
END_SEQ = -1  # the replay socket's end marker, as a signed sequence number

EngineHash = int | bytes


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """What a subscriber learns of the engine's prefix cache."""


class BlockStored(KVCacheEvent):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[EngineHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


class _LooseBatch(msgspec.Struct, array_like=True, gc=False):
    """The fallback read: the events left raw, to decode one by one."""

    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


ENCODER = msgspec.msgpack.Encoder()
_BATCH = msgspec.msgpack.Decoder(EventBatch)
_LOOSE = msgspec.msgpack.Decoder(_LooseBatch)
_EVENT = msgspec.msgpack.Decoder(Event)


def decode_batch(payload: bytes) -> EventBatch:
    """A PUB payload; events of a type this version does not know are left out. Raises
    msgspec.DecodeError when the payload is not a batch at all."""
    try:
        return _BATCH.decode(payload)
    except msgspec.ValidationError:
        loose = _LOOSE.decode(payload)
    events = []
    for raw in loose.events:
        try:
            events.append(_EVENT.decode(raw))
        except msgspec.ValidationError:
            continue
    return EventBatch(loose.ts, events, loose.data_parallel_rank)


def decode_seq(frame: bytes) -> int:
    """A sequence-number frame (signed: the replay's end marker is -1)."""
    return int.from_bytes(frame, "big", signed=True)


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)
