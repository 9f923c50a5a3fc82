"""The admin token's strength check and the throttle of failed admin attempts: pure logic."""

from __future__ import annotations

import pytest

from serve_app.api.auth import (
    ADMIN_TOKEN_ENV,
    MIN_ADMIN_TOKEN_CHARS,
    AdminThrottle,
    admin_token,
    client_address,
)
from serve_app.core.config import ConfigError


def test_a_short_admin_token_is_refused_without_showing_it() -> None:
    short = "s3cret-but-short"
    with pytest.raises(ConfigError) as caught:
        admin_token({ADMIN_TOKEN_ENV: short})
    message = str(caught.value)
    assert ADMIN_TOKEN_ENV in message and f"at least {MIN_ADMIN_TOKEN_CHARS}" in message
    assert short not in message and "\n" not in message
    with pytest.raises(ConfigError):
        admin_token({ADMIN_TOKEN_ENV: "x" * (MIN_ADMIN_TOKEN_CHARS - 1)})


def test_a_long_enough_or_absent_admin_token_is_taken() -> None:
    token = "x" * MIN_ADMIN_TOKEN_CHARS
    assert admin_token({ADMIN_TOKEN_ENV: token}) == token
    assert admin_token({ADMIN_TOKEN_ENV: ""}) is None  # empty: the admin API is off
    assert admin_token({}) is None


def test_the_client_is_the_address_haproxy_appended() -> None:
    # A client's own X-Forwarded-For comes first; HAProxy's `option forwardfor` adds the last.
    assert client_address(["6.6.6.6, 7.7.7.7", "10.0.0.5"], "127.0.0.1") == "10.0.0.5"
    assert client_address(["1.1.1.1, 10.0.0.5"], "127.0.0.1") == "10.0.0.5"
    assert client_address([], "127.0.0.1") == "127.0.0.1"
    assert client_address([" "], None) == "unknown"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_address_is_throttled_after_its_failures_until_the_window_frees() -> None:
    clock = Clock()
    throttle = AdminThrottle(per_client=3, overall=100, window_s=60, clock=clock)
    for _ in range(3):
        assert throttle.refusal("a") is None
        throttle.failed("a")
        clock.now += 10
    err = throttle.refusal("a")
    assert err is not None and (err.status, err.code) == (429, "admin_throttled")
    assert err.headers["retry-after"] == "30"  # the first failure leaves the window at +60 s
    assert throttle.refusal("b") is None  # another address is not held back
    clock.now += 29
    assert throttle.refusal("a") is not None
    clock.now += 1
    assert throttle.refusal("a") is None  # one failure left the window: one more try


def test_everyone_is_throttled_after_the_overall_failures() -> None:
    clock = Clock()
    throttle = AdminThrottle(per_client=10, overall=4, window_s=60, clock=clock)
    for client in "abcd":
        assert throttle.refusal(client) is None
        throttle.failed(client)
    err = throttle.refusal("e")
    assert err is not None and err.status == 429 and err.headers["retry-after"] == "60"
    clock.now += 60
    assert throttle.refusal("e") is None
    assert throttle._by_client == {} and not throttle._all  # nothing kept past the window
