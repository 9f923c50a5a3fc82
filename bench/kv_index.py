"""What the KV-aware routing's pure parts cost, one process, no Ray: `python -m bench.kv_index`.

A fleet of 16 engines, each holding about 25,000 blocks of 16 tokens (an H100 with an 8B model):
a system prompt of 100 blocks every engine holds, then conversations of 512 blocks (8,192
tokens, a 32 KB prompt) of its own. Measured: applying BlockStored events, the index's match for
a 512-block prompt (held whole by one engine, its first 100 blocks by all; held by none), the
block keys of 8,192 tokens, rendering and tokenizing a 32 KB chat prompt whose pieces were seen
before and one whose were not (the e2e tiny model's tokenizer, when there), the ingress's whole
step for a 32 KB body, the kv_aware ranking of 16 providers, and the index's memory per holding.
Prints the median and the 99th percentile of each, in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from serve_app.core.config import KvAwareKnobs
from serve_app.routing.kv.events import BlockStored
from serve_app.routing.kv.index import BlockIndex
from serve_app.routing.kv.score import ProviderView, rank
from serve_app.routing.kv.tokens import (
    HfTokenizer,
    PromptKeys,
    SimpleTokenizer,
    Tokenizer,
    prompt_keys,
)

BLOCK = 16
ENGINES = 16
BLOCKS_PER_ENGINE = 25_000
SYSTEM_BLOCKS = 100
PROMPT_BLOCKS = 512
_WORDS = ("the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on")


def _random_text(seed: int, chars: int = 32 * 1024) -> str:
    """Random words: a text no cache has seen pieces of."""
    return " ".join(random.Random(seed).choices(_WORDS, k=chars // 3))[:chars]


E2E_MODEL = Path(__file__).resolve().parent.parent / ".e2e" / "model" / "base"


def _timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median and p99 in microseconds."""
    samples = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def _tokens(rng: random.Random, blocks: int) -> list[int]:
    return [rng.randrange(32_000) for _ in range(blocks * BLOCK)]


def _build(rng: random.Random) -> tuple[BlockIndex, list[int], list[list[int]], float]:
    """The fleet's index, the system prompt and one conversation per engine; seconds applying."""
    index = BlockIndex()
    system = _tokens(rng, SYSTEM_BLOCKS)
    firsts: list[list[int]] = []
    applying = 0.0
    for e in range(ENGINES):
        next_hash = e << 40
        held = 0
        while held + PROMPT_BLOCKS <= BLOCKS_PER_ENGINE:
            tokens = [*system, *_tokens(rng, PROMPT_BLOCKS - SYSTEM_BLOCKS)]
            if held == 0:
                firsts.append(tokens)
            hashes = list(range(next_hash, next_hash + PROMPT_BLOCKS))
            next_hash += PROMPT_BLOCKS
            event = BlockStored(hashes, None, tokens, BLOCK, None, "GPU", None)
            start = time.perf_counter()
            index.apply(f"engine-{e}", [event])
            applying += time.perf_counter() - start
            held += PROMPT_BLOCKS
    return index, system, firsts, applying


def _chat(prompt_bytes: int) -> list[dict[str, str]]:
    system = ("You are a careful assistant. Follow the rules below. " * 700)[: prompt_bytes - 200]
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "conversation 7: " + "details " * 20},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=E2E_MODEL, help="a HF tokenizer folder")
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    rng = random.Random(0)
    rows: list[tuple[str, float, float]] = []

    index, system, firsts, applying = _build(rng)
    per_block = applying / index.total * 1e6
    rows.append(("apply BlockStored, per block", per_block, per_block))

    held = prompt_keys(firsts[0], BLOCK)
    shared = prompt_keys([*system, *_tokens(rng, PROMPT_BLOCKS - SYSTEM_BLOCKS)], BLOCK)
    miss = prompt_keys(_tokens(rng, PROMPT_BLOCKS), BLOCK)
    assert index.match(held)["engine-0"] == PROMPT_BLOCKS
    assert set(index.match(shared).values()) == {SYSTEM_BLOCKS}
    for name, keys in (
        ("match 512 blocks: 1 engine all, 15 the first 100", held),
        ("match 512 blocks: 16 engines the first 100", shared),
        ("match 512 blocks: held by none", miss),
    ):
        rows.append((f"{name} (all 16 engines)", *_timed(lambda k=keys: index.match(k), args.reps)))

    tokens = firsts[0]
    rows.append(("block keys of 8,192 tokens", *_timed(lambda: prompt_keys(tokens, BLOCK), 500)))

    messages = _chat(32 * 1024)
    tokenizers: list[tuple[str, Tokenizer]] = [("simple", SimpleTokenizer())]
    if (args.tokenizer / "tokenizer.json").is_file():
        tokenizers.append(("e2e tiny model", HfTokenizer(args.tokenizer)))
    for name, tokenizer in tokenizers:
        count = len(tokenizer.chat_prompt(messages))
        seen = _timed(lambda t=tokenizer: t.chat_prompt(messages), 200)
        rows.append((f"render + tokenize 32 KB chat, seen before ({name}: {count} tokens)", *seen))

        texts = iter([_random_text(n) for n in range(100)])

        def unseen(t: Tokenizer = tokenizer, texts: Iterator[str] = texts) -> object:
            return t.chat_prompt([{"role": "user", "content": next(texts)}])

        rows.append((f"render + tokenize 32 KB chat, never seen ({name})", *_timed(unseen, 100)))
    if len(tokenizers) > 1:
        body = orjson.dumps({"model": "m", "messages": messages})
        keys = PromptKeys(str(args.tokenizer), BLOCK)

        async def on_a_loop() -> list[float]:
            """Each call timed on one running loop, as the ingress makes it."""
            await keys.of(body)
            samples = []
            for _ in range(200):
                start = time.perf_counter_ns()
                await keys.of(body)
                samples.append((time.perf_counter_ns() - start) / 1000)
            return sorted(samples)

        ingress = asyncio.run(on_a_loop())
        rows.append(
            (
                "the ingress's keys of a 32 KB chat body, seen before",
                statistics.median(ingress),
                ingress[int(len(ingress) * 0.99)],
            )
        )

    matched = index.match(held)
    views = {
        f"engine-{e}": ProviderView(
            matched_tokens=matched.get(f"engine-{e}", 0) * BLOCK,
            running=rng.randrange(30),
            waiting=rng.randrange(5),
            kv_usage=rng.random(),
            in_flight=rng.randrange(10),
        )
        for e in range(ENGINES)
    }
    knobs = KvAwareKnobs()
    ranking = _timed(lambda: rank(PROMPT_BLOCKS * BLOCK, views, knobs, seed=held[0]), args.reps)
    rows.append(("kv_aware rank of 16 providers", *ranking))

    many = (tokens * (BLOCKS_PER_ENGINE * BLOCK // len(tokens) + 1))[: BLOCKS_PER_ENGINE * BLOCK]
    stored = BlockStored(list(range(BLOCKS_PER_ENGINE)), None, many, BLOCK, None, "GPU", None)
    tracemalloc.start()
    one = BlockIndex()
    one.apply("engine", [stored])
    memory = tracemalloc.get_traced_memory()[0] / one.total
    tracemalloc.stop()
    print(f"index: {index.total:,} holdings; {memory:.0f} B per holding (tracemalloc, one engine)")
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'p50 us':>9}  {'p99 us':>9}")
    for name, p50, p99 in rows:
        print(f"{name:{width}}  {p50:9.1f}  {p99:9.1f}")


if __name__ == "__main__":
    main()
