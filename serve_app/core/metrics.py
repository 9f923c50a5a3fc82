"""Prometheus metrics for the whole app, whatever replica or node a number comes from.

Each replica keeps a `Tally` (plain dicts: a few nanoseconds per request, no locks) and pushes
its totals to the monitor actor every second; `render` sums the replicas' totals and writes the
Prometheus text format with prometheus-client, so one `/metrics` scrape covers every replica.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal, NamedTuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

Kind = Literal["counter", "gauge", "histogram"]


class Spec(NamedTuple):
    kind: Kind
    help: str
    labels: tuple[str, ...]


IN_FLIGHT_METRIC = "llm_router_provider_in_flight"  # set by the pickers, read by the monitor
BODIES_METRIC = "llm_router_request_bodies_parsed"  # counted by the ingress
KV_BLOCKS_METRIC = "llm_router_kv_index_blocks"  # set by the pickers (kv_aware)
KV_EVENTS_METRIC = "llm_router_kv_event_batches"
KV_SPILLS_METRIC = "llm_router_kv_spills"
KV_LAG_METRIC = "llm_router_kv_event_lag_seconds"
KV_PREDICTIONS_METRIC = "llm_router_kv_predictions"  # counted by the ingress
KV_PREDICTED_METRIC = "llm_router_kv_predicted_cached_tokens"
KV_REPORTED_METRIC = "llm_router_kv_reported_cached_tokens"

SPECS: dict[str, Spec] = {
    "llm_router_requests": Spec(
        "counter",
        "Requests answered, by model, provider, HTTP status and the client's API dialect "
        "(openai, ollama, responses, anthropic)",
        ("model", "provider", "status", "api"),
    ),
    "llm_router_request_duration_seconds": Spec(
        "histogram", "Whole request time at the ingress (to the last byte)", ("model",)
    ),
    "llm_router_time_to_first_token_seconds": Spec(
        "histogram", "Time to the first body byte (streams: first event after the head)", ("model",)
    ),
    BODIES_METRIC: Spec(
        "counter",
        "Inference request bodies read and parsed by the ingress, by API dialect (a request "
        "refused on its headers, such as one without a valid key, has none)",
        ("api",),
    ),
    "llm_router_failovers": Spec("counter", "Attempts beyond the first, by model", ("model",)),
    "llm_router_tokens": Spec(
        "counter",
        "Tokens used by client keys (the upstream's counts; estimated where it gave none), by "
        "model, key name and kind (prompt, completion)",
        ("model", "key_name", "kind"),
    ),
    "llm_router_ratelimited": Spec(
        "counter",
        "Requests refused by a key's limits, by key name and reason (rpm, tpm, budget)",
        ("key_name", "reason"),
    ),
    "llm_router_upstream_attempts": Spec(
        "counter", "Upstream attempts by provider and outcome", ("provider", "outcome")
    ),
    IN_FLIGHT_METRIC: Spec("gauge", "Upstream requests in flight, by provider", ("provider",)),
    "llm_router_slot_takes": Spec(
        "counter",
        "first_available* slots taken: from this replica's own (local), from the broker "
        "(broker), none within the wait (timeout), granted after the request left and given "
        "back (abandoned)",
        ("path",),
    ),
    "llm_router_plans_expired": Spec(
        "counter",
        "Plans a picker gave back because no ingress replica listed them as under way any more "
        "(an ingress replica that died mid-request)",
        (),
    ),
    "llm_router_queue_length": Spec(
        "gauge",
        "Requests waiting for a full model's providers (flow control), by model and priority "
        "range (0, 1..9, 10..99, 100..1000 and the same below 0)",
        ("model", "priority"),
    ),
    "llm_router_queue_wait_seconds": Spec(
        "histogram",
        "Time requests waited in a model's queue, by model, priority range and outcome "
        "(dispatched, timeout, shed, left: its client went, error: it could go nowhere)",
        ("model", "priority", "outcome"),
    ),
    "llm_router_circuit_state": Spec(
        "gauge", "Provider circuit: 0 closed, 1 half-open, 2 open", ("provider",)
    ),
    "llm_router_provider_probe_up": Spec(
        "gauge", "1 if the provider's last health probe succeeded", ("provider",)
    ),
    KV_BLOCKS_METRIC: Spec(
        "gauge",
        "KV-cache blocks the kv_aware index holds for a provider's engine (its GPU), summed "
        "over the picker replicas (each keeps its own copy)",
        ("provider",),
    ),
    KV_EVENTS_METRIC: Spec(
        "counter",
        "A provider's KV-event batches by what became of them: applied (live or replayed), "
        "replayed, gap (found missing, replay asked), hole (lost for good: its blocks dropped), "
        "restart (a new engine process), silence (no answer to a probe), error",
        ("provider", "kind"),
    ),
    KV_LAG_METRIC: Spec(
        "histogram",
        "From a live KV-event batch's timestamp (the engine's clock) to its application in a "
        "picker replica's index, by provider (an engine on another host adds its clock offset)",
        ("provider",),
    ),
    KV_SPILLS_METRIC: Spec(
        "counter",
        "kv_aware requests whose first choice was not the engine holding the longest prefix of "
        "their prompt (its queue cost more than its hit saved), by model",
        ("model",),
    ),
    KV_PREDICTIONS_METRIC: Spec(
        "counter",
        "kv_aware answers whose server reported its cached prompt tokens, by model and how the "
        "router's prediction compared: exact, over (it expected more), under",
        ("model", "result"),
    ),
    KV_PREDICTED_METRIC: Spec(
        "counter",
        "Prompt tokens the kv_aware router predicted the chosen server would take from its "
        "cache, over the answers counted in llm_router_kv_predictions, by model",
        ("model",),
    ),
    KV_REPORTED_METRIC: Spec(
        "counter",
        "Prompt tokens the servers reported taking from their cache (cached_tokens), over the "
        "answers counted in llm_router_kv_predictions, by model",
        ("model",),
    ),
}
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

Key = tuple[str, tuple[str, ...]]  # metric name, label values


class Snapshot(NamedTuple):
    """One replica's totals; histograms are per-bucket counts (not cumulative), then sum."""

    values: dict[Key, float]
    histograms: dict[Key, tuple[list[int], float]]


