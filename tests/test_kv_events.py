"""vLLM's KV-event wire (serve_app/routing/kv/events): what a newer vLLM may add is ignored."""

from __future__ import annotations

import msgspec
import pytest

from serve_app.routing.kv.events import (
    ENCODER,
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
    decode_seq,
    encode_seq,
)

STORED = {
    "type": "BlockStored",
    "block_hashes": [b"\x01" * 32, 7],
    "parent_block_hash": None,
    "token_ids": [1, 2, 3, 4, 5, 6, 7, 8],
    "block_size": 4,
    "lora_id": None,
    "medium": "GPU",
    "lora_name": None,
}


def test_a_batch_round_trips_with_int_and_bytes_hashes() -> None:
    batch = EventBatch(
        ts=2.5,
        events=[
            BlockStored([b"\x01" * 32, 7], None, list(range(8)), 4, None, "GPU", None),
            BlockRemoved([7], "GPU"),
            AllBlocksCleared(),
        ],
        data_parallel_rank=1,
    )
    assert decode_batch(ENCODER.encode(batch)) == batch


def test_unknown_fields_trailing_items_and_event_types_are_ignored() -> None:
    raw = msgspec.msgpack.encode(
        [
            1.0,
            [
                {**STORED, "new_field": [1, 2]},
                {"type": "BlockMoved", "block_hashes": [7], "to": "CPU"},
                {"type": "AllBlocksCleared", "reason": "reset"},
            ],
            0,
            "a field of a later version",
        ]
    )
    batch = decode_batch(raw)
    assert [type(e) for e in batch.events] == [BlockStored, AllBlocksCleared]
    assert batch.events[0].block_hashes == [b"\x01" * 32, 7]


def test_a_payload_that_is_no_batch_is_refused() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_batch(msgspec.msgpack.encode({"ts": 1.0}))


def test_sequence_frames_are_8_byte_big_endian_and_the_end_marker_is_minus_one() -> None:
    assert encode_seq(258) == b"\x00" * 6 + b"\x01\x02"
    assert encode_seq(END_SEQ) == b"\xff" * 8
    assert decode_seq(b"\xff" * 8) == END_SEQ
    assert decode_seq(encode_seq(2**40)) == 2**40
