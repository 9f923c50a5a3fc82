"""The block index: which provider holds which KV-cache block, learned from the engines' own
KV events (pure).

Keys. A block is keyed by the router's own chained hash: xxh3-64 of its token ids (4 bytes each)
seeded with its parent's key; a chain's first block is seeded with the LoRA adapter's name (0
without one). The engine's hashes depend on its algorithm and seed, so they are used only to find
a stored block's parent and a removed block's key, through a map per provider. A prompt cut into
blocks with `chain_keys` (routing.kv.tokens) gets the keys the index holds for the same tokens
and adapter; equal keys at block i mean equal prompts up to the end of block i.

Not indexed (counted in `skipped`): blocks the engine hashed with other extra keys (images,
a cache salt, prompt embeddings: the router cannot compute those keys, and their children's
parents are then unknown too), blocks of a KV-cache group other than the first (hybrid models),
and blocks whose parent the index does not know (evicted here, or its event was lost).

Layout. Per medium (GPU, CPU offload, ...), key -> bitmask of the providers holding it; per
provider, (medium, engine hash) -> [key, copies] in the order last stored. An engine can hold
two copies of one block (two requests filled it in the same step), each stored and removed
with its own event, hence the copies. A match walks the prompt's keys once for every provider
at once, ANDing masks, and stops when no provider holds the next block.

Bound. At most `max_entries` holdings (a provider holding a block on a medium) in all; past it
the provider with the most holdings loses its least recently stored one first, so a runaway
publisher (a large offload tier) pays before the others. Engines evict their own least
recently used blocks first, so what goes is mostly what they dropped already; a holding dropped
from a chain's middle only shortens that provider's matches (the index errs toward a miss).
"""

from __future__ import annotations

from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

from xxhash import xxh3_64_intdigest

from serve_app.routing.kv.events import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    Event,
)

DEFAULT_MAX_ENTRIES = 2_000_000  # 16 engines of 25,000 blocks (an H100 with an 8B model) x 5


def root_key(lora: str | None) -> int:
    """The seed of a chain's first block: the adapter's name, as the engine's hash takes it."""
    return xxh3_64_intdigest(lora.encode()) if lora else 0


def chain_keys(token_ids: Sequence[int], block_size: int, parent: int) -> list[int]:
    """The keys of the full blocks of `token_ids` after a block keyed `parent` (or a root_key);
    a partial last block is left out, as the engine caches only full blocks."""
    data = memoryview(array("I", token_ids).tobytes())
    step = block_size * 4
    out = []
    for end in range(step, len(data) + 1, step):
        parent = xxh3_64_intdigest(data[end - step : end], parent)
        out.append(parent)
    return out


