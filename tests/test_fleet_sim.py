"""The vLLM simulator's pure parts (serve_app/demo/vllm_sim): block accounting, the KV event
stream (over real ZMQ on loopback) and the time model, on the simulated clock."""

from __future__ import annotations

import random
import time
from itertools import pairwise
from pathlib import Path

import aiohttp
import msgspec
import orjson
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from bench.fleet_text import BLOCK_TOKENS, Texts
from serve_app.demo.vllm_sim.engine import Engine, Request
from serve_app.demo.vllm_sim.kv_cache import chain_hashes
from serve_app.demo.vllm_sim.profiles import H100_LLAMA_8B, Profile
from serve_app.demo.vllm_sim.publisher import KVEventsConfig, ZmqPublisher, on_host
from serve_app.demo.vllm_sim.server import Fleet, Options, SimServer
from serve_app.routing.kv.events import (
    ENCODER,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
)
from serve_app.routing.kv.tokens import HfTokenizer, SimpleTokenizer, cuts_before_words, pieces
from tests.conftest import free_port
from tests.e2e.tiny_model import write_tokenizer
from tests.kv_events import replay

SMALL = Profile(
    name="small",
    block_size=4,
    num_gpu_blocks=9,  # 8 usable
    max_num_seqs=8,
    max_num_batched_tokens=64,
    max_model_len=64,
    step_overhead_s=0.01,
    prefill_token_s=0.001,
    attention_pair_s=0.0,
    decode_seq_s=0.001,
    kv_read_token_s=0.0,
)


def _request(name: str, prompt: list[int], out: int = 1) -> Request:
    return Request(name, prompt, [900 + i for i in range(out)])


def _run(engine: Engine, *requests: Request) -> None:
    """Adds the requests now and runs the engine until they all end."""
    for r in requests:
        engine.add(r)
    while any(r.finished_at is None for r in requests):
        end = engine.next_event()
        engine.advance(end if end is not None else engine.clock)


def _events(engine: Engine) -> list:
    return engine.cache.take_events()


def test_prefix_hit_is_the_cached_full_blocks_less_the_last_token() -> None:
    engine = Engine(SMALL)
    a = _request("a", list(range(10)))  # 2 full blocks + 2 tokens
    _run(engine, a)
    assert a.num_cached_tokens == 0
    b = _request("b", [*range(8), 50, 51, 52])
    c = _request("c", list(range(10)))
    d = _request("d", list(range(8)))  # its whole prompt cached: the last block is recomputed
    _run(engine, b)
    _run(engine, c)
    _run(engine, d)
    assert (b.num_cached_tokens, c.num_cached_tokens, d.num_cached_tokens) == (8, 8, 4)
    counters = engine.counters
    assert counters.prefix_queries == 10 + 11 + 10 + 8
    assert counters.prefix_hits == 8 + 8 + 4


def test_block_stored_events_chain_parents_and_carry_the_tokens() -> None:
    engine = Engine(SMALL)
    prompt = list(range(10))
    a = _request("a", prompt, out=3)  # 10 + 2 computed output tokens: a third full block
    _run(engine, a)
    stored = [e for e in _events(engine) if isinstance(e, BlockStored)]
    hashes = chain_hashes([*prompt, 900, 901], 4, [])
    assert [e.block_hashes for e in stored] == [hashes[:2], hashes[2:3]]
    assert [e.parent_block_hash for e in stored] == [None, hashes[1]]
    assert stored[0].token_ids == list(range(8))
    assert stored[1].token_ids == [8, 9, 900, 901]
    assert {e.block_size for e in stored} == {4}


