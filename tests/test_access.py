"""Keys and the limiter's books (pure): hashes, limits per minute and budget period, leases
that add up to the limit across holders, corrections from real usage."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from serve_app.access.gate import Admission, flow_terms
from serve_app.access.keys import KeyLimits, KeyRecord, new_key, parse_key, verify
from serve_app.access.ledger import GRACE_S, WINDOW_S, Ledger, Used
from serve_app.access.reserve import requested_output, reservation
from serve_app.core.errors import RouterError
from serve_app.core.schemas import Endpoint
from serve_app.dialects.usage import StreamMeter

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


@pytest.mark.parametrize(
    ("endpoint", "body", "bound"),
    [
        (Endpoint.CHAT, {"max_tokens": 40}, 40),
        (Endpoint.CHAT, {"max_completion_tokens": 30, "max_tokens": 40, "n": 2}, 60),
        (Endpoint.CHAT, {}, None),
        (Endpoint.CHAT, {"max_tokens": True}, None),
        (Endpoint.COMPLETIONS, {"max_tokens": 7}, 7),
        (Endpoint.RESPONSES, {"max_output_tokens": 9}, 9),
        (Endpoint.MESSAGES, {"max_tokens": 11}, 11),
        (Endpoint.OLLAMA_CHAT, {"options": {"num_predict": 12}}, 12),
        (Endpoint.OLLAMA_GENERATE, {"options": {"num_predict": -1}}, None),  # no bound
        (Endpoint.OLLAMA_GENERATE, {}, None),
        (Endpoint.EMBEDDINGS, {"max_tokens": 5}, 0),  # generates nothing
        (Endpoint.COUNT_TOKENS, {"max_tokens": 5}, 0),
    ],
)
def test_what_a_request_may_generate_in_each_dialect(
    endpoint: Endpoint, body: dict, bound: int | None
) -> None:
    assert requested_output(endpoint, orjson.dumps({"model": "m", **body})) == bound


def test_requests_in_flight_are_counted_for_what_they_may_generate_then_settled() -> None:
    ledger, record = Ledger(), _key(tpm_limit=300, default_max_tokens=20)
    assert reservation(5, 40, record.default_max_tokens) == 45
    assert reservation(5, None, record.default_max_tokens) == 25  # the key's default
    assert reservation(5, None, None) == 5
    holders, admitted = {"a": Used(), "b": Used()}, 0
    for i in range(12):  # none has settled yet: each holds its 45 until it does
        holder = "ab"[i % 2]
        grant = ledger.take(record, holder, 45, holders[holder], T0 + i * 0.01)
        if grant.refusal is None:
            admitted += 1
            holders[holder] = Used(1, 45, 45)  # of its new lease
        else:
            assert grant.refusal.reason == "tpm"
            holders[holder] = Used()
    assert admitted == 6  # 6 * 45 <= 300 < 7 * 45
    for holder, used in holders.items():  # the leases go back with what was reserved
        ledger.give_back(record, holder, used, T0 + 1)
    # They used 25 each, not 45: the answers settle the difference, which is free again.
    ledger.correct(record, grant.window, admitted * (25 - 45), T0 + 1)
    more, used = 0, Used()
    while ledger.take(record, "c", 45, used, T0 + 1).refusal is None:
        more, used = more + 1, Used(1, 45, 45)
    assert more == (300 - 6 * 25) // 45


def test_a_key_caps_the_priority_its_clients_may_ask_for() -> None:
    def asked(record: KeyRecord, sent: str | None) -> object:
        headers = {} if sent is None else {"x-priority": sent}
        return flow_terms(Admission(record, 0, 0, {}), headers)["priority"]

    capped = _key(priority=2, set_priority=True, max_priority=10)
    assert [asked(capped, s) for s in (None, "5", "10", "1000", "-1000")] == [2, 5, 10, 10, -1000]
    own = _key(priority=2, set_priority=True)  # no ceiling set: its own priority
    assert [asked(own, s) for s in ("1", "3")] == [1, 2]
    assert asked(_key(priority=2, max_priority=9), "9") == 2  # x-priority not allowed at all
    with pytest.raises(RouterError) as info:
        asked(capped, "1001")
    assert info.value.status == 400


def _sse(doc: dict) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


@pytest.mark.parametrize(
    ("dialect", "events", "final"),
    [
        (
            "openai",
            [
                {"choices": [{"delta": {"content": "abcd"}}]},
                {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "efgh"}}]}}]},
            ],
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}},
        ),
        (
            "responses",
            [
                {"type": "response.output_text.delta", "delta": "abcd"},
                {"type": "response.reasoning_text.delta", "delta": "efgh"},
            ],
            {
                "type": "response.completed",
                "response": {"usage": {"input_tokens": 3, "output_tokens": 9}},
            },
        ),
        (
            "anthropic",
            [
                {
                    "type": "message_start",
                    "message": {"usage": {"input_tokens": 3, "output_tokens": 1}},
                },
                {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "abcd"}},
                {"type": "content_block_delta", "delta": {"partial_json": "efgh"}},
            ],
            {"type": "message_delta", "usage": {"output_tokens": 9}},
        ),
    ],
)
def test_a_stream_meter_counts_what_it_relayed_until_the_last_counts(
    dialect: str, events: list[dict], final: dict
) -> None:
    meter = StreamMeter(dialect, strip=False)  # type: ignore[arg-type]
    for event in events:
        meter.feed(_sse(event)[:5])  # cut anywhere
        meter.feed(_sse(event)[5:])
    assert meter.relayed == 2 and not meter.final  # cut here: 8 characters relayed
    meter.feed(_sse(final))
    assert meter.final and meter.counts == (3, 9)


def test_a_stripped_or_ollama_stream_counts_what_it_relayed() -> None:
    meter = StreamMeter("openai", strip=True)
    out = meter.feed(_sse({"choices": [{"delta": {"content": "abcdefgh"}}]}))
    assert out and meter.relayed == 2
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    assert meter.feed(_sse(usage)) == b"" and meter.final  # the client did not ask for it
    ollama = StreamMeter("ollama", strip=False)
    ollama.feed(orjson.dumps({"message": {"content": "abcd"}, "done": False}) + b"\n")
    ollama.feed(orjson.dumps({"response": "efgh", "done": False}) + b"\n")
    assert ollama.relayed == 2 and ollama.counts is None
    ollama.feed(orjson.dumps({"done": True, "prompt_eval_count": 3, "eval_count": 2}) + b"\n")
    assert ollama.final and ollama.counts == (3, 2)