class BlockIndex:
    """See the module doc. Not thread-safe: one event loop applies events and matches."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._held: dict[str, dict[int, int]] = {}  # medium -> key -> provider bits
        self._holdings: dict[str, OrderedDict[tuple[str, EngineHash], list[int]]] = {}
        self._bits: dict[str, int] = {}
        self._names: list[str] = []  # bit position -> provider ("" when free)
        self._counts: Counter[tuple[str, str]] = Counter()  # (provider, medium) -> holdings
        self.total = 0
        self.skipped: Counter[str] = Counter()  # blocks not indexed, per provider
        self.evicted: Counter[str] = Counter()  # holdings dropped for the bound, per provider

    def apply(self, provider: str, events: Iterable[Event]) -> None:
        """One batch of a provider's events, in order."""
        for event in events:
            if isinstance(event, BlockStored):
                self._store(provider, event)
            elif isinstance(event, BlockRemoved):
                self._remove(provider, event)
            elif isinstance(event, AllBlocksCleared):
                self.drop(provider)

    def _bit(self, provider: str) -> int:
        bit = self._bits.get(provider)
        if bit is None:
            free = self._names.index("") if "" in self._names else len(self._names)
            if free == len(self._names):
                self._names.append(provider)
            else:
                self._names[free] = provider
            bit = self._bits[provider] = 1 << free
        return bit

    def _store(self, provider: str, event: BlockStored) -> None:
        medium = event.medium or MEDIUM_GPU
        hashes = event.block_hashes
        if event.group_idx or len(event.token_ids) != event.block_size * len(hashes):
            self.skipped[provider] += len(hashes)
            return
        holdings = self._holdings.setdefault(provider, OrderedDict())
        if event.parent_block_hash is None:
            parent = root_key(event.lora_name)
        else:
            found = holdings.get((medium, event.parent_block_hash)) or holdings.get(
                (MEDIUM_GPU, event.parent_block_hash)
            )
            if found is None:
                self.skipped[provider] += len(hashes)
                return
            parent = found[0]
        count = _hashable_blocks(event)
        self.skipped[provider] += len(hashes) - count
        keys = chain_keys(event.token_ids[: count * event.block_size], event.block_size, parent)
        held = self._held.setdefault(medium, {})
        bit = self._bit(provider)
        added = 0
        for engine_hash, key in zip(hashes, keys, strict=False):
            slot = (medium, engine_hash)
            entry = holdings.get(slot)
            if entry is not None:
                entry[1] += 1
                holdings.move_to_end(slot)
                continue
            holdings[slot] = [key, 1]
            held[key] = held.get(key, 0) | bit
            added += 1
        self._counts[provider, medium] += added
        self.total += added
        if self.total > self.max_entries:
            self._trim()

    def _remove(self, provider: str, event: BlockRemoved) -> None:
        holdings = self._holdings.get(provider)
        if not holdings or event.group_idx:
            return
        medium = event.medium or MEDIUM_GPU
        for engine_hash in event.block_hashes:
            slot = (medium, engine_hash)
            entry = holdings.get(slot)
            if entry is None:  # never indexed, or dropped for the bound
                continue
            entry[1] -= 1
            if entry[1] == 0:
                del holdings[slot]
                self._unhold(provider, medium, entry[0])

    def _unhold(self, provider: str, medium: str, key: int) -> None:
        held = self._held[medium]
        rest = held[key] & ~self._bits[provider]
        if rest:
            held[key] = rest
        else:
            del held[key]
        self._counts[provider, medium] -= 1
        self.total -= 1

    def _trim(self) -> None:
        while self.total > self.max_entries:
            provider = max(self._holdings, key=lambda p: len(self._holdings[p]))
            (medium, _), (key, _) = self._holdings[provider].popitem(last=False)
            self._unhold(provider, medium, key)
            self.evicted[provider] += 1

    def drop(self, provider: str) -> None:
        """Forgets everything a provider holds (it restarted, cleared its cache, its stream
        stopped or its circuit opened)."""
        holdings = self._holdings.pop(provider, None)
        bit = self._bits.pop(provider, None)
        if bit is None:
            return
        if holdings:
            keep = ~bit
            for (medium, _), (key, _) in holdings.items():
                held = self._held[medium]
                rest = held[key] & keep
                if rest:
                    held[key] = rest
                else:
                    del held[key]
            self.total -= len(holdings)
        for medium in {m for p, m in self._counts if p == provider}:
            del self._counts[provider, medium]
        self._names[bit.bit_length() - 1] = ""

    def match(self, keys: Sequence[int], medium: str = MEDIUM_GPU) -> dict[str, int]:
        """Per provider holding at least the first block, how many leading blocks of `keys`
        (from chain_keys, the adapter already in them) it holds on `medium`."""
        held = self._held.get(medium)
        if not held or not keys:
            return {}
        get = held.get
        names = self._names
        out: dict[str, int] = {}
        alive = get(keys[0], 0)
        i = 1
        n = len(keys)
        while alive and i < n:
            mask = get(keys[i], 0)
            lost = alive & ~mask
            while lost:
                low = lost & -lost
                out[names[low.bit_length() - 1]] = i
                lost ^= low
            alive &= mask
            i += 1
        while alive:
            low = alive & -alive
            out[names[low.bit_length() - 1]] = i
            alive ^= low
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Holdings per provider and medium (for metrics)."""
        out: dict[str, dict[str, int]] = {}
        for (provider, medium), n in self._counts.items():
            out.setdefault(provider, {})[medium] = n
        return out


def _hashable_blocks(event: BlockStored) -> int:
    """How many leading blocks of a store the router can key: up to the first one hashed
    with an extra key other than the adapter's name (vLLM lists that name first)."""
    if not event.extra_keys:
        return len(event.block_hashes)
    lora_only = (event.lora_name,) if event.lora_name else ()
    for i, extra in enumerate(event.extra_keys):
        if extra and tuple(extra) != lora_only:
            return i
    return len(event.block_hashes)
