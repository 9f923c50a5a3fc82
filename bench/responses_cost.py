"""What the router's Responses state costs an ingress replica per request, without the HTTP and
Serve noise: a continuation of a 10-turn conversation (its earlier turns read from the store,
the whole conversation made into the request) and its answer stored, against the real store
actor on a local Ray. c=1: one request after another; c=32: 32 interleaved on the event loop.
Measured both ways an ingress replica reaches the store: the file itself (a replica on the store
actor's node) and through the actor (any other node); and the SQLite store alone (one process).
Prints microseconds per request.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson

from bench.local_ray import run_in_local_ray, us_per_request

if TYPE_CHECKING:
    from serve_app.cluster.registry.actor import RegistryRef

MODEL = "bench/echo"
TURNS = 10
PROVIDER = {"id": "p", "api_host": "http://127.0.0.1:9", "api_type": "openai", "input_size": 8192}
CONFIG = {"t": {MODEL: {"providers": [PROVIDER]}}, "active_models": {"t": [MODEL]}}
SENTENCE = "a sentence of a conversation that goes on for a while, as they do " * 3


def _answer() -> dict[str, Any]:
    """An upstream's Response to one turn."""
    content = [{"type": "output_text", "text": SENTENCE, "annotations": []}]
    item = {"type": "message", "role": "assistant", "id": f"msg_{uuid.uuid4().hex}"}
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "status": "completed",
        "model": MODEL,
        "output": [item | {"content": content}],
        "usage": {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120},
    }


async def _measure(registry: RegistryRef, n: int) -> dict[str, Any]:
    from serve_app.conversations.actor import responses_handle
    from serve_app.conversations.service import Conversations
    from serve_app.pickers.plan import PROVIDER_HEADER, Head, Unary

    (await registry.handle().publish_config.remote(CONFIG, "bench")).checked("bench")
    out: dict[str, Any] = {"turns": TURNS}
    for place, local in (("file", True), ("actor", False)):
        conv = Conversations(lambda: responses_handle(registry), "bench-ingress", local=local)

        async def turn(previous: str | None, conv: Conversations = conv) -> str:
            body = {"model": MODEL, "input": SENTENCE, "previous_response_id": previous}
            t = await conv.begin(orjson.dumps(body), "owner")
            answer = _answer()
            head = Head(200, "application/json", {PROVIDER_HEADER: "p"})
            await conv.record(t, Unary(head, orjson.dumps(answer)), lambda _: False)
            return answer["id"]

        chain: str | None = None
        for _ in range(TURNS - 1):
            chain = await turn(chain)

        async def tenth(chain: str | None = chain, turn: Any = turn) -> None:
            await turn(chain)  # the 10th turn of the same conversation, each time

        out[place] = await us_per_request(tenth, n)
    out["store_alone_us_per_request"] = _store_alone(n)
    return out


def _store_alone(n: int) -> float:
    """The SQLite part: the previous turn read, the new one written (one process, no actor)."""
    from serve_app.conversations.chain import StoredResponse, conversation
    from serve_app.conversations.store import ResponseStore

    def stored(previous: StoredResponse | None) -> StoredResponse:
        answer, items = _answer(), conversation(previous, {"input": SENTENCE})
        return StoredResponse(
            id=answer["id"],
            owner="o",
            model=MODEL,
            created=time.time(),
            input=items,
            response=answer,
        )

    with tempfile.TemporaryDirectory() as folder:
        store = ResponseStore(f"{folder}/r.db", ttl_s=1e9, max_bytes=1 << 30)
        previous = None
        for _ in range(TURNS - 1):
            previous = stored(previous)
            store.put(previous)
        assert previous is not None
        t0 = time.perf_counter()
        for _ in range(n):
            store.put(stored(store.get(previous.id, "o")))
        return round((time.perf_counter() - t0) / n * 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3_200)
    args = parser.parse_args(argv)
    return run_in_local_ray("responses-cost", lambda registry: _measure(registry, args.requests))


if __name__ == "__main__":
    raise SystemExit(main())