def test_eviction_takes_uncached_blocks_first_then_least_recently_freed_last_block_first() -> None:
    engine = Engine(SMALL)
    a = _request("a", list(range(9)))  # 3 blocks, 2 cached
    b = _request("b", list(range(100, 109)))  # 3 blocks, 2 cached
    _run(engine, a)
    _run(engine, b)
    _events(engine)
    a_hashes = chain_hashes(list(range(9)), 4, [])
    b_hashes = chain_hashes(list(range(100, 109)), 4, [])
    # 8 usable blocks: the unused and uncached ones go first, then a's (tail first), then b's.
    c = _request("c", list(range(200, 223)))  # 6 blocks
    _run(engine, c)
    removed = [e.block_hashes[0] for e in _events(engine) if isinstance(e, BlockRemoved)]
    assert removed == [a_hashes[1], a_hashes[0]]
    assert engine.cache.cached_prefix(b_hashes) != []
    assert engine.cache.cached_prefix(a_hashes) == []


def test_a_full_cache_preempts_the_latest_request_which_then_recomputes() -> None:
    engine = Engine(SMALL)
    first = _request("first", list(range(10)), out=12)  # grows to 6 blocks
    second = _request("second", list(range(300, 310)), out=12)
    _run(engine, first, second)
    assert engine.counters.preemptions >= 1
    assert second.num_preemptions >= 1 and first.num_preemptions == 0
    assert first.num_output == second.num_output == 12
    assert engine.cache.num_free == 8  # every block back in the free queue


def test_ttft_grows_with_uncached_prompt_tokens_and_a_cached_prompt_answers_faster() -> None:
    def ttft(engine: Engine, prompt: list[int]) -> float:
        r = _request(f"r{len(prompt)}-{engine.counters.steps}", prompt)
        _run(engine, r)
        return r.token_times[0] - r.arrival

    short, long = list(range(1000)), list(range(20_000))
    engine = Engine(H100_LLAMA_8B)
    cold_short, cold_long = ttft(engine, short), ttft(engine, long)
    warm_long = ttft(engine, long)
    assert cold_long > 10 * cold_short
    assert warm_long < cold_long / 10
    # Chunked prefill: 20,000 tokens take ceil(20,000 / 8,192) = 3 steps.
    assert engine.counters.steps >= 3


def test_a_busy_engine_answers_later() -> None:
    def ttft_behind(others: int) -> float:
        engine = Engine(H100_LLAMA_8B)
        for i in range(others):
            engine.add(_request(f"o{i}", list(range(i * 10_000, i * 10_000 + 6000))))
        probe = _request("probe", list(range(-500, 0)))
        _run(engine, probe)
        return probe.token_times[0] - probe.arrival

    assert ttft_behind(8) > 4 * ttft_behind(0)


def test_step_time_grows_with_the_kv_read_of_decoding_sequences() -> None:
    short = H100_LLAMA_8B.step_seconds(0, 0, 32, 32 * 1000)
    long = H100_LLAMA_8B.step_seconds(0, 0, 32, 32 * 30_000)
    assert long > 2 * short


async def test_events_are_numbered_and_a_gap_is_replayed_over_zmq() -> None:
    port, replay_port = free_port(), free_port()
    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.bind(f"tcp://127.0.0.1:{port}")  # the engine connects, as vLLM does without `*`
    config = KVEventsConfig(
        enable_kv_cache_events=True,
        endpoint=f"tcp://127.0.0.1:{port}",
        replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
        topic="kv",
    )
    publisher = ZmqPublisher(config)
    engine = Engine(SMALL, on_events=publisher.publish)
    try:
        # Until the connection is up, batches are lost: that gap is what replay is for.
        deadline = time.monotonic() + 10
        n = 0
        received: list[tuple[int, object]] = []
        while not received:
            assert time.monotonic() < deadline, "no KV event batch arrived"
            _run(engine, _request(f"r{n}", list(range(n * 100, n * 100 + 9))))
            n += 1
            if await sub.poll(50):
                topic, seq, payload = await sub.recv_multipart()
                assert topic == b"kv"
                received.append((int.from_bytes(seq, "big"), decode_batch(payload)))
        first_seen = received[0][0]
        assert first_seen <= n - 1
        replayed = await replay(replay_port)
        assert [s for s, _ in replayed] == list(range(len(replayed)))
        assert len(replayed) >= first_seen + 1
        assert replayed[first_seen][1] == received[0][1]
    finally:
        await publisher.close()
        sub.close(linger=0)


