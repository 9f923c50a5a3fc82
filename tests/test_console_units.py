"""The pure parts behind the console: per-key usage history (bounded buckets), the Overview's
per-model series from the monitor's metric totals, and the masked models config."""

from __future__ import annotations

import orjson
import pytest

from serve_app.access.history import UsageHistory
from serve_app.core.config import masked_tokens
from serve_app.core.metrics import BUCKETS, Tally
from serve_app.core.series import KEEP, SAMPLE_S, Series, quantile, summarize

T0 = 20833 * 86400.0  # the start of a day (so of an hour and a minute too)


def test_usage_lands_in_the_bucket_of_each_window() -> None:
    h = UsageHistory()
    h.add("k", "m", 1, 10, 5, T0 + 30)
    h.add("k", "m", 2, 20, 7, T0 + 90)  # the next minute, the same hour and day
    hour = h.series("k", "1h", T0 + 90)
    assert (hour["bucket_s"], hour["start"]) == (60, T0 + 60 - 59 * 60)
    assert hour["models"]["m"]["requests"][-2:] == [1, 2]
    assert len(hour["models"]["m"]["prompt"]) == 60 and sum(hour["models"]["m"]["prompt"]) == 30
    day = h.series("k", "1d", T0 + 90)
    assert day["models"]["m"]["requests"][-1] == 3 and day["models"]["m"]["completion"][-1] == 12
    assert h.series("other", "30d", T0)["models"] == {}


def test_old_buckets_leave_and_the_store_stays_bounded() -> None:
    h = UsageHistory()
    for minute in range(3 * 24 * 60):  # three days of one request a minute
        h.add("k", "m", 1, 1, 1, T0 + minute * 60)
    now = T0 + 3 * 86400
    assert {w: len(b) for w, b in h.dump()["k"]["m"].items()} == {"1h": 60, "1d": 24, "30d": 3}
    assert sum(h.series("k", "1h", now)["models"]["m"]["requests"]) == 59  # this minute: none
    assert sum(h.series("k", "30d", now)["models"]["m"]["requests"]) == 3 * 24 * 60
    assert h.series("k", "1h", now + 3601)["models"] == {}  # nothing within the last hour
    for hour in range(40 * 24):  # 40 more days, one request an hour
        h.add("k", "m", 1, 1, 1, now + hour * 3600)
    assert {w: len(b) for w, b in h.dump()["k"]["m"].items()} == {"1h": 1, "1d": 24, "30d": 30}


def test_history_survives_a_json_round_trip() -> None:
    h = UsageHistory()
    h.add("k", "m", 4, 40, 2, T0)
    saved = orjson.loads(orjson.dumps(h.dump(), option=orjson.OPT_NON_STR_KEYS))
    assert UsageHistory(saved).series("k", "1d", T0) == h.series("k", "1d", T0)


def _totals(tally: Tally) -> dict:
    return summarize(tally.snapshot())


def test_series_are_rates_and_quantiles_between_samples() -> None:
    tally, series = Tally(), Series()
    series.add(T0, _totals(tally))
    for _ in range(8):
        tally.inc("llm_router_requests", ("m", "p", "200", "openai"))
        tally.observe("llm_router_request_duration_seconds", ("m",), 0.02)
        tally.observe("llm_router_time_to_first_token_seconds", ("m",), 0.004)
    for _ in range(2):
        tally.inc("llm_router_requests", ("m", "", "503", "openai"))
        tally.observe("llm_router_request_duration_seconds", ("m",), 3.0)
    series.add(T0 + SAMPLE_S, _totals(tally))
    series.add(T0 + 2 * SAMPLE_S, _totals(tally))  # nothing new
    points = series.points()
    assert points["t"] == [T0 + SAMPLE_S, T0 + 2 * SAMPLE_S]
    m = points["models"]["m"]
    assert m["rps"] == [10 / SAMPLE_S, 0.0]
    assert m["error_rate"] == [0.2, None]
    assert 0.01 < m["p50"][0] <= 0.025 and 2.5 < m["p99"][0] <= 5.0
    assert m["ttft_p50"][0] <= 0.005 and m["p50"][1] is None


def test_a_total_that_falls_counts_as_nothing_and_the_ring_is_bounded() -> None:
    tally, series = Tally(), Series()
    tally.inc("llm_router_requests", ("m", "p", "200", "openai"), 50)
    series.add(T0, _totals(tally))
    series.add(T0 + SAMPLE_S, _totals(Tally()))  # the replica that had them left
    assert series.points()["models"]["m"]["rps"] == [0.0]
    for i in range(KEEP + 10):
        series.add(T0 + i, {})
    assert len(series.points()["t"]) == KEEP - 1


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        ([0] * (len(BUCKETS) + 1), 0.5, None),
        ([4] + [0] * len(BUCKETS), 0.5, BUCKETS[0] / 2),
        ([0] * len(BUCKETS) + [3], 0.99, BUCKETS[-1]),
    ],
)
def test_quantile_interpolates_like_prometheus(buckets: list, q: float, expected) -> None:
    assert quantile(buckets, q) == expected


def test_the_config_view_never_shows_a_token() -> None:
    raw = {
        "t": {"m": {"providers": [{"id": "a", "api_token": "sk-live"}, {"api_token": ""}]}},
        "routing": {"default": {"max_attempts": 3}},
    }
    masked = masked_tokens(raw)
    assert "sk-live" not in orjson.dumps(masked).decode()
    assert masked["t"]["m"]["providers"] == [{"id": "a", "api_token": "***"}, {"api_token": ""}]
    assert masked["routing"] == raw["routing"]
