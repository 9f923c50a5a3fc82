"""The console's Overview charts (pure): request rate, error rate and latency quantiles per
model over the last 15 minutes.

The monitor already holds every replica's metric totals; every SAMPLE_S it keeps a compact
summary of their sum (per model: requests, errors, the duration and time-to-first-token
histograms), KEEP of them. A chart point is the difference between two consecutive summaries,
so a page opened now shows the last 15 minutes at once and costs one small read per poll.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from serve_app.core.metrics import BUCKETS, Snapshot, server_error

SAMPLE_S = 5.0
KEEP = int(15 * 60 / SAMPLE_S) + 1  # 15 minutes of differences
DURATION = "llm_router_request_duration_seconds"
TTFT = "llm_router_time_to_first_token_seconds"


class Totals(NamedTuple):
    """One model's totals at one moment: answers, 5xx answers, per-bucket histogram counts."""

    requests: float
    errors: float
    duration: tuple[int, ...]
    ttft: tuple[int, ...]


def summarize(snapshot: Snapshot) -> dict[str, Totals]:
    """Per model, from the sum of every replica's totals (core.metrics.merge)."""
    empty = (0,) * (len(BUCKETS) + 1)
    counts: dict[str, list[float]] = {}
    for (name, labels), value in snapshot.values.items():
        if name == "llm_router_requests":
            row = counts.setdefault(labels[0], [0.0, 0.0])
            row[0] += value
            if server_error(labels[2]):
                row[1] += value
    hists: dict[tuple[str, str], tuple[int, ...]] = {
        (name, labels[0]): tuple(buckets)
        for (name, labels), (buckets, _) in snapshot.histograms.items()
        if name in (DURATION, TTFT)
    }
    models = set(counts) | {model for _, model in hists}
    return {
        m: Totals(
            *counts.get(m, (0.0, 0.0)),
            hists.get((DURATION, m), empty),
            hists.get((TTFT, m), empty),
        )
        for m in models
    }


def quantile(buckets: list[int], q: float) -> float | None:
    """Prometheus's histogram_quantile on per-bucket counts (linear within a bucket); None
    with no observations. The last bucket (over the largest bound) answers that bound."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(BUCKETS):
                return BUCKETS[-1]
            low = 0.0 if i == 0 else BUCKETS[i - 1]
            return low + (BUCKETS[i] - low) * (rank - seen) / count
        seen += count
    return BUCKETS[-1]


FIELDS = ("rps", "error_rate", "p50", "p99", "ttft_p50", "ttft_p99")
Point = tuple[float | None, ...]  # in FIELDS order
NOTHING: Point = (0.0, None, None, None, None, None)  # an interval without the model


class Series:
    """The points, each made once when its interval's second summary arrives, and their
    assembled form, made once per new point however often it is read (every open console
    polls it)."""

    def __init__(self) -> None:
        self._last: tuple[float, dict[str, Totals]] | None = None
        self._points: deque[tuple[float, dict[str, Point]]] = deque(maxlen=KEEP - 1)
        self._assembled: dict[str, object] | None = None

    def add(self, at: float, totals: dict[str, Totals]) -> None:
        if self._last is not None:
            t0, before = self._last
            models = before.keys() | totals.keys()
            point = {m: _point(before.get(m), totals.get(m), at - t0) for m in models}
            self._points.append((at, point))
            self._assembled = None
        self._last = (at, totals)

    def points(self) -> dict[str, object]:
        """`t`: each point's time (its interval's end, unix seconds); per model, per point:
        requests/s, the share of 5xx answers, p50/p99 of duration and TTFT (seconds; None for
        an interval without requests). A total that fell (a replica left) counts as 0."""
        if self._assembled is None:
            models = sorted({m for _, row in self._points for m in row})
            self._assembled = {
                "interval_s": SAMPLE_S,
                "t": [round(t, 3) for t, _ in self._points],
                "models": {
                    m: {
                        field: [row.get(m, NOTHING)[i] for _, row in self._points]
                        for i, field in enumerate(FIELDS)
                    }
                    for m in models
                },
            }
        return self._assembled


def _point(a: Totals | None, b: Totals | None, seconds: float) -> Point:
    requests = _grew(a and a.requests, b and b.requests)
    errors = _grew(a and a.errors, b and b.errors)
    duration = _grew_buckets(a and a.duration, b and b.duration)
    ttft = _grew_buckets(a and a.ttft, b and b.ttft)
    return (
        round(requests / max(seconds, 1e-9), 3),
        round(errors / requests, 4) if requests else None,
        quantile(duration, 0.5),
        quantile(duration, 0.99),
        quantile(ttft, 0.5),
        quantile(ttft, 0.99),
    )


def _grew(before: float | None, after: float | None) -> float:
    return max(0.0, (after or 0.0) - (before or 0.0))


def _grew_buckets(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> list[int]:
    if after is None:
        return []
    if before is None or any(b < a for a, b in zip(before, after, strict=True)):
        before = (0,) * len(after)
    return [b - a for a, b in zip(before, after, strict=True)]