def test_the_batch_is_vllms_wire_shape() -> None:
    """An array `[ts, events, rank]`; events are maps tagged `type`, defaults left out."""
    engine = Engine(SMALL)
    _run(engine, _request("a", list(range(9))))
    raw = msgspec.msgpack.decode(
        ENCODER.encode(EventBatch(ts=1.0, events=_events(engine), data_parallel_rank=0))
    )
    assert raw[0] == 1.0 and raw[2] == 0
    stored = raw[1][0]
    assert stored["type"] == "BlockStored"
    assert set(stored) == {
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "group_idx",
    }


async def test_the_http_surface_reports_cached_tokens_and_vllms_metric_names() -> None:
    port = free_port()
    fleet = Fleet(time_scale=50.0)
    options = Options(model="sim", profile=SMALL, prompt_tokens_details=True, scale_out=True)
    server = SimServer(options, SimpleTokenizer(), fleet)
    await server.start("127.0.0.1", port)
    fleet.start()
    url = f"http://127.0.0.1:{port}"
    words = " ".join(f"w{i}" for i in range(12))
    body = {"model": "sim", "messages": [{"role": "user", "content": words}], "max_tokens": 3}
    try:
        async with aiohttp.ClientSession() as http:
            usages = []
            for _ in range(2):
                async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    usages.append((await resp.json())["usage"])
            stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with http.post(f"{url}/v1/chat/completions", json=stream) as resp:
                lines = [line async for line in resp.content if line.startswith(b"data: ")]
            async with http.post(f"{url}/v1/chat/completions", json={**body, "model": "x"}) as r:
                assert r.status == 404
            async with http.post(f"{url}/v1/chat/completions/render", json=body) as resp:
                rendered = await resp.json()
            async with http.get(f"{url}/metrics") as resp:
                page = await resp.text()
    finally:
        await fleet.stop()
        await server.stop()
    # "user: w0 .. w11" then "assistant:": 14 tokens, 3 full blocks of 4, all cached next time.
    assert [u["prompt_tokens"] for u in usages] == [14, 14]
    assert rendered["token_ids"] == SimpleTokenizer().chat_prompt(body["messages"])
    assert rendered["sampling_params"]["max_tokens"] == 3 and rendered["features"] is None
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, 12]
    assert lines[-1] == b"data: [DONE]\n"
    assert orjson.loads(lines[-2][6:])["usage"]["completion_tokens"] == 3
    assert len(lines) == 1 + 3 + 1 + 1  # role, 3 tokens, usage, [DONE]
    labels = {
        sample.name: set(sample.labels) - {"le", "finished_reason"}
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
    ):
        assert labels.get(name) == {"engine", "model_name"}, name
    assert 'vllm:prefix_cache_hits_total{engine="0",model_name="sim"} 24.0' in page


async def test_a_reset_fleet_tells_subscribers_its_caches_are_empty() -> None:
    replay_port = free_port()
    config = KVEventsConfig(
        enable_kv_cache_events=True,
        endpoint=f"tcp://127.0.0.1:{free_port()}",
        replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
        topic="kv",
    )
    fleet = Fleet()
    server = SimServer(
        Options(model="sim", profile=SMALL, kv_events=config), SimpleTokenizer(), fleet
    )
    await server.start("127.0.0.1", free_port())
    try:
        fleet.restart(2.0)
        replayed = await replay(replay_port)
    finally:
        await server.stop()
    assert [(seq, batch.events) for seq, batch in replayed] == [(0, [AllBlocksCleared()])]


def test_a_star_endpoint_is_bound_on_the_servers_host_only() -> None:
    assert on_host("tcp://*:5557", "127.0.0.1") == "tcp://127.0.0.1:5557"
    assert on_host("tcp://10.0.0.1:5557", "127.0.0.1") == "tcp://10.0.0.1:5557"


