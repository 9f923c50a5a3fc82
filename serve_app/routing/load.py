"""Upstream load signals and the one load figure every load-aware strategy uses (pure).

The monitor scrapes vLLM's Prometheus `/metrics` (requests running and waiting, KV-cache use)
and Ollama's `GET /api/ps` (the models it has loaded) at the probe interval. A provider's load
is the larger of its upstream queue (running + waiting, at the last scrape: every client's
requests) and this replica's own requests to it (exact and current, but only this replica's;
they are also in the upstream's counts, so the two are not added), plus KV-cache use (a nearly
full cache queues or preempts the next requests) and a cold-model penalty (Ollama must load it
first). A provider without signals is loaded by its own in-flight count alone.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict

# Full KV cache counts as this many queued requests; a model Ollama must load first as this many.
KV_WEIGHT = 2.0
COLD_PENALTY = 4.0
_VLLM_NAMES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
}
# Their sample lines (not those of longer names such as `..._waiting_by_reason`) and comments.
_WANTED_LINES = tuple(
    f"{start}{name}{end}"
    for name in _VLLM_NAMES
    for start, end in (("", "{"), ("", " "), ("# HELP ", " "), ("# TYPE ", " "))
)


class LoadSignal(BaseModel):
    """What an upstream said of its load at its last scrape (None: it did not say)."""

    model_config = ConfigDict(frozen=True)

    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None  # 0-1
    loaded: tuple[str, ...] | None = None  # Ollama: models in memory


def parse_vllm_metrics(text: str) -> LoadSignal:
    """vLLM's /metrics: running and waiting summed over engines and models, KV use the
    highest of its engines. Only the lines of those three gauges are parsed (the page is
    mostly histograms)."""
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(_WANTED_LINES))
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(wanted + "\n"):
        field = _VLLM_NAMES.get(family.name)
        if field is not None:
            values.setdefault(field, []).extend(s.value for s in family.samples)
    if not values:
        raise ValueError("no vLLM load gauges in the metrics page")
    return LoadSignal(
        running=sum(values["running"]) if "running" in values else None,
        waiting=sum(values["waiting"]) if "waiting" in values else None,
        kv_usage=max(values["kv_usage"]) if "kv_usage" in values else None,
    )


def parse_ollama_ps(doc: object) -> LoadSignal:
    """Ollama's `GET /api/ps` answer: which models are loaded."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise ValueError("not an Ollama /api/ps answer")
    names = (m.get("name") or m.get("model") for m in doc["models"] if isinstance(m, dict))
    return LoadSignal(loaded=tuple(sorted(n for n in names if isinstance(n, str))))


def _loaded(model: str, loaded: Iterable[str]) -> bool:
    """Ollama names `llama3` and `llama3:latest` the same model."""
    tagged = model if ":" in model else f"{model}:latest"
    return any(name in (model, tagged) for name in loaded)


def load_figure(in_flight: int, signal: LoadSignal | None, model: str = "") -> float:
    """The provider's load in requests (see the module doc); `model` is the upstream's name
    for the requested model (for the cold-model penalty)."""
    if signal is None:
        return float(in_flight)
    queue = (signal.running or 0.0) + (signal.waiting or 0.0)
    load = max(float(in_flight), queue) + KV_WEIGHT * (signal.kv_usage or 0.0)
    if signal.loaded is not None and model and not _loaded(model, signal.loaded):
        load += COLD_PENALTY
    return load