class Tally:
    def __init__(self) -> None:
        self._values: dict[Key, float] = {}
        self._histograms: dict[Key, tuple[list[int], list[float]]] = {}

    def inc(self, name: str, labels: tuple[str, ...], by: float = 1.0) -> None:
        key = (name, labels)
        self._values[key] = self._values.get(key, 0.0) + by

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self._values[(name, labels)] = value

    def observe(self, name: str, labels: tuple[str, ...], seconds: float) -> None:
        entry = self.declare(name, labels)
        entry[0][bisect.bisect_left(BUCKETS, seconds)] += 1
        entry[1][0] += seconds

    def declare(self, name: str, labels: tuple[str, ...]) -> tuple[list[int], list[float]]:
        """A histogram's series, made empty if new (exported before its first sample)."""
        key = (name, labels)
        entry = self._histograms.get(key)
        if entry is None:
            entry = self._histograms[key] = ([0] * (len(BUCKETS) + 1), [0.0])
        return entry

    def snapshot(self) -> Snapshot:
        return Snapshot(
            dict(self._values),
            {k: (list(counts), total[0]) for k, (counts, total) in self._histograms.items()},
        )


def server_error(status: str) -> bool:
    """Whether an `llm_router_requests` status label is a 5xx answer."""
    return status.isdigit() and int(status) >= 500


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Every replica's totals summed (what /metrics shows)."""
    values: dict[Key, float] = {}
    histograms: dict[Key, tuple[list[int], float]] = {}
    for snap in snapshots:
        for key, value in snap.values.items():
            values[key] = values.get(key, 0.0) + value
        for key, (counts, total) in snap.histograms.items():
            prev_counts, prev_total = histograms.get(key, ([0] * len(counts), 0.0))
            histograms[key] = (
                [a + b for a, b in zip(prev_counts, counts, strict=True)],
                prev_total + total,
            )
    return Snapshot(values, histograms)


class _Merged(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for name, spec in SPECS.items():
            if spec.kind == "histogram":
                family: Metric = HistogramMetricFamily(name, spec.help, labels=spec.labels)
                for (metric, labels), (counts, total) in sorted(self._snapshot.histograms.items()):
                    if metric == name:
                        cumulative, buckets = 0, []
                        for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
                            cumulative += count
                            buckets.append(
                                (str(bound) if bound != float("inf") else "+Inf", cumulative)
                            )
                        family.add_metric(list(labels), buckets, total)
            else:
                cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
                family = cls(name, spec.help, labels=spec.labels)
                for (metric, labels), value in sorted(self._snapshot.values.items()):
                    if metric == name:
                        family.add_metric(list(labels), value)
            yield family


def render(snapshots: Mapping[str, Snapshot]) -> bytes:
    """The Prometheus text for the sum of every replica's snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(merge(snapshots.values())))
    return generate_latest(registry)
