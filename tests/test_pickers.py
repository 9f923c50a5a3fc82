"""The split of deciding from relaying: a picker books what it plans until the ingress reports
the request done; outcomes reach the replica that made the plan; bookings of an ingress that
died come back. Pure tests of the picker and the reporter, then real Serve."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator, Sequence

import aiohttp
import pytest
import ray

from serve_app.cluster.broker import Terms
from serve_app.core.config import parse_config
from serve_app.core.schemas import Endpoint, RequestMeta
from serve_app.demo.upstream import FakeUpstream, Knobs
from serve_app.ingress.outcomes import Reporter
from serve_app.ingress.picking import answer_or_give_back
from serve_app.pickers.handler import ModelHandler
from serve_app.pickers.picker import Picker
from serve_app.pickers.plan import DONE, OK, Event, Report
from serve_app.pickers.shared import SharedState, Slot
from serve_app.routing.load import LoadSignal
from serve_app.routing.prefix import block_hashes
from tests.conftest import ADMIN, deploy, provider, samples, until

META = RequestMeta(Endpoint.CHAT, "m", False, 10, False, "r")


def _picker(strategy: str = "round_robin", ttl: float = 60.0) -> Picker:
    config = parse_config(
        {
            "t": {"m": {"providers": [provider(p, f"http://127.0.0.1:9/{p}") for p in "abc"]}},
            "active_models": {"t": ["m"]},
            "routing": {"t": {"strategy": strategy, "unhealthy_cooldown_s": 30}},
        },
        "test",
    )
    return Picker("p", ModelHandler(config=config), config.model_types["t"].routing, plan_ttl_s=ttl)


def _booked(picker: Picker) -> dict[str, int]:
    return {pid: s.in_flight for pid, s in picker.handler.states.items() if s.in_flight}


async def test_a_plan_books_its_first_provider_until_it_is_done() -> None:
    picker = _picker()
    plan = await picker.plan(META, ())
    first, second = plan.targets[0].id, plan.targets[1].id
    assert plan.picker == "p" and len(plan.targets) == 3
    assert _booked(picker) == {first: 1}
    # The ingress failed over: the booking follows it, and the first provider cools down.
    picker.report(Report("i", [Event(plan.plan_id, first, "HTTP 503", 503)], [plan.plan_id]))
    assert _booked(picker) == {second: 1}
    assert picker.handler.states[first].down_until > 0
    picker.report(Report("i", [Event(plan.plan_id, second, OK, seconds=0.01)], []))
    assert _booked(picker) == {second: 1}
    picker.report(Report("i", [Event(plan.plan_id, "", DONE)], []))
    assert _booked(picker) == {} and picker.plans == {}
    # The failed provider is not planned first while it cools down.
    assert (await picker.plan(META, ())).targets[0].id != first


async def test_a_plan_no_ingress_lists_comes_back_after_its_ttl() -> None:
    picker = _picker(ttl=0.0)
    kept, lost = await picker.plan(META, ()), await picker.plan(META, ())
    assert sum(_booked(picker).values()) == 2
    picker._ttl = 60.0
    picker.report(Report("i", [], [kept.plan_id]))  # only one is still under way
    assert picker.expire() == 1
    assert list(picker.plans) == [kept.plan_id]
    assert _booked(picker) == {kept.targets[0].id: 1}
    assert lost.plan_id not in picker.plans


async def test_outcomes_of_an_unknown_plan_still_teach_the_picker() -> None:
    """A report that reaches another replica (the owner is gone) counts the failure there."""
    picker = _picker()
    picker.report(Report("i", [Event("elsewhere:1", "a", "connection failed")], ["elsewhere:1"]))
    assert picker.handler.states["a"].down_until > 0 and picker.plans == {}


class _HoldsNothing:
    def match(self, keys: Sequence[int]) -> dict[str, int]:
        return {}


async def test_kv_aware_learns_where_the_text_went_for_providers_without_events() -> None:
    """A kv_aware model whose provider c publishes no KV events: its requests carry their text
    blocks (routes_by_text), the picker records them where they were answered, and the next
    request with that prefix goes to c (its engine reports nothing; the others hold nothing)."""
    events = {"endpoint": "tcp://*:5557"}
    providers = [
        provider("a", "http://127.0.0.1:9/a", "vllm", kv_events=events),
        provider("b", "http://127.0.0.1:9/b", "vllm", kv_events=events),
        provider("c", "http://127.0.0.1:9/c", "vllm"),
    ]
    raw = {
        "t": {"m": {"providers": providers, "tokenizer": "/tokenizer"}},
        "active_models": {"t": ["m"]},
        "routing": {"t": {"strategy": "kv_aware", "prefix_block_chars": 64}},
    }
    config = parse_config(raw, "test")
    model, routing = config.model_types["t"].models["m"], config.model_types["t"].routing
    assert model.routes_by_text("kv_aware") and model.routes_by_text("prefix_affinity")
    assert not model.routes_by_text("least_loaded")
    evented = model.model_copy(update={"providers": model.providers[:2]})
    assert not evented.routes_by_text("kv_aware")  # all publish events: nothing more to send
    handler = ModelHandler(config=config)
    shared = SharedState(lambda: None, "p")  # type: ignore[arg-type,return-value]
    shared.configure(list(handler.states), ["m"], Terms.of(routing), follow_index=True)
    picker = Picker("p", handler, routing, shared=shared, kv=_HoldsNothing())
    meta = META._replace(prompt_tokens=1600, text_blocks=block_hashes("p" * 6400, 64))
    keys = list(range(100))
    first = await picker.plan(meta, keys)
    picker.report(Report("i", [Event(first.plan_id, "c", OK, seconds=0.01)], []))
    picker.report(Report("i", [Event(first.plan_id, "", DONE)], []))
    for _ in range(3):
        plan = await picker.plan(meta, keys)
        assert plan.targets[0].id == "c" and plan.hits == (0, 0, 0)  # no KV prediction for c
        picker.report(Report("i", [Event(plan.plan_id, "", DONE)], []))


def test_prefix_affinity_weighs_the_engines_signals_against_the_prompts_size() -> None:
    handler = _picker("prefix_affinity").handler
    handler.states["a"].signal = LoadSignal(running=1, waiting=2)
    meta = META._replace(text_blocks=[1, 2])
    stats = handler.stats(meta, handler.candidates(meta))
    assert stats.signals == {"a": LoadSignal(running=1, waiting=2)} and stats.prompt_tokens == 10
    assert stats.text_blocks == [1, 2] and stats.held is None and not stats.prefix


async def test_the_reporter_batches_per_picker_and_lists_open_plans() -> None:
    sent: list[tuple[str, Report]] = []
    fail = [True]

    async def send(key: str, report: Report) -> None:
        if key == "down" and fail[0]:
            raise ConnectionError("picker unreachable")
        sent.append((key, report))

    reporter: Reporter[str] = Reporter("ingress-1", send)
    reporter.opened("a", "a:1")
    reporter.opened("a", "a:2")
    reporter.event("a", Event("a:1", "x", OK))
    reporter.closed("a", "a:1")
    reporter.opened("down", "d:1")
    reporter.event("down", Event("d:1", "y", "timed out"))
    await reporter.flush()
    assert sent == [
        ("a", Report("ingress-1", [Event("a:1", "x", OK), Event("a:1", "", DONE)], ["a:2"]))
    ]
    # An undelivered report's events wait for the next flush while the picker has open plans.
    fail[0] = False
    await reporter.flush()
    assert sent[1] == ("down", Report("ingress-1", [Event("d:1", "y", "timed out")], ["d:1"]))
    assert reporter.open_plans() == 2


# --- real Serve --------------------------------------------------------------------------------

TYPE = "picked_models"
MODEL = "m/picked"


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Iterator[dict[str, FakeUpstream]]:
    ups = {n: upstream_factory(n) for n in ("pk1", "pk2")}
    config = {
        TYPE: {MODEL: {"providers": [provider(n, u.url) for n, u in ups.items()]}},
        "active_models": {TYPE: [MODEL]},
        "routing": {TYPE: {"strategy": "least_in_flight", "num_replicas": 2}},
    }
    deploy(serve_url, config, ingress_replicas=1)
    yield ups
    for up in ups.values():
        up.knobs = Knobs()


async def _metrics(http: aiohttp.ClientSession, url: str, name: str) -> float:
    """A metric's total over this pool's providers (or unlabelled)."""
    async with http.get(f"{url}/metrics", headers=ADMIN) as resp:
        found = samples(await resp.text(), name)
    return sum(v for k, v in found.items() if "{" not in k or 'provider="pk' in k)


async def _in_flight(http: aiohttp.ClientSession, url: str) -> float:
    return await _metrics(http, url, "llm_router_provider_in_flight")


async def _expired(http: aiohttp.ClientSession, url: str) -> float:
    return await _metrics(http, url, "llm_router_plans_expired_total")


async def _stream(http: aiohttp.ClientSession, url: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        text = await resp.text()
        return resp.status if text.rstrip().endswith("data: [DONE]") else -1


@pytest.mark.serve
async def test_outcomes_reach_the_picker_replica_that_planned(
    serve_url: str, pool: dict[str, FakeUpstream], http
) -> None:
    """16 streams held mid-answer, planned by two picker replicas: once released, every booking
    is given back by its report, none by expiry (a report sent to the other replica would leave
    its plan to expire)."""
    expired = await _expired(http, serve_url)
    for up in pool.values():
        up.knobs = Knobs(hold_mid_stream=True)
    streams = [asyncio.ensure_future(_stream(http, serve_url)) for _ in range(16)]

    async def all_held() -> bool:
        return sum(u.active for u in pool.values()) == 16 and (
            await _in_flight(http, serve_url) == 16
        )

    await until(all_held, "16 streams held and booked")
    async with http.get(f"{serve_url}/api/v1/providers/state", headers=ADMIN) as resp:
        booked = (await resp.json())["health"]["in_flight_by_replica"]
    pickers = {r: n for r, n in booked.items() if r.startswith(f"router-{TYPE}:")}
    assert len(pickers) == 2 and sum(pickers.values()) == 16, booked  # both planned some
    for up in pool.values():
        up.release()
    assert await asyncio.gather(*streams) == [200] * 16

    async def given_back() -> bool:
        return await _in_flight(http, serve_url) == 0

    await until(given_back, "every booking given back")
    assert await _expired(http, serve_url) == expired


@pytest.mark.serve
async def test_an_ingress_replica_that_dies_mid_request_gives_its_bookings_back(
    serve_url: str, pool: dict[str, FakeUpstream], http
) -> None:
    expired = await _expired(http, serve_url)
    for up in pool.values():
        up.knobs = Knobs(hold_mid_stream=True)
    streams = [asyncio.ensure_future(_stream(http, serve_url)) for _ in range(4)]

    async def held() -> bool:
        return await _in_flight(http, serve_url) == 4

    await until(held, "4 streams booked")
    ingress = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::llm-router#Ingress#")
    ]
    assert len(ingress) == 1
    ray.kill(ray.get_actor(ingress[0], "serve"), no_restart=False)
    # Its clients are cut off; the upstreams see the hang-up.
    assert all(s != 200 for s in await asyncio.gather(*streams, return_exceptions=True))
    for up in pool.values():
        up.release()

    async def given_back() -> bool:
        try:
            return await _in_flight(http, serve_url) == 0
        except aiohttp.ClientError:
            return False  # the replacement ingress replica is starting

    # Nobody reports them done: the pickers give them back once they stop being listed
    # (PLAN_TTL_S 5 s, looked at every second).
    await until(given_back, "the dead ingress's bookings to come back", timeout=60)
    assert await _expired(http, serve_url) == expired + 4
    assert await _stream(http, serve_url) == 200


async def test_plans_made_ahead_follow_the_strategy_and_are_booked() -> None:
    picker = _picker("round_robin")
    plan = await picker.plan(META, (), spares=3)
    firsts = [plan.targets[0].id] + [s.targets[0].id for s in plan.spares]
    assert len(plan.spares) == 3 and sorted(firsts[:3]) == ["a", "b", "c"]
    assert firsts[3] == firsts[0]  # round robin went round
    assert sum(_booked(picker).values()) == 4 and len(picker.plans) == 4
    for spare in plan.spares:  # an unused plan given back
        picker.report(Report("i", [Event(spare.plan_id, "", DONE)], []))
    assert _booked(picker) == {firsts[0]: 1}


@pytest.mark.parametrize("strategy", ["first_available", "prefix_affinity", "session_affinity"])
async def test_no_plans_ahead_where_the_request_itself_decides(strategy: str) -> None:
    picker = _picker(strategy)
    assert (await picker.plan(META, (), spares=3)).spares == ()


async def test_a_slot_plan_is_kept_while_it_waits_and_a_late_slot_goes_back() -> None:
    """The picker's side of the broker, in process: slots come when the test says."""
    free, asked, released, ids = asyncio.Event(), asyncio.Event(), [], iter(range(100))

    class Slots:
        async def acquire(self, model: str, strategy: str, tiers: list, wait_s: float) -> Slot:
            asked.set()
            await free.wait()
            return Slot(f"lease-{next(ids)}", tiers[0][0].id)

        def release(self, slot: Slot) -> None:
            released.append(slot.lease_id)

        def used(self, model: str, provider: str) -> None:
            pass

    picker = _picker("first_available", ttl=0.0)
    picker.shared = Slots()  # type: ignore[assignment]
    waiting = asyncio.ensure_future(picker.plan(META, ()))
    await asyncio.wait_for(asked.wait(), 5)
    assert picker.expire() == 0  # nobody lists it yet, but it is waiting: not given back
    free.set()
    plan = await waiting
    assert plan.more and len(plan.targets) == 1 and released == []
    # The ingress asks for the next provider, and the plan ends while that waits for a slot.
    free.clear()
    asked.clear()
    asking = asyncio.ensure_future(picker.next(plan.plan_id))
    await asyncio.wait_for(asked.wait(), 5)
    assert released == ["lease-0"]  # the failed provider's slot
    picker.report(Report("i", [Event(plan.plan_id, "", DONE)], []))
    free.set()
    assert (await asking).targets == ()
    assert released == ["lease-0", "lease-1"] and picker.plans == {}


