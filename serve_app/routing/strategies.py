"""Provider-choice strategies: pure functions of the candidates and what is known about them.

Ordering strategies return the full try order (first choice, then the fallbacks), so failover
follows the same policy as the first pick. Slot strategies (`first_available*`) return the
providers with a free slot in the order they should be taken; the broker applies the same order
with the shared, authoritative state. Stateful orderings (round-robin, smooth weighted) keep one
object per model.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from serve_app.core.config import KvAwareKnobs, ProviderConfig, RoutingConfig, StrategyName
from serve_app.core.tokens import CHARS_PER_TOKEN
from serve_app.routing.kv.score import ProviderView, Ranked, rank
from serve_app.routing.load import LoadSignal
from serve_app.routing.sessions import Ring

# dynamic_weighted: a provider never drops below this share of its weight, so it keeps getting
# the requests that show when it has recovered.
MIN_WEIGHT_SHARE = 0.05


class PrefixView(Protocol):
    def matches(self, providers: Iterable[str], hashes: Sequence[int]) -> dict[str, int]:
        """How many leading blocks of the chain each provider has seen (routing.prefix)."""


class KvView(Protocol):
    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Per provider, how many leading blocks of the prompt its engine holds (routing.kv)."""


def predicted_hit(blocks: int, block_size: int, prompt_tokens: int) -> int:
    """The prompt tokens an engine holding its first `blocks` blocks serves from its cache, as
    vLLM counts them (`cached_tokens`): whole blocks, and never the last token, which it always
    computes (so a prompt of exactly n blocks can hit at most n - 1)."""
    return min(blocks, max(prompt_tokens - 1, 0) // block_size) * block_size


def text_hit(blocks: int, block_chars: int) -> int:
    """The prompt tokens in its first `blocks` text blocks (routing.prefix), by the router's
    own estimate of characters per token: a guess of what a server sent them still caches."""
    return blocks * block_chars // CHARS_PER_TOKEN


@dataclass(frozen=True)
class Stats:
    """What an ordering may look at: this replica's requests under way per provider, the
    shared use counts (for this model) and latency averages (seconds); for the load-aware
    strategies the load figure of providers that report load signals (routing.load), the
    prompt's text block hashes with the index of blocks routed to each provider, and the
    request's session key."""

    in_flight: Mapping[str, int] = field(default_factory=dict)
    uses: Mapping[str, int] = field(default_factory=dict)
    latency: Mapping[str, float] = field(default_factory=dict)
    load: Mapping[str, float] = field(default_factory=dict)
    text_blocks: Sequence[int] = ()
    index: PrefixView | None = None
    session: str = ""
    # prefix_affinity and kv_aware (the cost): the engines' own load signals and the prompt's
    # token count (kv_aware's exact, else the estimate).
    signals: Mapping[str, LoadSignal] = field(default_factory=dict)
    prompt_tokens: int = 0
    # kv_aware: the prompt's KV block keys, the prompt tokens each provider's engine is
    # predicted to serve from its cache (predicted_hit of the leading blocks it holds; None:
    # no index), and the prompt tokens this replica sent to each provider that it has not
    # begun answering.
    prefix: Sequence[int] = ()
    held: Mapping[str, int] | None = None
    queued_prefill: Mapping[str, int] = field(default_factory=dict)

    def load_of(self, provider: str) -> float:
        """Its load figure; without signals, its in-flight count (what load_figure gives)."""
        load = self.load.get(provider)
        return float(self.in_flight.get(provider, 0)) if load is None else load


class Strategy(Protocol):
    def order(self, candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
        """Candidates in the order they should be tried."""


class Balanced:
    """The provider used least so far for this model first (ties: config order)."""

    def order(self, candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
        return sorted(candidates, key=lambda p: stats.uses.get(p.id, 0))


class SmoothWeighted:
    """Smooth weighted round-robin (nginx): deterministic, and over any window of
    sum-of-weights picks each provider is chosen exactly its weight times (integer weights)."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def weights(self, candidates: Sequence[ProviderConfig], stats: Stats) -> dict[str, float]:
        return {p.id: p.weight for p in candidates}

    def order(self, candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
        if len(candidates) < 2:
            return list(candidates)
        weights = self.weights(candidates, stats)
        total = sum(weights.values())
        for p in candidates:
            self._current[p.id] = self._current.get(p.id, 0.0) + weights[p.id]
        first = max(candidates, key=lambda p: self._current[p.id])
        self._current[first.id] -= total
        rest = sorted((p for p in candidates if p is not first), key=lambda p: -weights[p.id])
        return [first, *rest]


class DynamicWeighted(SmoothWeighted):
    """Smooth weighted, each weight scaled by (fastest average latency / own average latency):
    a provider twice as slow as the fastest gets half its configured share. Providers without
    samples count as fast."""

    def weights(self, candidates: Sequence[ProviderConfig], stats: Stats) -> dict[str, float]:
        known = [stats.latency[p.id] for p in candidates if p.id in stats.latency]
        best = min(known, default=0.0)
        out = {}
        for p in candidates:
            own = stats.latency.get(p.id)
            scale = 1.0 if own is None or own <= 0 or best <= 0 else best / own
            out[p.id] = p.weight * max(scale, MIN_WEIGHT_SHARE)
        return out


class WeightedRandom:
    """Weighted sampling without replacement (Efraimidis-Spirakis): P(first) = w / sum(w)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def order(self, candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
        if len(candidates) < 2:
            return list(candidates)
        keyed = []
        for p in candidates:
            u = self._rng.random() or 1e-12
            keyed.append((u ** (1.0 / p.weight) if p.weight > 0 else -1.0 + u, p))
        keyed.sort(key=lambda kp: kp[0], reverse=True)
        return [p for _, p in keyed]


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def order(self, candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
        if not candidates:
            return []
        start = self._next % len(candidates)
        self._next += 1
        return [*candidates[start:], *candidates[:start]]


class LeastInFlight:
    """Power of two choices: the less loaded of two random candidates, then the rest by load."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def order(self, candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
        if len(candidates) < 2:
            return list(candidates)
        load = stats.in_flight
        a, b = self._rng.sample(range(len(candidates)), 2)
        pa, pb = candidates[a], candidates[b]
        first = pa if load.get(pa.id, 0) <= load.get(pb.id, 0) else pb
        rest = sorted((p for p in candidates if p is not first), key=lambda p: load.get(p.id, 0))
        return [first, *rest]


def least_loaded_first(candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
    """The lowest load figure first (ties: the one used least, then config order)."""
    load, in_flight, uses = stats.load, stats.in_flight, stats.uses

    def key(p: ProviderConfig) -> tuple[float, int]:
        pid = p.id
        return (load[pid] if pid in load else in_flight.get(pid, 0), uses.get(pid, 0))

    return sorted(candidates, key=key)


class LeastLoaded:
    def order(self, candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
        return least_loaded_first(candidates, stats)


class _Bounded:
    """An affinity that yields to load: its first choice is the most preferred candidate
    within `max_load_imbalance` of the least loaded one; failover follows the preference."""

    def __init__(self, max_load_imbalance: float) -> None:
        self.bound = max_load_imbalance

    def order(self, candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
        by_load = least_loaded_first(candidates, stats)
        preferred = self.preference(by_load, stats) if by_load else None
        if not preferred:
            return by_load
        ceiling = stats.load_of(by_load[0].id) + self.bound
        first = next((p for p in preferred if stats.load_of(p.id) <= ceiling), by_load[0])
        return [first, *(p for p in preferred if p is not first)]

    def preference(
        self, by_load: list[ProviderConfig], stats: Stats
    ) -> list[ProviderConfig] | None:
        """Every candidate, most preferred first; None: no preference (least loaded)."""
        raise NotImplementedError


class PrefixAffinity(_Bounded):
    """kv_aware's cost (by_cost), with what each provider holds guessed from the text blocks
    of this prompt routed to it: the provider sent its longest prefix keeps it while its queue
    costs less than its hit saves. `max_load_imbalance` stays an outer bound: the guess sees no
    evictions, so a long prompt's guessed hit alone must not queue without limit on one
    provider, and the load figure also counts what the cost does not (an Ollama model not in
    memory). Without a prompt or an index: least loaded."""

    def __init__(self, routing: RoutingConfig) -> None:
        super().__init__(routing.max_load_imbalance)
        self.knobs = routing.kv_aware
        self.block_chars = routing.prefix_block_chars

    def preference(
        self, by_load: list[ProviderConfig], stats: Stats
    ) -> list[ProviderConfig] | None:
        blocks = stats.text_blocks
        if not blocks or stats.index is None:
            return None
        seen = stats.index.matches([p.id for p in by_load], blocks)
        matched = {pid: text_hit(n, self.block_chars) for pid, n in seen.items()}
        prompt = stats.prompt_tokens or text_hit(len(blocks), self.block_chars)
        return [p for p, _ in by_cost(by_load, stats, matched, prompt, self.knobs, blocks[0])]


class SessionAffinity(_Bounded):
    """A session's providers in consistent-hash ring order (routing.sessions): every replica
    sends it to the same provider, and when that one fails or leaves, to the same next one.
    Without a session: least loaded."""

    def __init__(self, max_load_imbalance: float) -> None:
        super().__init__(max_load_imbalance)
        self._rings: dict[tuple[str, ...], Ring] = {}

    def preference(
        self, by_load: list[ProviderConfig], stats: Stats
    ) -> list[ProviderConfig] | None:
        if not stats.session:
            return None
        ids = tuple(sorted(p.id for p in by_load))
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) >= 64:  # candidate sets seen (health changes): keep a few
                self._rings.clear()
            ring = self._rings[ids] = Ring(ids)
        by_id = {p.id: p for p in by_load}
        return [by_id[pid] for pid in ring.walk(stats.session)]


def by_cost(
    candidates: Sequence[ProviderConfig],
    stats: Stats,
    matched: Mapping[str, int],
    prompt_tokens: int,
    knobs: KvAwareKnobs,
    seed: int,
) -> list[tuple[ProviderConfig, Ranked]]:
    """The candidates cheapest first by kv_aware's cost (routing/kv/score.py): `matched`, the
    prompt tokens each is predicted to hold, against its engine's load signals (none: nothing
    but this replica's requests there) and this replica's requests and queued prefill there."""
    views = {}
    for p in candidates:
        signal = stats.signals.get(p.id) or LoadSignal()
        views[p.id] = ProviderView(
            matched_tokens=matched.get(p.id, 0),
            running=signal.running or 0.0,
            waiting=signal.waiting or 0.0,
            kv_usage=signal.kv_usage or 0.0,
            in_flight=stats.in_flight.get(p.id, 0),
            queued_prefill_tokens=stats.queued_prefill.get(p.id, 0),
        )
    by_id = {p.id: p for p in candidates}
    return [(by_id[r.provider], r) for r in rank(prompt_tokens, views, knobs, seed)]


class KvAware:
    """Each candidate's expected cost of this prompt in prefill tokens, what its engine holds
    against the work it already has (by_cost), cheapest first: the holder of a prefix keeps
    its prompts until its queue costs more than its hit saves. A provider without KV events
    is matched as under prefix_affinity, by the text blocks routed to it, rather than counted
    as holding nothing. Without a prompt to match or an index: least loaded. `spills` counts
    requests whose first choice is not the provider holding the longest prefix (affinity
    broken for load)."""

    def __init__(self, knobs: KvAwareKnobs, block_size: int, block_chars: int) -> None:
        self.knobs = knobs
        self.block_size = block_size
        self.block_chars = block_chars
        self.spills = 0

    def order(self, candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
        if not stats.prefix or stats.held is None or len(candidates) < 2:
            return least_loaded_first(candidates, stats)
        prompt = stats.prompt_tokens or len(stats.prefix) * self.block_size
        matched = dict(stats.held)
        blind = [p.id for p in candidates if p.kv_events is None]
        if blind and stats.text_blocks and stats.index is not None:
            seen = stats.index.matches(blind, stats.text_blocks)
            matched.update((pid, text_hit(n, self.block_chars)) for pid, n in seen.items())
        ranked = by_cost(candidates, stats, matched, prompt, self.knobs, stats.prefix[0])
        if ranked[0][1].hit_tokens < max(r.hit_tokens for _, r in ranked):
            self.spills += 1
        return [p for p, _ in ranked]


class ConfigOrder:
    """Slot strategies plan through the broker; outside it (llm-router's get_model_provider)
    they read as config order."""

    def order(self, candidates: Sequence[ProviderConfig], stats: Stats) -> list[ProviderConfig]:
        return list(candidates)


def make_strategy(
    name: StrategyName,
    routing: RoutingConfig | None = None,
    rng: random.Random | None = None,
    block_size: int = 16,
) -> Strategy:
    """`block_size`: the model's servers' KV block size (kv_aware)."""
    rng = rng or random.Random()
    routing = routing or RoutingConfig()
    makers = {
        "balanced": Balanced,
        "weighted": SmoothWeighted,
        "dynamic_weighted": DynamicWeighted,
        "weighted_random": lambda: WeightedRandom(rng),
        "round_robin": RoundRobin,
        "least_in_flight": lambda: LeastInFlight(rng),
        "least_loaded": LeastLoaded,
        "prefix_affinity": lambda: PrefixAffinity(routing),
        "session_affinity": lambda: SessionAffinity(routing.max_load_imbalance),
        "kv_aware": lambda: KvAware(routing.kv_aware, block_size, routing.prefix_block_chars),
        "first_available": ConfigOrder,
        "first_available_optim": ConfigOrder,
        "first_available_optim_nworkers": ConfigOrder,
    }
    if name not in makers:
        raise ValueError(f"unknown strategy {name!r}")
    return makers[name]()


# ---- slot strategies ------------------------------------------------------------------------


@dataclass(frozen=True)
class PinView:
    """Host pins: the model each pinned host serves, and the host that last served each model."""

    owner: Mapping[str, str] = field(default_factory=dict)
    last_host: Mapping[str, str] = field(default_factory=dict)


def capacity(strategy: StrategyName, provider: ProviderConfig) -> int:
    """Requests a provider takes at once: `nworkers` under the nworkers strategy, else one."""
    return provider.nworkers if strategy == "first_available_optim_nworkers" else 1


def slot_order(
    strategy: StrategyName,
    model: str,
    candidates: Sequence[ProviderConfig],
    busy: Mapping[str, int],
    pins: PinView,
) -> list[ProviderConfig]:
    """The candidates that have a free slot, best first.

    first_available: config order. The optim strategies skip hosts pinned to another model and
    rank the last host of this model, then hosts pinned to it (model loaded), then unpinned
    hosts; nworkers ranks by busy slots before that.
    """
    free = [(i, p) for i, p in enumerate(candidates) if busy.get(p.id, 0) < capacity(strategy, p)]
    if strategy == "first_available":
        return [p for _, p in free]
    last = pins.last_host.get(model)

    def host_rank(p: ProviderConfig) -> int:
        owner = pins.owner.get(p.host_key)
        if owner != model:
            return 2
        return 0 if p.host_key == last else 1

    usable = [(i, p) for i, p in free if pins.owner.get(p.host_key) in (None, model)]
    if strategy == "first_available_optim_nworkers":
        usable.sort(key=lambda ip: (busy.get(ip[1].id, 0), host_rank(ip[1]), ip[0]))
    else:
        usable.sort(key=lambda ip: (host_rank(ip[1]), ip[0]))
    return [p for _, p in usable]
