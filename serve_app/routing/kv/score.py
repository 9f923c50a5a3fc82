"""The kv_aware decision (pure): each eligible provider's expected cost of serving a prompt, in
prompt tokens to prefill (the unit that makes a cache hit and a queue comparable), lowest first.

For a prompt of P tokens and a provider p:

    hit_p  = min(matched_p, P - 1)            the engine recomputes at least the last token
    ahead_p = max(waiting_p, in_flight_p - running_p, 0)
    sat_p  = max(0, kv_p - saturation_threshold) / (1 - saturation_threshold)

    cost_p = (P - hit_p)                         its own prefill
           + queued_p                            prefill tokens known to be queued there
           + waiting_request_tokens * ahead_p    requests ahead of it, size unknown
           + running_request_tokens * running_p  decodes sharing every step with it
           + saturation_tokens * sat_p           a nearly full cache evicts or preempts

`matched_p` is the prefix the index says p holds (routing.kv.index), `running_p`, `waiting_p`
and `kv_p` the engine's last scrape (routing.load), `in_flight_p` the router's own requests to
it (exact and current; its not-yet-running ones are queued there even when the scrape is old),
`queued_p` the prompt tokens of the router's requests there that have not started answering.

So the holder of a prefix keeps its prompts while the extra cost of its queue is less than the
prefill its hit saves, and the next best takes them once it is not: `cost_holder < cost_other`
exactly when `queue_holder - queue_other < hit_holder - hit_other`. Equal costs go to the
fewer in flight here, then to an order drawn per `seed` (deterministic for one seed, uniform
over seeds: pass the prompt's first block key and identical cold prompts share a server while
different ones spread).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from xxhash import xxh3_64_intdigest

from serve_app.core.config import KvAwareKnobs


class ProviderView(NamedTuple):
    """What the decision knows of one eligible provider."""

    matched_tokens: int = 0
    queued_prefill_tokens: int = 0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    in_flight: int = 0


class Ranked(NamedTuple):
    provider: str
    cost: float
    hit_tokens: int


def cost(prompt_tokens: int, view: ProviderView, knobs: KvAwareKnobs) -> tuple[float, int]:
    """(cost, hit tokens) of one provider, as the module doc writes it."""
    hit = max(0, min(view.matched_tokens, prompt_tokens - 1))
    ahead = max(view.waiting, view.in_flight - view.running, 0.0)
    threshold = knobs.saturation_threshold
    saturation = max(0.0, view.kv_usage - threshold) / (1.0 - threshold)
    total = (
        prompt_tokens
        - hit
        + view.queued_prefill_tokens
        + knobs.waiting_request_tokens * ahead
        + knobs.running_request_tokens * view.running
        + knobs.saturation_tokens * saturation
    )
    return total, hit


def rank(
    prompt_tokens: int,
    views: Mapping[str, ProviderView],
    knobs: KvAwareKnobs,
    seed: int = 0,
) -> list[Ranked]:
    """The providers, cheapest first (ties: fewer in flight, then the seed's order)."""
    keyed = []
    for provider, view in views.items():
        total, hit = cost(prompt_tokens, view, knobs)
        draw = xxh3_64_intdigest(provider.encode(), seed & 0xFFFF_FFFF_FFFF_FFFF)
        keyed.append((total, view.in_flight, draw, Ranked(provider, total, hit)))
    keyed.sort(key=lambda k: k[:3])
    return [k[3] for k in keyed]
