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
provider and medium, engine hash -> [key, copies] in the order last stored. An engine can hold
two copies of one block (two requests filled it in the same step), each stored and removed
with its own event, hence the copies. A match walks the prompt's keys once for every provider
at once, ANDing masks, and stops when no provider holds the next block.

Bound. At most `max_entries` holdings (a provider holding a block on a medium; about 270 bytes
each) in all; past it the provider and medium with the most holdings loses its least recently
stored one first, so a runaway publisher (a large offload tier) pays before the others. Engines
evict their own least recently used blocks first, so what goes is mostly what they dropped
already; a holding dropped from a chain's middle only shortens that provider's matches (the
index errs toward a miss).
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

# 40 engines of 25,000 blocks (an H100 with an 8B model); about 270 MB.
DEFAULT_MAX_ENTRIES = 1_000_000


def root_key(lora: str | None) -> int:
    """The seed of a chain's first block: the adapter's name, as the engine's hash takes it."""
    return xxh3_64_intdigest(lora.encode()) if lora else 0


def chain_keys(token_ids: Sequence[int], block_size: int, parent: int) -> list[int]:
    """The keys of the full blocks of `token_ids` after a block keyed `parent` (or a root_key);
    a partial last block is left out, as the engine caches only full blocks."""
    data = array("I", token_ids).tobytes()  # sliced bytes hash faster than memoryviews
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
        # (provider, medium) -> engine hash -> [key, copies], least recently stored first
        self._holdings: dict[tuple[str, str], OrderedDict[EngineHash, list[int]]] = {}
        self._bits: dict[str, int] = {}
        self._names: list[str] = []  # bit position -> provider ("" when free)
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

    def _parent(self, provider: str, medium: str, event: BlockStored) -> int | None:
        """The key the first stored block chains from; None when the parent is unknown."""
        if event.parent_block_hash is None:
            return root_key(event.lora_name)
        for where in {medium, MEDIUM_GPU}:  # an offloaded block's parent may be on the GPU
            found = self._holdings.get((provider, where), {}).get(event.parent_block_hash)
            if found is not None:
                return found[0]
        return None

    def _store(self, provider: str, event: BlockStored) -> None:
        medium = event.medium or MEDIUM_GPU
        hashes = event.block_hashes
        parent = None
        if not event.group_idx and len(event.token_ids) == event.block_size * len(hashes):
            parent = self._parent(provider, medium, event)
        if parent is None:
            self.skipped[provider] += len(hashes)
            return
        count = _hashable_blocks(event)
        self.skipped[provider] += len(hashes) - count
        keys = chain_keys(event.token_ids[: count * event.block_size], event.block_size, parent)
        holdings = self._holdings.setdefault((provider, medium), OrderedDict())
        held = self._held.setdefault(medium, {})
        bit = self._bit(provider)
        before = len(holdings)
        for engine_hash, key in zip(hashes, keys, strict=False):
            entry = holdings.get(engine_hash)
            if entry is not None:
                entry[1] += 1
                holdings.move_to_end(engine_hash)
                continue
            holdings[engine_hash] = [key, 1]
            held[key] = held.get(key, 0) | bit
        self.total += len(holdings) - before
        if self.total > self.max_entries:
            self._trim()

    def _remove(self, provider: str, event: BlockRemoved) -> None:
        medium = event.medium or MEDIUM_GPU
        holdings = self._holdings.get((provider, medium))
        if not holdings or event.group_idx:
            return
        for engine_hash in event.block_hashes:
            entry = holdings.get(engine_hash)
            if entry is None:  # never indexed, or dropped for the bound
                continue
            entry[1] -= 1
            if entry[1] == 0:
                del holdings[engine_hash]
                self._unhold(medium, entry[0], ~self._bits[provider])
                self.total -= 1

    def _unhold(self, medium: str, key: int, keep: int) -> None:
        held = self._held[medium]
        rest = held[key] & keep
        if rest:
            held[key] = rest
        else:
            del held[key]

    def _trim(self) -> None:
        while self.total > self.max_entries:
            (provider, medium), holdings = max(self._holdings.items(), key=lambda i: len(i[1]))
            _, (key, _) = holdings.popitem(last=False)
            self._unhold(medium, key, ~self._bits[provider])
            self.total -= 1
            self.evicted[provider] += 1

    def drop(self, provider: str) -> None:
        """Forgets everything a provider holds (it restarted, cleared its cache, its stream
        stopped or its circuit opened)."""
        bit = self._bits.pop(provider, None)
        if bit is None:
            return
        for where in [w for w in self._holdings if w[0] == provider]:
            holdings = self._holdings.pop(where)
            for key, _ in holdings.values():
                self._unhold(where[1], key, ~bit)
            self.total -= len(holdings)
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
        for (provider, medium), holdings in self._holdings.items():
            if holdings:
                out.setdefault(provider, {})[medium] = len(holdings)
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
