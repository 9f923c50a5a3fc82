"""What a client key costs an ingress replica per request, without the HTTP and Serve noise.

Runs the ingress's own key path (the key read and checked, the lease spent or renewed from a
real limiter actor on a local Ray, the answer's usage read and settled, the x-ratelimit
headers) for a key with request and token limits, for long enough that leases are renewed
and returned as under load. c=1: one request after another; c=32: 32 interleaved on the event
loop. Prints microseconds per request; `make bench`'s `keys` case measures the same end to end,
where it is below this host's noise.
"""

from __future__ import annotations

import argparse

import orjson

from bench.local_ray import run_in_local_ray, us_per_request

MODEL = "bench/echo"
PROVIDER = {"id": "p", "api_host": "http://127.0.0.1:9", "api_type": "openai", "input_size": 8192}
CONFIG = {
    "t": {MODEL: {"providers": [PROVIDER]}},
    "active_models": {"t": [MODEL]},
    "auth": {"require_keys": True},
}
REQUEST = orjson.dumps(
    {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hello there"}]}
)
ANSWER = orjson.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }
)


async def _measure(registry: object, n: int) -> dict:
    from serve_app.access.gate import Gate
    from serve_app.access.keys import KeyLimits
    from serve_app.access.limiter import limiter_handle
    from serve_app.access.reserve import requested_output
    from serve_app.cluster.registry.manifest import effective_config
    from serve_app.core.metrics import Tally
    from serve_app.core.schemas import Endpoint
    from serve_app.dialects.usage import counts_of

    handle = registry.handle()  # type: ignore[attr-defined]
    (await handle.publish_config.remote(CONFIG, "bench")).checked("bench")
    limits = KeyLimits(name="bench", rpm_limit=10_000_000, tpm_limit=10_000_000_000)
    made = orjson.loads((await handle.create_key.remote(limits, 1.0)).body)
    manifest = await handle.current.remote()
    gate = Gate("bench-ingress", lambda: limiter_handle(registry), Tally())
    gate.apply(manifest, effective_config(manifest))
    headers = {"authorization": f"Bearer {made['key']}"}

    async def one() -> None:
        admission = await gate.admit(
            headers, (MODEL,), 12, lambda: requested_output(Endpoint.CHAT, REQUEST)
        )
        assert admission is not None
        counts = counts_of("openai", orjson.loads(ANSWER))
        assert counts is not None
        gate.settle(admission, MODEL, *counts, estimated=False)

    out = await us_per_request(one, n)
    gate.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args(argv)
    return run_in_local_ray("key-cost", lambda registry: _measure(registry, args.requests))


if __name__ == "__main__":
    raise SystemExit(main())
