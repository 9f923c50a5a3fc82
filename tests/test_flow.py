"""Flow control without Ray or HTTP: the queue's order (priority, weighted fair share between
tenants, arrival), its bounds and shedding; a picker whose model is full queues, dispatches the
moment a booking ends, times out, lets a leaving client go, and sheds."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from serve_app.core.config import parse_config
from serve_app.core.schemas import Endpoint, RequestMeta
from serve_app.flow.queue import FairQueue, Waiter, priority_label
from serve_app.pickers import queues
from serve_app.pickers.handler import ModelHandler
from serve_app.pickers.picker import Picker
from serve_app.pickers.plan import DONE, Event, Report
from tests.conftest import provider, until


def _w(name: str, priority: int = 0, tenant: str = "a", weight: float = 1.0, size: int = 1):
    return Waiter(name, priority, tenant, weight, size)


def _drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while (w := queue.pop()) is not None:
        out.append(w.item)
    return out


def test_priority_first_then_tenants_in_turn_then_arrival() -> None:
    queue: FairQueue[str] = FairQueue(100, 1000)
    for name, priority, tenant in [
        ("a1", 0, "a"),
        ("a2", 0, "a"),
        ("a3", 0, "a"),
        ("b1", 0, "b"),
        ("hi", 5, "c"),
        ("b2", 0, "b"),
        ("lo", -1, "a"),
    ]:
        assert queue.push(_w(name, priority, tenant)) == []
    assert queue.peek() is not None and queue.peek().item == "hi"
    assert _drain(queue) == ["hi", "a1", "b1", "a2", "b2", "a3", "lo"]
    assert len(queue) == 0 and queue.bytes == 0


def test_weights_share_the_turns_and_an_idle_tenant_banks_none() -> None:
    queue: FairQueue[str] = FairQueue(10_000, 10**9)
    for n in range(400):
        queue.push(_w(f"a{n}", tenant="a", weight=3.0))
        queue.push(_w(f"b{n}", tenant="b", weight=1.0))
    served = Counter(queue.pop().item[0] for _ in range(400))
    assert served == {"a": 300, "b": 100}
    # A tenant that was away does not come back with a pile of turns.
    queue = FairQueue(10_000, 10**9)
    for n in range(50):
        queue.push(_w(f"a{n}", tenant="a"))
    _drain(queue)
    for n in range(10):
        queue.push(_w(f"a{n}", tenant="a"))
        queue.push(_w(f"c{n}", tenant="c"))
    turns = "".join(queue.pop().item[0] for _ in range(6))
    assert turns in ("acacac", "cacaca")  # in turn, not c six times for its idle spell


def test_a_full_queue_sheds_the_lowest_priority_newest_first() -> None:
    queue: FairQueue[str] = FairQueue(3, 1000)
    for name, priority in [("old", 0), ("new", 0), ("mid", 1)]:
        assert queue.push(_w(name, priority)) == []
    high = _w("high", 2)
    assert [w.item for w in queue.push(high)] == ["new"]
    assert [w.item for w in queue.push(_w("top", 3))] == ["old"]
    # Nothing below it: the newcomer itself is refused, and nothing is dropped.
    same = _w("same", 1)
    assert queue.push(same) == [same] and len(queue) == 3
    assert _drain(queue) == ["top", "high", "mid"]


def test_priority_labels_are_seven_ranges() -> None:
    labels = {priority_label(p) for p in range(-1000, 1001)}
    assert labels == {"0", "1..9", "10..99", "100..1000", "-9..-1", "-99..-10", "-1000..-100"}
    assert [priority_label(p) for p in (9, 10, 99, 100, -1, -10)] == [
        "1..9",
        "10..99",
        "10..99",
        "100..1000",
        "-9..-1",
        "-99..-10",
    ]


def test_the_byte_bound_and_removal() -> None:
    queue: FairQueue[str] = FairQueue(100, 10)
    big = _w("big", size=11)
    assert queue.push(big) == [big]  # larger than the whole queue
    a, b = _w("a", size=6), _w("b", 1, size=6)
    assert queue.push(a) == [] and queue.push(b) == [a]  # b's priority is higher
    assert queue.bytes == 6 and queue.remove(b) and not queue.remove(b)
    assert len(queue) == 0 and queue.by_priority() == {}


META = RequestMeta(Endpoint.CHAT, "m", False, 10, False, "r")


def _picker(queue_timeout_s: float = 30.0, queue_max_requests: int = 100) -> Picker:
    config = parse_config(
        {
            "t": {"m": {"providers": [provider("a", "http://127.0.0.1:9/a", max_concurrency=1)]}},
            "active_models": {"t": ["m"]},
            "routing": {
                "t": {
                    "queue_timeout_s": queue_timeout_s,
                    "queue_max_requests": queue_max_requests,
                }
            },
        },
        "test",
    )
    return Picker("p", ModelHandler(config=config), config.model_types["t"].routing)


async def _true(value: bool) -> bool:
    return value


def _outcomes(picker: Picker) -> set[str]:
    """How the picker's queued requests' waits ended."""
    histograms = picker.tally.snapshot().histograms
    return {labels[2] for (name, labels) in histograms if name == "llm_router_queue_wait_seconds"}


def _done(picker: Picker, plan_id: str) -> None:
    picker.report(Report("i", [Event(plan_id, "", DONE)], []))


async def test_a_full_model_queues_and_the_next_goes_when_a_booking_ends() -> None:
    picker = _picker()
    first = await picker.plan(META, ())
    assert [p.id for p in first.targets] == ["a"] and not first.queued
    low = await picker.plan(META._replace(tenant="k1", request_id="low"), ())
    high = await picker.plan(META._replace(tenant="k2", priority=5, request_id="high"), ())
    assert low.queued and high.queued and not low.targets
    waits = [asyncio.ensure_future(picker.wait(t.plan_id)) for t in (low, high)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waits)
    _done(picker, first.plan_id)  # room: the higher priority goes, booked
    got = await asyncio.wait_for(waits[1], 1)
    assert [p.id for p in got.targets] == ["a"] and got.waited > 0 and not waits[0].done()
    assert picker.handler.states["a"].in_flight == 1
    _done(picker, got.plan_id)
    assert (await asyncio.wait_for(waits[0], 1)).targets[0].id == "a"
    assert _outcomes(picker) == {"dispatched"}


async def test_a_wait_times_out_and_a_leaving_client_leaves_the_queue() -> None:
    picker = _picker(queue_timeout_s=0.05)
    first = await picker.plan(META, ())
    queued = await picker.plan(META, ())
    answer = await asyncio.wait_for(picker.wait(queued.plan_id), 2)
    assert answer.error is not None and answer.error.head.status == 429
    assert b"queue_timeout" in answer.error.body and answer.error.head.headers["retry-after"]
    picker = _picker()
    first = await picker.plan(META, ())
    queued = await picker.plan(META, ())
    wait = asyncio.ensure_future(picker.wait(queued.plan_id))
    await asyncio.sleep(0)
    assert picker.queues.lengths() == {("m", "0"): 1}
    wait.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait
    assert picker.queues.lengths() == {("m", "0"): 0}
    _done(picker, first.plan_id)  # nobody waits: nothing is booked
    assert picker.handler.states["a"].in_flight == 0 and picker.plans == {}


async def test_the_ingress_report_takes_out_a_request_whose_wait_never_arrived() -> None:
    """Serve may lose a cancel that reaches the picker before the wait call itself: the
    ingress's report of the ticket as done takes the request out all the same."""
    picker = _picker()
    first = await picker.plan(META, ())
    queued = await picker.plan(META, ())
    assert picker.queues.lengths() == {("m", "0"): 1}
    _done(picker, queued.plan_id)
    assert picker.queues.lengths() == {("m", "0"): 0}
    late = await picker.wait(queued.plan_id)  # the wait call, arriving after all
    assert late.error is not None and late.error.head.status == 503
    assert _outcomes(picker) == {"left"}
    # Planned while nobody asked, then reported left: the plan goes back at once.
    again = await picker.plan(META, ())
    _done(picker, first.plan_id)  # room: `again` is planned and booked for nobody yet
    assert picker.handler.states["a"].in_flight == 1
    _done(picker, again.plan_id)
    assert picker.handler.states["a"].in_flight == 0 and picker.plans == {}