async def test_an_answer_that_comes_after_its_caller_left_is_given_back() -> None:
    """The ingress's plan and wait calls: a caller cancelled while its call is under way does
    not cancel the call, and what it brings back goes to give_back (a ticket or a booked plan
    the picker made for a client who left); a caller still there gets the answer as usual."""
    answers: list[asyncio.Future[str]] = []
    given: list[str] = []
    seen: list[str] = []  # the request context each call ran in
    request = contextvars.ContextVar("request", default="none")

    async def call() -> str:
        seen.append(request.get())
        answers.append(asyncio.get_running_loop().create_future())
        return await answers[-1]

    request.set("client-1")  # Serve's request context: the call must not run in it
    kept = asyncio.ensure_future(answer_or_give_back(call, given.append))
    await until(lambda: _true(len(answers) == 1), "the call under way")
    assert seen == ["none"]
    kept.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await kept
    assert not answers[0].cancelled()
    answers[0].set_result("q7")
    await until(lambda: _true(given == ["q7"]), "the late answer given back")
    # A caller that stays gets its answer, and nothing is given back.
    staying = asyncio.ensure_future(answer_or_give_back(call, given.append))
    await until(lambda: _true(len(answers) == 2), "the second call")
    answers[1].set_result("p:3")
    assert await staying == "p:3" and given == ["q7"]
    # A call that fails after its caller left gives nothing back.
    failing = asyncio.ensure_future(answer_or_give_back(call, given.append))
    await until(lambda: _true(len(answers) == 3), "the third call")
    failing.cancel()
    answers[2].set_exception(RuntimeError("picker gone"))
    await asyncio.sleep(0)
    assert given == ["q7"]


async def _true(value: bool) -> bool:
    return value