def test_the_chat_template_beside_the_tokenizer_config_is_the_one_rendered(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    )
    tokenizer = HfTokenizer(tmp_path)
    ids = tokenizer.chat_prompt([{"role": "user", "content": "fox"}])
    assert "".join(map(tokenizer.decode_one, ids)) == "[fox]"


def test_trace_blocks_are_512_tiny_model_tokens_and_shared_blocks_shared_tokens(
    tmp_path: Path,
) -> None:
    """The benchmark's text under the e2e tiny model's tokenizer and chat template: a block is
    512 tokens, and two prompts that lead with the same k block ids lead with the same
    template prefix and k x 512 tokens."""
    write_tokenizer(tmp_path)
    tokenizer, texts = HfTokenizer(tmp_path), Texts.for_tokenizer(tmp_path)
    assert len(tokenizer.encode(" " + texts.block(7))) == BLOCK_TOKENS

    def prompt(ids: list[int], length: int) -> list[int]:
        return tokenizer.chat_prompt([{"role": "user", "content": texts.trace_prompt(ids, length)}])

    # "user: <content>\nassistant: ": the content's first word starts a token of its own.
    head, tail = len(tokenizer.encode("user:")), len(tokenizer.encode("\nassistant: "))
    one, other = prompt([1, 2, 3], 3 * 512), prompt([1, 2, 9, 4], 3 * 512 + 100)
    assert len(one) == head + 3 * BLOCK_TOKENS + tail
    assert len(other) == head + 3 * BLOCK_TOKENS + 100 + tail  # the last block cut to 100
    shared = head + 2 * BLOCK_TOKENS
    assert one[:shared] == other[:shared]
    assert one[shared : shared + BLOCK_TOKENS] != other[shared : shared + BLOCK_TOKENS]


async def test_prompts_tokenized_by_cached_pieces_get_the_ids_of_the_whole_text(
    tmp_path: Path,
) -> None:
    """The tiny model's tokenizer takes the piece-by-piece path, and the ids are the whole
    text's for prose with punctuation, digits, runs of spaces and newlines, non-ASCII letters
    and contractions, whether its pieces were cached or not; the pieces are cut where a piece
    can start a word only."""
    write_tokenizer(tmp_path)
    from tokenizers import Tokenizer as Fast

    fast = Fast.from_file(str(tmp_path / "tokenizer.json"))
    assert cuts_before_words(orjson.loads((tmp_path / "tokenizer.json").read_bytes()))
    rng = random.Random(3)
    words = ["fox", "it's", "42", "x9", "  ", "\n", "\n\n", "déjà", "a.b", "(q)", "—", "Ünï", "7%"]
    texts = [" ".join(rng.choices(words, k=n)) for n in (5, 900, 3000, 3000)]
    texts.append(texts[2] + " tail words")  # leads with a seen text: its pieces come cached
    tokenizer = HfTokenizer(tmp_path)
    for i, text in enumerate(texts):
        whole = fast.encode(f"user: {text}\nassistant: ", add_special_tokens=False).ids
        messages = [{"role": "user", "content": text}]
        ids = (
            tokenizer.chat_prompt(messages)
            if i % 2
            else await tokenizer.chat_prompt_async(messages)
        )
        assert ids == whole
        cut = list(pieces(text, 64))
        assert "".join(cut) == text
        assert all(p[0] == " " and p[1].isalpha() and not q[-1].isspace() for q, p in pairwise(cut))
    assert len(list(pieces(texts[2]))) > 1


async def test_render_is_refused_without_scale_out_as_vllm_refuses_it() -> None:
    port = free_port()
    fleet = Fleet()
    server = SimServer(Options(model="sim", profile=SMALL), SimpleTokenizer(), fleet)
    await server.start("127.0.0.1", port)
    body = {"model": "sim", "messages": [{"role": "user", "content": "w"}]}
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/v1/chat/completions/render"
            async with http.post(url, json=body) as resp:
                status, error = resp.status, (await resp.json())["error"]
    finally:
        await server.stop()
    assert (status, error["type"], error["code"]) == (403, "PermissionDeniedError", 403)
