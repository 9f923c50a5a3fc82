"""What each strategy costs a router replica per request, without the HTTP and Serve noise.

Runs the router's own request-path code for choosing and holding a provider (the Dispatcher's
attempts: candidates, strategy order or slot, use and latency counts, release) against a real
broker actor on a local Ray, for 40 providers as in `make bench --strategies`. c=1: one
request after another; c=32: 32 requests interleaved on the event loop, each holding its
provider across a yield as a real upstream call would. Prints microseconds per request and
where the slots came from.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import orjson

from bench.local_ray import local_registry

MODEL = "bench/echo"


def _config(strategy: str, count: int) -> dict:
    providers = [
        {
            "id": f"p{i}",
            "api_host": "http://127.0.0.1:9",
            "api_type": "openai",
            "input_size": 8192,
            "nworkers": 2,
        }
        for i in range(count)
    ]
    return {
        "t": {MODEL: {"providers": providers}},
        "active_models": {"t": [MODEL]},
        "routing": {"t": {"strategy": strategy}},
    }


async def _measure(strategy: str, registry: object, count: int, n: int) -> dict:
    from serve_app.broker import Terms, broker_handle
    from serve_app.config import parse_config
    from serve_app.dispatch import Dispatcher
    from serve_app.handler import ModelHandler
    from serve_app.schemas import Endpoint, RequestMeta
    from serve_app.shared import SharedState

    config = parse_config(_config(strategy, count))
    routing = config.model_types["t"].routing
    handler = ModelHandler(config=config)
    shared = SharedState(lambda: broker_handle(registry), f"bench-{strategy}")
    shared.configure(list(handler.states), [MODEL], Terms(routing.lease_s, routing.pin_ttl_s, 0.3))
    shared.start()
    dispatcher = Dispatcher(handler, routing, None, shared=shared)  # type: ignore[arg-type]
    meta = RequestMeta(Endpoint.CHAT, MODEL, False, 10, False, "r")
    loop = asyncio.get_running_loop()

    async def one(hold: bool) -> None:
        view = dispatcher._view
        with dispatcher._attempts(view, meta, loop.time() + 60) as attempts:
            provider = await attempts.next([])
            assert provider is not None
            if hold:
                await asyncio.sleep(0)
            attempts.answered()

    for _ in range(200):  # warm: first slots from the broker, first snapshot
        await one(False)
    await asyncio.sleep(0.2)
    out: dict[str, object] = {}
    for c in (1, 32):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            if c == 1:
                for _ in range(n):
                    await one(False)
            else:

                async def worker(calls: int) -> None:
                    for _ in range(calls):
                        await one(True)

                await asyncio.gather(*(worker(n // c) for _ in range(c)))
            times.append((time.perf_counter() - t0) / n * 1e6)
        out[f"c{c}_us_per_request"] = round(statistics.median(times), 1)
    values = shared.tally.snapshot().values
    out["slot_takes"] = {labels[0]: n for (name, labels), n in values.items() if "slot" in name}
    await shared.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--strategies",
        default="balanced,weighted,dynamic_weighted,first_available,first_available_optim,"
        "first_available_optim_nworkers",
    )
    parser.add_argument("--providers", type=int, default=40)
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args(argv)
    report = {}
    with local_registry("strategy-cost") as registry:
        for strategy in args.strategies.split(","):
            report[strategy] = asyncio.run(
                _measure(strategy, registry, args.providers, args.requests)
            )
            print(strategy, orjson.dumps(report[strategy]).decode(), flush=True)
    base = report.get("balanced")
    if base:
        for row in report.values():
            for c in ("c1", "c32"):
                row[f"{c}_extra_us_vs_balanced"] = round(
                    row[f"{c}_us_per_request"] - base[f"{c}_us_per_request"], 1
                )
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
