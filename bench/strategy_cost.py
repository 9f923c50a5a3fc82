"""What each strategy costs a router replica per request, without the HTTP and Serve noise.

Runs the picker's own code for choosing and holding a provider (a plan: candidates, strategy
order or slot, use counts; then the ingress's report of it: latency, release) against a real
broker actor on a local Ray, for 40 providers as in `make bench --strategies`. c=1: one
request after another; c=32: 32 requests interleaved on the event loop, each holding its
provider across a yield as a real upstream call would. Every request carries a 32 KB chat
prompt (one of 64 conversations) and a session id, which prefix_affinity hashes and matches and
session_affinity places. Prints microseconds per request and where the slots came from.
`--strategies balanced,balanced+flow` measures what flow control costs a request when the model
is not full (queue_timeout_s and max_load set; the extra over `balanced`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import orjson

from bench.local_ray import local_registry

PROMPT_BYTES = 32 * 1024
CONVERSATIONS = 64
FLOW = {"queue_timeout_s": 30.0, "max_load": 1000.0}


def _model(strategy: str) -> str:
    """Each case its own model, providers and host: the broker's counts, slots and pins are
    per model, provider and host, so the cases, interleaved, share none."""
    return f"bench/{strategy}"


def _bodies(model: str) -> list[bytes]:
    """32 KB chat prompts: a long system prompt, then a conversation of its own."""
    system = ("You are a careful assistant. Follow the rules below. " * 700)[: PROMPT_BYTES - 200]
    return [
        orjson.dumps(
            {
                "model": model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"conversation {i}: " + "details " * 20},
                ],
            }
        )
        for i in range(CONVERSATIONS)
    ]


def _config(strategy: str, count: int) -> dict:
    providers = [
        {
            "id": f"{strategy}-p{i}",
            "api_host": "http://127.0.0.1:9",
            "host": f"bench-{strategy}",
            "api_type": "openai",
            "input_size": 8192,
            "nworkers": 2,
        }
        for i in range(count)
    ]
    name, _, flow = strategy.partition("+")
    # `<strategy>+flow`: with flow control on (and its load bound checked), never saturated.
    routing = {"strategy": name, **(FLOW if flow else {})}
    return {
        "t": {_model(strategy): {"providers": providers}},
        "active_models": {"t": [_model(strategy)]},
        "routing": {"t": routing},
    }


class _Case:
    """One strategy's picker code path: a picker, its shared state, one request at a time."""

    def __init__(self, strategy: str, registry: object, count: int) -> None:
        from serve_app.cluster.broker import Terms, broker_handle
        from serve_app.core.config import parse_config
        from serve_app.core.schemas import Endpoint, RequestMeta
        from serve_app.pickers.handler import ModelHandler
        from serve_app.pickers.picker import Picker
        from serve_app.pickers.shared import SharedState
        from serve_app.routing.prefix import request_blocks

        config = parse_config(_config(strategy, count))
        routing = config.model_types["t"].routing
        handler = ModelHandler(config=config)
        self.shared = SharedState(lambda: broker_handle(registry), f"bench-{strategy}")
        self.shared.configure(
            list(handler.states),
            [_model(strategy)],
            Terms.of(routing),
            follow_index=routing.strategy == "prefix_affinity",
        )
        self.shared.start()
        self.picker = Picker("bench", handler, routing, shared=self.shared)
        chars = routing.prefix_block_chars if routing.strategy == "prefix_affinity" else 0
        # The ingress hashes the prompt's blocks; its cost is counted here too.
        self.bodies = _bodies(_model(strategy))
        self.blocks = lambda body: request_blocks(body, chars) if chars else ()
        self.metas = [
            RequestMeta(Endpoint.CHAT, _model(strategy), False, 10, False, "r", session=f"s{i}")
            for i in range(CONVERSATIONS)
        ]
        self.turn = 0

    async def one(self, hold: bool) -> None:
        from serve_app.pickers.plan import DONE, OK, Event, Report

        self.turn = turn = (self.turn + 1) % CONVERSATIONS
        plan = await self.picker.plan(self.metas[turn], self.blocks(self.bodies[turn]))
        assert plan.targets, plan.error
        if hold:
            await asyncio.sleep(0)
        ok = Event(plan.plan_id, plan.targets[0].id, OK, seconds=0.001)
        self.picker.report(Report("bench", [ok, Event(plan.plan_id, "", DONE)], []))

    async def per_request_us(self, c: int, n: int) -> float:
        t0 = time.perf_counter()
        if c == 1:
            for _ in range(n):
                await self.one(False)
        else:

            async def worker(calls: int) -> None:
                for _ in range(calls):
                    await self.one(True)

            await asyncio.gather(*(worker(n // c) for _ in range(c)))
        return (time.perf_counter() - t0) / n * 1e6


async def _measure(
    strategies: list[str], registry: object, count: int, n: int, rounds: int
) -> dict:
    """Rounds interleaved across the strategies (the host's speed drifts); the extra cost over
    `balanced` is the median of each round's difference."""
    cases = {s: _Case(s, registry, count) for s in strategies}
    for case in cases.values():
        for _ in range(200):  # warm: first slots from the broker, first snapshot
            await case.one(False)
    await asyncio.sleep(0.2)
    times: dict[str, dict[int, list[float]]] = {s: {1: [], 32: []} for s in strategies}
    for _ in range(rounds):
        for strategy, case in cases.items():
            for c in (1, 32):
                times[strategy][c].append(await case.per_request_us(c, n))
    report: dict[str, dict] = {}
    for strategy, case in cases.items():
        row: dict[str, object] = {
            f"c{c}_us_per_request": round(statistics.median(times[strategy][c]), 1) for c in (1, 32)
        }
        if "balanced" in times:
            for c in (1, 32):
                extra = [
                    a - b for a, b in zip(times[strategy][c], times["balanced"][c], strict=True)
                ]
                row[f"c{c}_extra_us_vs_balanced"] = round(statistics.median(extra), 1)
        values = case.shared.tally.snapshot().values
        row["slot_takes"] = {labels[0]: v for (name, labels), v in values.items() if "slot" in name}
        await case.shared.stop()
        report[strategy] = row
        print(strategy, orjson.dumps(row).decode(), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--strategies",
        default="balanced,weighted,dynamic_weighted,first_available,first_available_optim,"
        "first_available_optim_nworkers,least_loaded,prefix_affinity,session_affinity",
    )
    parser.add_argument("--providers", type=int, default=40)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    with local_registry("strategy-cost") as registry:
        report = asyncio.run(
            _measure(
                args.strategies.split(","), registry, args.providers, args.requests, args.rounds
            )
        )
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
