"""Keys and the limiter's books (pure): hashes, limits per minute and budget period, leases
that add up to the limit across holders, corrections from real usage."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.access.keys import KeyLimits, KeyRecord, new_key, parse_key, verify
from serve_app.access.ledger import GRACE_S, WINDOW_S, Ledger, Used

T0 = 16_667 * 60 + 20.0  # 20 s into a minute


def _key(**limits: object) -> KeyRecord:
    return new_key(KeyLimits(name="team-a", **limits), T0 - 100)[0]


def test_a_key_is_stored_as_a_salted_hash_and_recognised() -> None:
    record, key = new_key(KeyLimits(name="team-a"), T0)
    parsed = parse_key(key)
    assert parsed is not None and parsed[0] == record.id
    assert verify(record, parsed[1]) and not verify(record, parsed[1][:-1] + "x")
    assert parsed[1] not in record.model_dump_json() and key not in str(record.public())
    assert "salt" not in record.public() and "digest" not in record.public()
    other, _ = new_key(KeyLimits(name="team-a"), T0)
    assert other.salt != record.salt  # the same secret would hash differently
    for bad in ("", "sk-sr-", "Bearer x", key + "x", key.replace("sk-sr-", "sk-")):
        assert parse_key(bad) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("rpm_limit", 0), ("tpm_limit", -1), ("budget_period", "2w"), ("name", ""), ("models", [])],
)
def test_invalid_limits_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        KeyLimits.model_validate({"name": "k", field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_requests_per_minute_add_up_to_the_limit_across_holders() -> None:
    ledger, record = Ledger(), _key(rpm_limit=10)
    granted = {"a": 0, "b": 0}
    used = {"a": Used(), "b": Used()}
    served = 0
    for i in range(40):  # two holders alternately use one request of each lease, then renew
        holder = "ab"[i % 2]
        grant = ledger.take(record, holder, 1, used[holder], T0 + i * 0.01)
        if grant.refusal is not None:
            assert grant.refusal.reason == "rpm" and grant.refusal.limit == 10
            assert 0 < grant.refusal.retry_after_s <= WINDOW_S - 20 + 1
            used[holder] = Used()
            continue
        assert grant.requests is not None and grant.requests >= 1
        granted[holder] += 1
        served += 1
        used[holder] = Used(requests=1)
    assert served == 10  # exactly: what holders did not use came back with their next take
    assert ledger.takers(record, T0 + 1) == ["a", "b"]
    next_minute = ledger.take(record, "a", 1, Used(), T0 + WINDOW_S)
    assert next_minute.refusal is None
    assert ledger.takers(record, T0 + WINDOW_S) == ["a"]  # a new minute, new takers


def test_a_lease_never_returned_counts_in_full_until_the_grace_ends_then_the_window() -> None:
    ledger, record = Ledger(), _key(rpm_limit=8)
    first = ledger.take(record, "dead", 1, Used(), T0)
    assert first.requests == 2  # a quarter of what is left
    rest = 0
    while ledger.take(record, "live", 1, Used(requests=1), T0 + 1).refusal is None:
        rest += 1
    assert rest == 6  # never over: the dead holder's 2 stay counted
    later = ledger.take(record, "live", 1, Used(requests=1), T0 + GRACE_S + 1)
    assert later.refusal is not None  # taken as used in full, not given back


def test_tokens_per_minute_are_granted_on_the_estimate_and_corrected() -> None:
    ledger, record = Ledger(), _key(tpm_limit=1000)
    grant = ledger.take(record, "a", 300, Used(), T0)
    assert grant.tokens is not None and grant.tokens >= 300
    ledger.correct(record, grant.window, 500, T0)  # the upstream said 800 in all
    second = ledger.take(record, "a", 300, Used(requests=1, tokens=300), T0 + 0.1)
    assert second.refusal is not None and second.refusal.reason == "tpm"
    assert ledger.take(record, "a", 300, Used(), T0 + WINDOW_S).refusal is None


def test_a_budget_is_spent_then_rolls_over_with_its_period() -> None:
    ledger, record = Ledger(), _key(token_budget=100, budget_period="1h")
    _, end = record.budget_window(T0)
    grant = ledger.take(record, "a", 60, Used(), T0)
    assert grant.refusal is None
    ledger.give_back(record, "a", Used(requests=1, tokens=60, budget=60), T0)
    ledger.correct(record, grant.window, 50, T0)  # 110 really used
    refused = ledger.take(record, "a", 1, Used(), T0 + 120)
    assert refused.refusal is not None and refused.refusal.reason == "budget"
    assert refused.refusal.retry_after_s == pytest.approx(end - T0 - 120)
    assert ledger.take(record, "a", 1, Used(), end + 1).refusal is None
    assert ledger.budgets[record.id][0] == end  # the new period, kept for a restart


def test_keys_expire_and_name_their_models() -> None:
    record = _key(models=["m/a"], expires_at=T0 + 5)
    assert record.allows("m/a") and not record.allows("m/b")
    assert not record.expired(T0) and record.expired(T0 + 5)
