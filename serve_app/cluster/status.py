"""The router at a glance (pure): one row per model and provider, with the provider's tier,
state (and why), requests in flight, the upstream's own load, and request counts, read from
the models config, the monitor's circuits and probes, and the replicas' metric totals.

Counts are totals since the replicas started: a client takes two readings to get rates
(`serve-router status` does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel

from serve_app.cluster.health import Breaker, Circuit
from serve_app.core.config import RouterConfig
from serve_app.core.metrics import IN_FLIGHT_METRIC, Snapshot, server_error
from serve_app.routing.load import LoadSignal

State = Literal["healthy", "circuit_open", "half_open", "probe_failing", "unprobed"]


class ProviderHealth(BaseModel):
    """What the monitor knows of one provider."""

    circuit: Circuit
    reason: str = ""  # why the circuit opened
    probe_up: bool | None = None
    signal: LoadSignal | None = None


class StatusRow(BaseModel):
    model_type: str
    model: str
    provider: str
    api_type: str
    tier: Literal["primary", "sleeping"]
    state: State
    reason: str | None = None
    circuit: Circuit = Circuit.CLOSED
    probe_up: bool | None = None  # the last probe's answer (None: not probed yet)
    in_flight: int = 0
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    requests: int = 0  # answered for this model by this provider
    errors: int = 0  # ... of them with a 5xx status


def state_of(health: ProviderHealth | None) -> tuple[State, str | None]:
    if health is None or (health.circuit is Circuit.CLOSED and health.probe_up is None):
        return "unprobed", None
    if health.circuit is Circuit.OPEN:
        return "circuit_open", health.reason or None
    if health.circuit is Circuit.HALF_OPEN:
        return "half_open", "trial probe under way"
    if health.probe_up is False:
        return "probe_failing", None
    return "healthy", None


def health_of(breaker: Breaker, probe_up: bool | None, signal: LoadSignal | None) -> ProviderHealth:
    return ProviderHealth(
        circuit=breaker.state, reason=breaker.reason, probe_up=probe_up, signal=signal
    )


def status_rows(
    config: RouterConfig, health: Mapping[str, ProviderHealth], totals: Snapshot
) -> list[StatusRow]:
    """Rows in the config's order: model types, their models, primaries then sleepers.
    `totals`: every replica's metric totals summed (core.metrics.merge)."""
    in_flight: dict[str, float] = {}
    requests: dict[tuple[str, str], float] = {}
    errors: dict[tuple[str, str], float] = {}
    for (name, labels), value in totals.values.items():
        if name == IN_FLIGHT_METRIC:
            in_flight[labels[0]] = value
        elif name == "llm_router_requests":  # by model, provider, status and dialect
            model, provider, status = labels[0], labels[1], labels[2]
            requests[model, provider] = requests.get((model, provider), 0) + value
            if server_error(status):
                errors[model, provider] = errors.get((model, provider), 0) + value
    rows = []
    for type_name, group in config.model_types.items():
        for model_name, model in group.models.items():
            tiers = [("primary", p) for p in model.providers]
            tiers += [("sleeping", p) for p in model.providers_sleep]
            for tier, provider in tiers:
                h = health.get(provider.id)
                state, reason = state_of(h)
                signal = h.signal if h is not None and h.signal is not None else LoadSignal()
                rows.append(
                    StatusRow(
                        model_type=type_name,
                        model=model_name,
                        provider=provider.id,
                        api_type=provider.api_type,
                        tier=tier,
                        state=state,
                        reason=reason,
                        circuit=Circuit.CLOSED if h is None else h.circuit,
                        probe_up=None if h is None else h.probe_up,
                        in_flight=int(in_flight.get(provider.id, 0)),
                        running=signal.running,
                        waiting=signal.waiting,
                        kv_usage=signal.kv_usage,
                        requests=int(requests.get((model_name, provider.id), 0)),
                        errors=int(errors.get((model_name, provider.id), 0)),
                    )
                )
    return rows
