"""A paged KV cache with automatic prefix caching, accounted as vLLM's block pool does.

Blocks of `block_size` tokens; a full block is cached under a hash chained from its parent's,
so equal hashes mean equal prefixes. A request's blocks go back to the free queue when it ends
(or is preempted), in reverse order: the cached ones to its tail (the last block of a request is
evicted first, the least recently freed last: LRU), the uncached ones to its head (reused
first). Taking a free block that is still cached evicts it. One block is vLLM's null block and
never holds tokens, so usage is counted over the others. Each change a subscriber must know is
queued as a KV event (`take_events`).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from serve_app.routing.kv.events import MEDIUM_GPU, BlockRemoved, BlockStored, Event


def block_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """A 64-bit hash of a full block and everything before it (vLLM's own uses its configured
    algorithm and seed, so the values differ; the chaining is the same)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update((parent or 0).to_bytes(8, "big"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "big")


def chain_hashes(token_ids: Sequence[int], block_size: int, parents: list[int]) -> list[int]:
    """`parents` (the hashes of the leading full blocks already known) extended over the full
    blocks of `token_ids`."""
    out = list(parents)
    for start in range(len(out) * block_size, len(token_ids) - block_size + 1, block_size):
        out.append(block_hash(out[-1] if out else None, token_ids[start : start + block_size]))
    return out


class Block:
    __slots__ = ("block_id", "hash", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.hash: int | None = None


class KVCache:
    """The block pool: free queue (eviction order), the prefix-cache map, the event queue."""

    def __init__(self, num_gpu_blocks: int, block_size: int, events: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_gpu_blocks - 1  # less the null block
        self.blocks = [Block(i) for i in range(1, num_gpu_blocks)]
        # block_id -> block, front = next to be reused.
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, dict[int, Block]] = {}  # hash -> blocks holding it
        self._events_on = events
        self._events: list[Event] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """The share of blocks in use by requests (vLLM's `kv_cache_usage_perc`, 0-1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def cached_prefix(self, hashes: Sequence[int]) -> list[Block]:
        """The cached blocks of the longest prefix of `hashes`."""
        hit = []
        for h in hashes:
            holders = self._cached.get(h)
            if not holders:
                break
            hit.append(next(iter(holders.values())))
        return hit

    def touch(self, blocks: Iterable[Block]) -> None:
        """A request takes cached blocks (a prefix hit): they leave the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[Block] | None:
        """`n` blocks from the front of the free queue (evicting what they cached), or None
        when fewer are free."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: Block) -> None:
        h = block.hash
        assert h is not None
        holders = self._cached[h]
        del holders[block.block_id]
        if not holders:
            del self._cached[h]
        if self._events_on:
            self._events.append(BlockRemoved(block_hashes=[h], medium=MEDIUM_GPU))
        block.hash = None

    def cache(
        self,
        blocks: Sequence[Block],
        hashes: Sequence[int],
        token_ids: Sequence[int],
        start: int,
        end: int,
    ) -> None:
        """Blocks `start:end` of a request just became full: cache them under their hashes and
        tell the subscribers (one BlockStored for the run, parent = the block before it)."""
        if start >= end:
            return
        for i in range(start, end):
            block = blocks[i]
            block.hash = hashes[i]
            self._cached.setdefault(hashes[i], {})[block.block_id] = block
        if self._events_on:
            size = self.block_size
            self._events.append(
                BlockStored(
                    block_hashes=list(hashes[start:end]),
                    parent_block_hash=hashes[start - 1] if start else None,
                    token_ids=list(token_ids[start * size : end * size]),
                    block_size=size,
                    lora_id=None,
                    medium=MEDIUM_GPU,
                    lora_name=None,
                    group_idx=0,
                )
            )

    def free(self, blocks: Sequence[Block]) -> None:
        """A request lets go of its blocks (given in its order; freed in reverse)."""
        first: list[Block] = []
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.hash is None:
                    first.append(block)
                else:
                    self._free[block.block_id] = block
        for block in reversed(first):  # prepended in order: the last freed is reused first
            self._free[block.block_id] = block
            self._free.move_to_end(block.block_id, last=False)

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events
