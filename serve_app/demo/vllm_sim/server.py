"""Simulated vLLM servers on one clock: each its engine, HTTP surface and KV events.

The fleet's clock runs `time_scale` times faster than the wall's. One step loop serves every
server of the process: it sleeps until the first step in flight ends (at least `tick_s` of wall
time, so a busy fleet costs one wake-up per tick, not one per step), then runs every step due
by now on each server. Steps are computed at their exact simulated times whatever the loop's
delay; what a late loop distorts is when tokens reach clients and when arrivals are stamped.
So its lag, how late its timer fired (in simulated seconds, `GET /sim/stats`), says whether the
figures are the profile's: a loop that falls behind is a host too slow for the fleet x load.
A request arrives at the engine once rendered and tokenized (what is long, off the loop: see
tokens.py); the wall time that takes is simulated time too, so each record keeps its intake
(receipt to the engine, simulated): a large one means arrivals came later than sent, the other
way a host can be too slow.

Served as vLLM serves them: `POST /v1/chat/completions` and `/v1/completions` (unary and SSE,
usage with `prompt_tokens_details.cached_tokens` under `--enable-prompt-tokens-details`), their
`/render` (the prompt's token ids, with `--enable-scale-out`), `GET /v1/models`, `/health`,
`/ping`, `/version`, and `/metrics` under vLLM's names and labels.
Not vLLM's, for the fleet benchmark: `GET /sim/stats` (each finished request's timings on the
simulated clock, the loop's lag; `?reset=1` drops them) and `POST /sim/reset` (`{"time_scale":
k}`: every server of the process starts afresh, empty caches and a new clock; refused with 409
while any request is in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
import uuid
from array import array
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.demo.vllm_sim.engine import Engine, Request
from serve_app.demo.vllm_sim.profiles import Profile
from serve_app.demo.vllm_sim.publisher import KVEventsConfig, ZmqPublisher
from serve_app.routing.kv.events import AllBlocksCleared, Event
from serve_app.routing.kv.tokens import Tokenizer

# vLLM's buckets (vllm/v1/metrics/buckets.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
TTFT_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
ITL_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
E2E_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Options(BaseModel):
    """How one server is set up (the CLI's flags)."""

    model_config = ConfigDict(frozen=True)

    model: str
    profile: Profile
    prompt_tokens_details: bool = False
    default_max_tokens: int = 16  # no EOS here: a request without max_tokens stops at this
    scale_out: bool = False  # vLLM's --enable-scale-out: the `/render` routes answer (else 403)
    kv_events: KVEventsConfig = KVEventsConfig()


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class ChatBody(_Body):
    messages: list[dict[str, Any]]


class CompletionBody(_Body):
    prompt: str


SCALE_OUT_DISABLED = (
    "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out to enable them."
)
# The fields of vLLM's render answer (GenerateRequest) that a text prompt leaves empty.
RENDER_NONE_FIELDS = (
    "token_offsets",
    "features",
    "content_parts",
    "reasoning_ended",
    "reasoning_parser_kwargs",
    "return_token_ids",
    "stream_options",
    "cache_salt",
    "kv_transfer_params",
    "ec_transfer_params",
)


def _error(status: int, type_: str, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())


class Fleet:
    """The servers of one process, their clock and their step loop."""

    def __init__(self, time_scale: float = 1.0, tick_s: float = 0.001) -> None:
        self.servers: list[SimServer] = []
        self.tick_s = tick_s
        self.lag = array("d")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.restart(time_scale)

    def restart(self, time_scale: float) -> None:
        self.scale = time_scale
        self._t0 = time.monotonic()
        self.lag = array("d")
        for server in self.servers:
            server.reset()

    def now(self) -> float:
        """The simulated clock, in seconds since the fleet (re)started."""
        return (time.monotonic() - self._t0) * self.scale

    def wake(self) -> None:
        self._wake.set()

    def idle(self) -> bool:
        return all(not s.engine.running and not s.engine.waiting for s in self.servers)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._step_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self.now()
            due = None
            for server in self.servers:
                server.engine.advance(now)
                end = server.engine.next_event()
                if end is not None and (due is None or end < due):
                    due = end
            self._wake.clear()
            timer = None
            if due is not None:
                delay = max(self.tick_s, (due - now) / self.scale)
                timer = loop.call_later(delay, self._fired, time.monotonic() + delay)
            await self._wake.wait()
            if timer is not None:
                timer.cancel()

    def _fired(self, planned: float) -> None:
        self.lag.append(max(0.0, time.monotonic() - planned) * self.scale)
        self._wake.set()


class SimServer:
    def __init__(self, options: Options, tokenizer: Tokenizer, fleet: Fleet) -> None:
        self.options = options
        self._tokenizer = tokenizer
        self._fleet = fleet
        self._index = len(fleet.servers)
        fleet.servers.append(self)
        self._publisher: ZmqPublisher | None = None
        self.reset()
        self._labels = {"model_name": options.model, "engine": "0"}
        self._registry = CollectorRegistry(auto_describe=True)
        self._registry.register(self)
        hist = {"labelnames": list(self._labels), "registry": self._registry}
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            buckets=TTFT_BUCKETS,
            **hist,
        ).labels(**self._labels)
        self._itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            buckets=ITL_BUCKETS,
            **hist,
        ).labels(**self._labels)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            buckets=E2E_BUCKETS,
            **hist,
        ).labels(**self._labels)
        self._runner: web.AppRunner | None = None

    def reset(self) -> None:
        """An empty engine (cache, queues, counters) and no records; subscribers are told the
        cache was emptied, as vLLM's prefix-cache reset tells them."""
        self._publish([AllBlocksCleared()])
        self.engine = Engine(
            self.options.profile,
            events=self.options.kv_events.enabled,
            on_events=self._publish,
            on_finished=self._finished,
        )
        self._records: list[dict[str, Any]] = []

    async def start(self, host: str, port: int) -> None:
        if self.options.kv_events.enabled:
            self._publisher = ZmqPublisher(self.options.kv_events, self._index, host)
        app = web.Application(client_max_size=64 << 20)
        for path, chat in (("/v1/chat/completions", True), ("/v1/completions", False)):
            app.router.add_post(path, functools.partial(self._answer, chat=chat))
            app.router.add_post(f"{path}/render", functools.partial(self._render, chat=chat))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/sim/stats", self._stats)
        app.router.add_post("/sim/reset", self._reset)
        for path in ("/health", "/ping"):
            app.router.add_get(path, _ok)
        app.router.add_get("/version", _version)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._publisher is not None:
            await self._publisher.close()

    def _publish(self, events: list[Event]) -> None:
        if self._publisher is not None:
            self._publisher.publish(events)

    # -- requests

    async def _prompt(
        self, http: web.Request, chat: bool
    ) -> tuple[_Body, list[int], int, float] | web.Response:
        """The request's body, its prompt rendered and tokenized, its max_tokens and when it
        came (simulated); or the error vLLM answers (a bad body, another model, past the
        context length)."""
        received = self._fleet.now()
        try:
            body = (ChatBody if chat else CompletionBody).model_validate_json(await http.read())
        except ValidationError as e:
            return _error(400, "BadRequestError", str(e))
        if body.model != self.options.model:
            message = f"The model `{body.model}` does not exist."
            return _error(404, "NotFoundError", message, "model")
        if isinstance(body, ChatBody):
            prompt = await self._tokenizer.chat_prompt_async(body.messages)
        else:
            prompt = self._tokenizer.encode(body.prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens
        max_tokens = max_tokens or self.options.default_max_tokens
        limit = self.options.profile.max_model_len
        if len(prompt) + max_tokens > limit:
            return _error(
                400,
                "BadRequestError",
                f"This model's maximum context length is {limit} tokens. "
                f"However, you requested {len(prompt) + max_tokens} tokens "
                f"({len(prompt)} in the messages, {max_tokens} in the completion).",
                "max_tokens",
            )
        return body, prompt, max_tokens, received

    def _submit(self, prompt: list[int], max_tokens: int) -> Request:
        vocab = self._tokenizer.vocab_size
        seed = hash(tuple(prompt[-8:])) % vocab
        plan = [(seed + 7919 * i) % vocab for i in range(max_tokens)]
        request = Request(uuid.uuid4().hex, prompt, plan)
        self.engine.advance(self._fleet.now())
        self.engine.add(request)
        self._fleet.wake()
        return request

    async def _render(self, http: web.Request, chat: bool) -> web.Response:
        """vLLM's `/v1/chat/completions/render` and `/v1/completions/render`: the prompt's token
        ids as the engine would get them (a `GenerateRequest`), nothing run; vllm-router's
        `kv_aware` asks for them to look its prefix up in the KV events' index. Refused, as
        vLLM 0.32 refuses it, unless the server runs with `--enable-scale-out`."""
        if not self.options.scale_out:
            return _error(403, "PermissionDeniedError", SCALE_OUT_DISABLED)
        if isinstance(parsed := await self._prompt(http, chat), web.Response):
            return parsed
        body, prompt, max_tokens, _ = parsed
        sampling = {"stop": [], "stop_token_ids": [], "max_tokens": max_tokens, "bad_words": []}
        sampling["skip_reading_prefix_cache"] = False
        rendered: dict[str, Any] = dict.fromkeys(RENDER_NONE_FIELDS)
        rendered.update(request_id=uuid.uuid4().hex, token_ids=prompt, model=body.model)
        rendered.update(sampling_params=sampling, output_mode="tokens", stream=False, priority=0)
        return web.Response(body=orjson.dumps(rendered), content_type="application/json")

    async def _answer(self, http: web.Request, chat: bool) -> web.StreamResponse:
        if isinstance(parsed := await self._prompt(http, chat), web.Response):
            return parsed
        body, prompt, max_tokens, received = parsed
        request = self._submit(prompt, max_tokens)
        request.intake = self._fleet.now() - received
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request.request_id}", "model": body.model}
        head["created"] = int(time.time())
        try:
            if body.stream:
                return await self._stream(http, body, request, head, chat)
            done = asyncio.get_running_loop().create_future()
            request.on_finish = done.set_result
            await done
            text = "".join(map(self._tokenizer.decode_one, request.all_token_ids[len(prompt) :]))
            choice: dict[str, Any] = {"index": 0, "finish_reason": request.finish_reason}
            choice["logprobs"] = None
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            answer = {**head, "object": "chat.completion" if chat else "text_completion"}
            answer.update(choices=[choice], usage=self._usage(request))
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        finally:
            self.engine.advance(self._fleet.now())
            self.engine.abort(request)  # the client went away; a no-op once it finished

    async def _stream(
        self, http: web.Request, body: _Body, request: Request, head: dict[str, Any], chat: bool
    ) -> web.StreamResponse:
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        sent = len(request.prompt_token_ids)

        def new_tokens(r: Request) -> None:
            nonlocal sent
            for token in r.all_token_ids[sent:]:
                tokens.put_nowait(token)
            sent = len(r.all_token_ids)
            if r.finished_at is not None:
                tokens.put_nowait(None)

        request.on_token = request.on_finish = new_tokens
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(http)
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = orjson.dumps({**head, "choices": choices, **extra})
            await response.write(b"data: " + chunk + b"\n\n")

        if chat:
            delta = {"role": "assistant", "content": ""}
            await send([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
        while (token := await tokens.get()) is not None:
            piece = self._tokenizer.decode_one(token)
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": None}
            choice.update({"delta": {"content": piece}} if chat else {"text": piece})
            if request.finished_at is not None and tokens.qsize() == 1:  # only the end left
                choice["finish_reason"] = request.finish_reason
            await send([choice])
        if (body.stream_options or {}).get("include_usage"):
            await send([], usage=self._usage(request))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _usage(self, request: Request) -> dict[str, Any]:
        prompt, output = len(request.prompt_token_ids), request.num_output
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "total_tokens": prompt + output,
            "completion_tokens": output,
        }
        if self.options.prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": max(0, request.num_cached_tokens)}
        return usage

    def _finished(self, request: Request) -> None:
        times = request.token_times
        if request.finish_reason != "length" or not times:
            return
        ttft = times[0] - request.arrival
        e2e = times[-1] - request.arrival
        gaps = [b - a for a, b in itertools.pairwise(times)]
        self._ttft.observe(ttft)
        self._e2e.observe(e2e)
        for gap in gaps:
            self._itl.observe(gap)
        self._records.append(
            {
                "intake": round(request.intake, 6),
                "ttft": round(ttft, 6),
                "e2e": round(e2e, 6),
                "itl_max": round(max(gaps, default=0.0), 6),
                "itl": [round(g, 5) for g in gaps],
                "prompt_tokens": len(request.prompt_token_ids),
                "cached_tokens": request.num_cached_tokens,
                "output_tokens": request.num_output,
                "preemptions": request.num_preemptions,
            }
        )

    # -- the rest of the surface

    async def _models(self, _: web.Request) -> web.Response:
        model = {
            "id": self.options.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.options.model,
            "parent": None,
            "max_model_len": self.options.profile.max_model_len,
            "permission": [],
        }
        return web.json_response({"object": "list", "data": [model]})

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The engine's gauges and counters, read at scrape time (prometheus_client collector)."""
        engine, counters, labels = self.engine, self.engine.counters, self._labels

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            family.add_metric(list(labels.values()), value)
            return family

        def counter(name: str, doc: str, value: float, **extra: str) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=[*labels, *extra])
            family.add_metric([*labels.values(), *extra.values()], value)
            return family

        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            len(engine.running),
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            len(engine.waiting),
        )
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            engine.cache.usage,
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            counters.prefix_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            counters.prefix_hits,
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            counters.preemptions,
        )
        yield counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", counters.prompt_tokens
        )
        yield counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local prefix cache).",
            counters.cached_prompt_tokens,
        )
        yield counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            counters.generation_tokens,
        )
        yield counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            counters.finished,
            finished_reason="length",
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._registry), content_type="text/plain")

    async def _stats(self, http: web.Request) -> web.Response:
        lag = sorted(self._fleet.lag)
        stats = {
            "now": self._fleet.now(),
            "time_scale": self._fleet.scale,
            "tick_s": self._fleet.tick_s,
            "steps": self.engine.counters.steps,
            "lag_s": {
                "wakeups": len(lag),
                "p50": lag[len(lag) // 2] if lag else 0.0,
                "p99": lag[int(len(lag) * 0.99)] if lag else 0.0,
                "max": lag[-1] if lag else 0.0,
            },
            "requests": self._records,
        }
        if http.query.get("reset"):
            self._records = []
        return web.Response(body=orjson.dumps(stats), content_type="application/json")

    async def _reset(self, http: web.Request) -> web.Response:
        try:
            body = _Reset.model_validate_json(await http.read() or b"{}")
        except ValidationError as e:
            return _error(400, "BadRequestError", str(e))
        if not self._fleet.idle():
            return _error(409, "Conflict", "requests are in flight")
        self._fleet.restart(body.time_scale or self._fleet.scale)
        return web.json_response({"time_scale": self._fleet.scale})


class _Reset(BaseModel):
    time_scale: float | None = Field(None, gt=0)


async def _ok(_: web.Request) -> web.Response:
    return web.Response(status=200)


async def _version(_: web.Request) -> web.Response:
    return web.json_response({"version": "0.32.0"})