async def test_a_ticket_whose_wait_never_comes_leaves_the_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plan call's answer (the ticket) never reached its ingress (its client left while
    the call was under way): nobody would wait on it or report it."""
    monkeypatch.setattr(queues, "UNCLAIMED_S", 0.05)
    picker = _picker()
    await picker.plan(META, ())
    forgotten = await picker.plan(META, ())
    asked = await picker.plan(META, ())
    wait = asyncio.ensure_future(picker.wait(asked.plan_id))
    assert forgotten.queued
    await until(lambda: _true(picker.queues.lengths() == {("m", "0"): 1}), "the forgotten gone")
    assert not wait.done()  # the one waited on stays
    assert _outcomes(picker) == {"unclaimed"}  # told apart from a client seen to leave
    wait.cancel()


async def test_a_full_queue_sheds_and_a_plan_made_for_nobody_goes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queues, "UNCLAIMED_S", 0.05)
    picker = _picker(queue_max_requests=1)
    first = await picker.plan(META, ())
    low = await picker.plan(META, ())
    high = await picker.plan(META._replace(priority=1), ())
    assert high.queued
    shed = await picker.wait(low.plan_id)
    assert shed.error is not None and shed.error.head.status == 503 and b'"shed"' in shed.error.body
    refused = await picker.plan(META, ())  # lower than what waits: refused at once
    assert refused.error is not None and refused.error.head.status == 503
    # The high one is planned when room comes, but its ingress never asks: it goes back.
    _done(picker, first.plan_id)
    assert picker.handler.states["a"].in_flight == 1
    # Its unclaimed answer's timer gives the plan back.
    await until(lambda: _true(picker.plans == {}), "the unclaimed plan given back")
    assert picker.handler.states["a"].in_flight == 0


async def test_waiting_requests_are_sent_back_when_flow_control_is_turned_off() -> None:
    picker = _picker()
    await picker.plan(META, ())
    queued = await picker.plan(META, ())
    off = _picker(queue_timeout_s=30.0)
    picker.update(off.handler, off.routing.model_copy(update={"queue_timeout_s": None}))
    answer = await asyncio.wait_for(picker.wait(queued.plan_id), 1)
    assert answer.error is not None and answer.error.head.status == 503
    assert b"routing_changed" in answer.error.body
