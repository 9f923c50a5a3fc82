"""Which providers a request may go to, in which order: eligibility, tiers, limits, health."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from serve_app.core.config import ModelConfig, ProviderConfig
from serve_app.core.errors import RouterError
from serve_app.core.schemas import RequestMeta
from serve_app.routing.load import LoadSignal
from serve_app.routing.strategies import Stats, Strategy


@dataclass
class ProviderState:
    """One replica's view of a provider: its load, when a recent failure stops counting, its
    failures in a row here, whether the shared circuit has it out of service, what it last
    said of its load (the monitor's scrape), and (kv_aware) the prompt tokens it has to compute
    for this replica's requests that it has not begun answering."""

    in_flight: int = 0
    queued_prefill: int = 0
    down_until: float = 0.0
    failures: int = 0
    out_of_service: bool = False
    signal: LoadSignal | None = None


def fits(provider: ProviderConfig, meta: RequestMeta) -> bool:
    return meta.prompt_tokens <= provider.input_size and (
        not meta.needs_tools or provider.tool_calling
    )


def _no_fit_error(model_name: str, model: ModelConfig, meta: RequestMeta) -> RouterError:
    everyone = [*model.providers, *model.providers_sleep]
    if meta.needs_tools and not any(p.tool_calling for p in everyone):
        return RouterError(
            400,
            f"no provider of model {model_name} supports tool calling",
            param="tools",
            code="tools_unsupported",
        )
    largest = max(p.input_size for p in everyone if p.tool_calling or not meta.needs_tools)
    return RouterError(
        400,
        f"the prompt (about {meta.prompt_tokens} tokens) exceeds the input size of every provider "
        f"of model {model_name} that could serve it (largest: {largest})",
        param="messages",
        code="context_length_exceeded",
    )


class Candidates(NamedTuple):
    """The providers a request may go to: by tier (primaries, then sleeping providers), or,
    when all of them cool down after recent failures, those by the end of their cooldown."""

    tiers: list[list[ProviderConfig]]
    last_resort: bool = False


def candidate_tiers(
    model_name: str,
    model: ModelConfig,
    meta: RequestMeta,
    states: dict[str, ProviderState],
    now: float,
) -> Candidates:
    """The providers a request may go to (see Candidates).

    Providers marked down here are kept as a last resort (the mark may be stale); providers
    whose shared circuit is open are not (their health checks failed). A request is refused when
    none fits (400), every fitting one is out of service (503) or busy at its limit (429).
    """

    def at_limit(p: ProviderConfig) -> bool:
        return p.max_concurrency is not None and states[p.id].in_flight >= p.max_concurrency

    tiers: list[list[ProviderConfig]] = []
    down: list[ProviderConfig] = []
    any_fit = any_in_service = False
    for tier in (model.providers, model.providers_sleep):
        fitting = [p for p in tier if fits(p, meta)]
        any_fit = any_fit or bool(fitting)
        fitting = [p for p in fitting if not states[p.id].out_of_service]
        any_in_service = any_in_service or bool(fitting)
        tiers.append([p for p in fitting if not at_limit(p) and states[p.id].down_until <= now])
        down += [p for p in fitting if not at_limit(p) and states[p.id].down_until > now]
    if not any_fit:
        raise _no_fit_error(model_name, model, meta)
    if not any_in_service:
        raise RouterError(
            503,
            f"every provider of model {model_name} is out of service (failing health checks); "
            "retry later",
            type="api_error",
            code="no_healthy_provider",
            headers={"retry-after": "5"},
        )
    if any(tiers):
        return Candidates(tiers)
    if down:
        return Candidates([sorted(down, key=lambda p: states[p.id].down_until)], True)
    raise RouterError(
        429,
        f"every provider of model {model_name} is at its concurrency limit",
        type="rate_limit_error",
        code="all_providers_busy",
        headers={"retry-after": "1"},
    )


def plan_attempts(
    candidates: Candidates, strategy: Strategy, stats: Stats, max_attempts: int
) -> list[ProviderConfig]:
    """Each tier in strategy order, capped at max_attempts (the last resort in its order)."""
    if candidates.last_resort:
        return candidates.tiers[0][:max_attempts]
    return [p for tier in candidates.tiers for p in strategy.order(tier, stats)[:max_attempts]]


def preferred_first(
    targets: list[ProviderConfig], candidates: Candidates, prefer: str
) -> list[ProviderConfig]:
    """`targets` with the provider `prefer` names first, if it is a candidate of the first tier
    with any (a sleeping provider is not woken for it while a primary is ready)."""
    first = next((tier for tier in candidates.tiers if tier), [])
    chosen = next((p for p in first if p.id == prefer), None)
    if chosen is None:
        return targets
    return [chosen, *(p for p in targets if p.id != prefer)]


def initial_states(models: Sequence[ModelConfig]) -> dict[str, ProviderState]:
    return {p.id: ProviderState() for m in models for p in (*m.providers, *m.providers_sleep)}
