"""Per key and model usage over time (pure), for the console's charts: minute buckets for the
last hour, hourly buckets for the last day, daily buckets for 30 days.

Bounded: at most 60 + 24 + 30 buckets per key and model; a bucket older than its window is
dropped when the key's model is next counted or read. Kept by the limiter actor beside the
usage totals (and saved with them), since that is where every replica's usage arrives.
"""

from __future__ import annotations

from typing import Literal

Window = Literal["1h", "1d", "30d"]
# window -> (bucket width in seconds, buckets kept)
WINDOWS: dict[str, tuple[int, int]] = {"1h": (60, 60), "1d": (3600, 24), "30d": (86400, 30)}
FIELDS = ("requests", "prompt", "completion")

# key id -> model -> window -> bucket start (s) -> counts in FIELDS order
Buckets = dict[str, dict[str, dict[str, dict[int, list[int]]]]]


class UsageHistory:
    def __init__(self, saved: dict | None = None) -> None:
        """`saved`: what `dump` returned (JSON turned its bucket starts into strings)."""
        self._buckets: Buckets = {
            key: {
                model: {w: {int(t): list(c) for t, c in b.items()} for w, b in windows.items()}
                for model, windows in models.items()
            }
            for key, models in (saved or {}).items()
        }

    def add(
        self, key_id: str, model: str, requests: int, prompt: int, completion: int, now: float
    ) -> None:
        windows = self._buckets.setdefault(key_id, {}).setdefault(model, {})
        for window, (width, _) in WINDOWS.items():
            buckets = windows.setdefault(window, {})
            counts = buckets.setdefault(int(now // width) * width, [0, 0, 0])
            for i, n in enumerate((requests, prompt, completion)):
                counts[i] += n
            _prune(buckets, window, now)

    def series(self, key_id: str, window: Window, now: float) -> dict[str, object]:
        """Per model, each field's counts in every bucket of the window, oldest first (zeros
        where nothing was used), and the first bucket's start."""
        width, count = WINDOWS[window]
        first = (int(now // width) - count + 1) * width
        models: dict[str, dict[str, list[int]]] = {}
        for model, windows in self._buckets.get(key_id, {}).items():
            buckets = windows.get(window, {})
            _prune(buckets, window, now)
            if not buckets:
                continue
            rows = [buckets.get(first + i * width, [0, 0, 0]) for i in range(count)]
            models[model] = {f: [row[i] for row in rows] for i, f in enumerate(FIELDS)}
        return {"window": window, "bucket_s": width, "start": first, "models": models}

    def dump(self) -> Buckets:
        return self._buckets


def _prune(buckets: dict[int, list[int]], window: str, now: float) -> None:
    width, count = WINDOWS[window]
    oldest = (int(now // width) - count + 1) * width
    for start in [t for t in buckets if t < oldest]:
        del buckets[start]
