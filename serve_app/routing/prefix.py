"""Prompt prefixes for cache-aware routing (pure).

A request's prompt is rendered to one string in the order a chat template lays it out (tools,
system, then each message), cut into fixed-size blocks, and each block gets a hash that chains
the one before it: equal hashes at block i mean equal prompts up to the end of block i. Each
provider has a bounded LRU index of the block hashes routed to it lately, so the provider with
the longest matched prefix is the one most likely to hold the prompt in its prefix cache (what
vLLM's automatic prefix caching reuses). Hashes are xxh3 (fast, and the same in every process:
picker replicas share the index through the broker).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import orjson
import xxhash

# Body fields a prompt template puts before the conversation, then the conversation itself
# (OpenAI chat/completions, Ollama chat/generate, Anthropic Messages, OpenAI Responses).
_HEAD_FIELDS = ("tools", "system", "instructions")
_TURN_FIELDS = ("messages", "input", "prompt")
_PART_SEP = "\x1e"
_ROLE_SEP = "\x1f"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str) else _json(p)
            for p in value
        )
    return _json(value)


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _turn(message: Any) -> str:
    if not isinstance(message, dict):
        return _text(message)
    text = f"{message.get('role', '')}{_ROLE_SEP}{_text(message.get('content') or '')}"
    calls = message.get("tool_calls")
    return f"{text}{_ROLE_SEP}{_json(calls)}" if calls else text


def prompt_text(body: Mapping[str, Any]) -> str:
    """The request's prompt as one string whose prefixes are the prompt's prefixes (not the
    template's exact text: only equal prefixes must give equal strings)."""
    parts = [_text(body[f]) for f in _HEAD_FIELDS if body.get(f)]
    for field in _TURN_FIELDS:
        value = body.get(field)
        if isinstance(value, list):
            parts.extend(_turn(m) for m in value)
        elif value is not None:
            parts.append(_text(value))
    return _PART_SEP.join(parts)


def block_hashes(text: str, block_chars: int) -> list[int]:
    """One chained 64-bit hash per full block of `block_chars` (UTF-8 bytes of the text); a
    partial last block is left out, as a prefix cache keeps only full blocks."""
    data = text.encode()
    digest = xxhash.xxh3_64_intdigest
    out: list[int] = []
    h = 0
    for end in range(block_chars, len(data) + 1, block_chars):
        h = digest(data[end - block_chars : end], h)
        out.append(h)
    return out


def request_blocks(body: bytes, block_chars: int) -> list[int]:
    """The block hashes of a raw request body ([] when it is not a JSON object)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    return block_hashes(prompt_text(doc), block_chars) if isinstance(doc, dict) else []


class PrefixIndex:
    """Per provider, the block hashes routed to it lately, each with when (a counter): about
    `entries` each; once a provider's grow a quarter past that, the least recently routed go.
    A chain's early blocks count as more recent than its later ones, so a prompt's early
    blocks (shared by longer prompts) are the last to go and each index stays prefix-closed.
    Recording a chain is one dict update (it runs on every routed request)."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._blocks: dict[str, dict[int, int]] = {}
        self._clock = 0

    def resize(self, entries: int) -> None:
        self.entries = entries
        for blocks in self._blocks.values():
            self._trim(blocks, entries)

    def add(self, provider: str, chain: Sequence[int]) -> None:
        """Marks a chain (or a dump()) as routed to `provider` now."""
        blocks = self._blocks.setdefault(provider, {})
        start = self._clock + len(chain)
        blocks.update(zip(chain, range(start, self._clock, -1), strict=True))
        self._clock = start
        if len(blocks) > self.entries + self.entries // 4:
            self._trim(blocks, self.entries)

    @staticmethod
    def _trim(blocks: dict[int, int], keep: int) -> None:
        if len(blocks) > keep:
            newest = sorted(blocks.items(), key=itemgetter(1))[len(blocks) - keep :]
            blocks.clear()
            blocks.update(newest)

    def matches(self, providers: Iterable[str], hashes: Sequence[int]) -> dict[str, int]:
        """For each provider, how many leading blocks of the chain it has seen."""
        out = {}
        last = len(hashes) - 1
        for provider in providers:
            blocks = self._blocks.get(provider)
            i = last if blocks else -1
            while i >= 0 and hashes[i] not in blocks:  # type: ignore[operator]
                i -= 1
            out[provider] = i + 1
        return out

    def keep_only(self, providers: Iterable[str]) -> None:
        """Forget providers that left the config."""
        keep = set(providers)
        for provider in [p for p in self._blocks if p not in keep]:
            del self._blocks[provider]

    def sizes(self) -> dict[str, int]:
        return {p: len(b) for p, b in self._blocks.items()}

    def dump(self) -> dict[str, list[int]]:
        """Everything, newest first per provider: add() of it rebuilds the same order."""
        return {
            p: [h for h, _ in sorted(b.items(), key=itemgetter(1), reverse=True)]
            for p, b in self._blocks.items()
        }


class IndexDelta(NamedTuple):
    """Chains other replicas routed since the sequence a replica last saw; `reset`: replace the
    local index with `chains` (the replica was too far behind, or the journal is new)."""

    seq: int
    chains: list[tuple[str, Sequence[int]]]
    reset: bool = False


class IndexJournal:
    """The authoritative index (the broker's) and the chains added lately, numbered, so each
    replica catches up with what it lacks instead of fetching the whole index."""

    def __init__(self, entries: int, keep: int) -> None:
        self.index = PrefixIndex(entries)
        self.seq = 0
        self.added: Counter[str] = Counter()  # chains per replica, for operators
        self._log: deque[tuple[int, str, str, Sequence[int]]] = deque(maxlen=keep)

    def add(self, holder: str, routed: Iterable[tuple[str, Sequence[int]]]) -> None:
        for provider, chain in routed:
            self.index.add(provider, chain)
            self.seq += 1
            self.added[holder] += 1
            self._log.append((self.seq, holder, provider, chain))

    def delta(self, holder: str, seen: int) -> IndexDelta:
        """What a replica that has seen up to `seen` lacks (not its own chains)."""
        first = self._log[0][0] if self._log else self.seq + 1
        if seen > self.seq or seen < first - 1:
            return IndexDelta(self.seq, list(self.index.dump().items()), reset=True)
        chains = [(p, c) for seq, h, p, c in self._log if seq > seen and h != holder]
        return IndexDelta(self.seq, chains)
