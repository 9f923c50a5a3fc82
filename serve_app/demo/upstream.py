"""A small upstream that speaks the OpenAI and Ollama wire formats, for `make run`, tests, bench.

It answers `"<name>: <last user text>"`, split into `chunks` pieces when streaming, and has knobs
for latency, pacing, error statuses, dropped connections and hangs. It records every request so
tests can check what the router sent. Run alone: `python -m serve_app.demo.upstream --port 8101`.

Where it imitates vLLM (error bodies, the runtime LoRA API, `/v1/models`, the Responses and
Anthropic Messages endpoints vLLM serves natively) it is held to a real
vLLM by `tests/e2e/test_conformance.py`; its Responses and Messages answers are vLLM's own,
recorded in serve_app/demo/recordings/, with its text and counts filled in. Unlike vLLM it
serves any model name unless `served` names its models, so that one demo process can stand in
for many models.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import functools
import gzip
import hashlib
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import web

from serve_app.dialects.base import now_iso

Drop = Literal["before_headers", "mid_stream"]
# The tokens a chat template adds around a prompt: a one-word prompt counts 5.
PROMPT_OVERHEAD = 4
# A request's parsed body, for the knobs that depend on it.
_BODY = web.RequestKey("body", dict)
_NOT_INFERENCE = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/api/pull"})


@dataclass
class Knobs:
    latency_s: float = 0.0  # before the response headers
    chunk_delay_s: float = 0.0  # between streamed chunks
    chunks: int = 4  # content pieces in a streamed answer
    fail_status: int | None = None  # answer with this status...
    fail_times: int | None = None  # ...for this many calls (None: every call)
    retry_after: str | None = None  # Retry-After header on failures
    drop: Drop | None = None
    drop_after_chunks: int = 1
    hang: bool = False  # never answer (until stopped)
    hold: bool = False  # answer once release() is called (a test keeps calls open at will)
    hold_mid_stream: bool = False  # stream the first chunk, the rest once release() is called
    tool_call: bool = True  # answer a request with tools by calling its first tool
    embedding_dim: int = 8
    lora_fail_status: int | None = None  # /v1/load_lora_adapter answers with this status
    lora_load_s: float = 0.0  # time a LoRA load takes
    pull_steps: int = 4  # progress lines of an /api/pull download
    pull_step_s: float = 0.0  # time between them
    pull_fail_after: int | None = None  # an /api/pull that breaks after this many steps
    tags_status: int | None = None  # /api/tags answers with this status
    # What its vLLM /metrics page says besides the requests it is answering (running).
    waiting: int = 0
    kv_usage: float = 0.0
    # Keep the Responses it makes, as vLLM with VLLM_ENABLE_RESPONSES_API_STORE=1: a
    # previous_response_id it made is continued; one it did not make is a 404.
    responses_store: bool = False
    # A hostile upstream (make chaos). `huge`: instead of its answer, a unary body ("body") or
    # a stream's event number `bad_at` ("line", no newline ever) of `huge_bytes` bytes, made as
    # it is sent (never held), its Content-Length declared with `huge_declared`. `garbage`: a
    # stream's event number `bad_at` replaced by these bytes. `cut`: streams end without their
    # last event. `gzip`: inference answers gzip-compressed, whatever the caller accepts.
    # `content_type`: what inference answers say they are, whatever they are.
    huge: Literal["body", "line"] | None = None
    huge_bytes: int = 1 << 30
    huge_declared: bool = False
    bad_at: int = 0
    garbage: bytes | None = None
    cut: bool = False
    gzip: bool = False
    content_type: str | None = None


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeUpstream:
    name: str
    knobs: Knobs = field(default_factory=Knobs)
    record: bool = True  # keep request history (off for long-running servers)
    requests: list[Recorded] = field(default_factory=list)
    calls: int = 0
    disconnects: int = 0
    # The model names it serves besides its adapters, as vLLM's --served-model-name; None: any.
    served: frozenset[str] | None = None
    # LoRA adapters loaded through vLLM's runtime API: name -> path. A start forgets them, as a
    # restarted vLLM does.
    loras: dict[str, str] = field(default_factory=dict)
    # Ollama models on disk (/api/tags); the upstream's own name is always there.
    pulled: set[str] = field(default_factory=set)
    # Inference requests being answered now, and the most there ever were at once.
    active: int = 0
    peak: int = 0
    # Its Responses store (knobs.responses_store): id -> the conversation's items so far.
    responses: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stopping = asyncio.Event()
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    def _app(self) -> web.Application:
        """A new application per start: one is bound to the loop it first ran on."""
        app = web.Application(
            client_max_size=64 * 1024 * 1024, middlewares=[self._concurrency, self._disguised]
        )
        r = app.router
        r.add_post("/v1/chat/completions", self._openai)
        r.add_post("/v1/completions", self._openai)
        r.add_post("/v1/embeddings", self._openai_embeddings)
        r.add_post("/v1/responses", self._vllm_dialect)
        r.add_post("/v1/messages", self._vllm_dialect)
        r.add_post("/v1/messages/count_tokens", self._vllm_dialect)
        r.add_get("/v1/models", self._openai_models)
        r.add_get("/health", self._health)
        r.add_post("/v1/load_lora_adapter", self._load_lora)
        r.add_post("/v1/unload_lora_adapter", self._unload_lora)
        r.add_post("/api/chat", self._ollama)
        r.add_post("/api/generate", self._ollama)
        r.add_post("/api/embed", self._ollama_embed)
        r.add_get("/api/tags", self._ollama_tags)
        r.add_get("/api/ps", self._ollama_ps)
        r.add_get("/metrics", self._vllm_metrics)
        r.add_post("/api/pull", self._ollama_pull)
        return app

    @web.middleware
    async def _concurrency(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "POST" or request.path in _NOT_INFERENCE:
            return await handler(request)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await handler(request)
        finally:
            self.active -= 1

    @web.middleware
    async def _disguised(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """A unary inference answer gzip-compressed (knobs.gzip), of another content type
        (knobs.content_type); streams do both as they are written."""
        resp = await handler(request)
        k = self.knobs
        inference = request.method == "POST" and request.path not in _NOT_INFERENCE
        if not inference or not isinstance(resp, web.Response):
            return resp
        if k.gzip:
            assert isinstance(resp.body, bytes)
            resp.body = gzip.compress(resp.body)
            resp.headers["content-encoding"] = "gzip"
        if k.content_type is not None:
            resp.content_type = k.content_type
        return resp

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        """A unary answer of `huge_bytes`: one JSON string never closed, made as it is sent."""
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        if self.knobs.huge_declared:
            resp.content_length = self.knobs.huge_bytes
        await resp.prepare(request)
        await self._write_huge(resp, b'{"id": "')
        return resp

    async def _write_huge(self, resp: web.StreamResponse, head: bytes) -> None:
        """`head`, then letters up to `huge_bytes` in all, no newline; until the caller hangs
        up (a disconnect)."""
        piece = b"a" * 65536
        sent = len(head)
        try:
            await resp.write(head)
            while sent < self.knobs.huge_bytes:
                await resp.write(piece[: self.knobs.huge_bytes - sent])
                sent += len(piece)
        except ConnectionError:
            self.disconnects += 1

    async def _held(self, request: web.Request) -> bool:
        """Until release() (True) or the caller hangs up (False): aiohttp does not cancel a
        handler whose client went away, so the connection is looked at between waits."""
        released = self._released
        while not released.is_set():
            if request.transport is None or request.transport.is_closing():
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(released.wait(), 0.05)
        return True

    def release(self) -> None:
        """Answer the calls held by the `hold` knobs, and hold no more (from the test's thread).
        A hold set again at once may not hold: the release runs on the upstream's loop soon."""
        assert self._loop is not None, "release() is for an upstream started in a thread"
        self.knobs.hold = self.knobs.hold_mid_stream = False
        self._loop.call_soon_threadsafe(self._release_held)

    def _release_held(self) -> None:
        self._released.set()  # wakes those waiting on it; later holds wait on a new one
        self._released = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path: str | None = None) -> int:
        return sum(1 for r in self.requests if path is None or r.path == path)

    # ---- life cycle -------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._stopping = asyncio.Event()
        self._released = asyncio.Event()  # of this start's loop
        self.loras = {}
        # Stopping (a chaos kill, test teardown) does not wait for slow handlers.
        self._runner = web.AppRunner(
            self._app(), access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start_in_thread(self, port: int = 0) -> int:
        """Serve from a private event loop on a daemon thread (for tests and the benchmark)."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start(port=port))
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, name=f"upstream-{self.name}", daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self.port

    def stop_thread(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop = None

    # ---- shared behaviour -------------------------------------------------------------------
    async def _record(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        body = orjson.loads(raw) if raw else {}
        request[_BODY] = body
        self.calls += 1
        if self.record:
            self.requests.append(Recorded(request.path, dict(request.headers), body))
        return body

    async def _misbehave(
        self, request: web.Request, ollama: bool = False
    ) -> web.StreamResponse | None:
        """Latency, hangs, failures and early drops; None when the call should be answered.
        Failures are in Ollama's shape for its handlers (`ollama`), else in OpenAI's."""
        k = self.knobs
        if k.hang:
            await self._stopping.wait()
        if k.hold and not await self._held(request):
            self.disconnects += 1  # the caller hung up while held
            return web.Response()
        if k.latency_s:
            await asyncio.sleep(k.latency_s)
        if k.drop == "before_headers":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if k.fail_status is not None and (k.fail_times is None or k.fail_times > 0):
            if k.fail_times is not None:
                k.fail_times -= 1
            headers = {"retry-after": k.retry_after} if k.retry_after else None
            if ollama:
                message = f"{self.name} failing on purpose"
                return _ollama_error(k.fail_status, message, headers)
            return web.json_response(
                {
                    "error": {
                        "message": f"{self.name} failing on purpose",
                        "type": "test",
                        "code": k.fail_status,
                    }
                },
                status=k.fail_status,
                headers=headers,
            )
        if k.huge == "body" and not request[_BODY].get("stream", ollama):
            return await self._huge(request)
        return None

    def _reply_text(self, body: dict[str, Any]) -> str:
        messages = body.get("messages")
        if messages:
            users = [m for m in messages if m.get("role") == "user"] or messages
            content = users[-1].get("content") or ""
            if isinstance(content, list):
                content = "".join(p.get("text") or "" for p in content)
        else:
            content = body.get("prompt") or ""
            if isinstance(content, list):
                content = str(content[0]) if content else ""
        return f"{self.name}: {content}"

    def _pieces(self, text: str) -> list[str]:
        n = max(1, self.knobs.chunks)
        size = max(1, -(-len(text) // n))
        return [text[i : i + size] for i in range(0, len(text), size)] or [""]

    async def _stream_lines(
        self, request: web.Request, content_type: str, lines: list[bytes]
    ) -> web.StreamResponse:
        k = self.knobs
        resp = web.StreamResponse(headers={"content-type": k.content_type or content_type})
        packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS) if k.gzip else None
        if packer is not None:
            resp.headers["content-encoding"] = "gzip"
        lines = lines[:-1] if k.cut else lines
        if k.garbage is not None:
            lines[k.bad_at] = k.garbage
        await resp.prepare(request)
        try:
            for i, line in enumerate(lines):
                if self.knobs.drop == "mid_stream" and i == self.knobs.drop_after_chunks:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if k.huge == "line" and i == k.bad_at:
                    ndjson = content_type == "application/x-ndjson"
                    await self._write_huge(resp, b'{"response": "' if ndjson else b'data: {"x": "')
                    return resp
                if packer is not None:
                    line = packer.compress(line) + packer.flush(zlib.Z_SYNC_FLUSH)
                await resp.write(line)
                if i == 0 and self.knobs.hold_mid_stream and not await self._held(request):
                    self.disconnects += 1  # the caller hung up while held
                    return resp
                if self.knobs.chunk_delay_s:
                    await asyncio.sleep(self.knobs.chunk_delay_s)
            if packer is not None:
                await resp.write(packer.flush())
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.disconnects += 1  # the client (the router) went away mid-stream
            raise
        return resp

    # ---- OpenAI -----------------------------------------------------------------------------
    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        bad = await self._misbehave(request)
        if bad is not None:
            return bad
        chat = request.path.endswith("chat/completions")
        text = self._reply_text(body)
        rid, created, model = f"{self.name}-{self.calls}", int(time.time()), body.get("model")
        if not self._serves(model):
            return _vllm_error(
                404, "NotFoundError", f"The model `{model}` does not exist.", param="model"
            )
        prompt = prompt_tokens(body)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(self._pieces(text)),
            "total_tokens": prompt + len(self._pieces(text)),
        }
        named = _named_call(body) if chat else None
        if not body.get("stream"):
            message = (
                {"role": "assistant", "content": "", "tool_calls": [named]}
                if named
                else {"role": "assistant", "content": text}
            )
            choice = (
                {"index": 0, "message": message, "finish_reason": "stop"}
                if chat
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
            )
            return web.json_response(
                {
                    "id": rid,
                    "created": created,
                    "model": model,
                    "object": "chat.completion" if chat else "text_completion",
                    "choices": [choice],
                    "usage": usage,
                }
            )
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> bytes:
            doc = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice] if choice else [],
                **(extra or {}),
            }
            return b"data: " + orjson.dumps(doc) + b"\n\n"

        lines = []
        if chat:  # as vLLM: the role first, with empty content
            role = {"role": "assistant", "content": ""}
            lines.append(event({"index": 0, "delta": role, "finish_reason": None}))
        if named:  # the call in one delta (vLLM spreads its arguments over several)
            delta = {"tool_calls": [{**named, "index": 0}]}
            lines.append(event({"index": 0, "delta": delta, "finish_reason": None}))
        for piece in [] if named else self._pieces(text):
            if chat:
                delta = {"content": piece}
                lines.append(event({"index": 0, "delta": delta, "finish_reason": None}))
            else:
                lines.append(
                    event({"index": 0, "text": piece, "logprobs": None, "finish_reason": None})
                )
        end = {"index": 0, "delta": {}} if chat else {"index": 0, "text": "", "logprobs": None}
        lines.append(event({**end, "finish_reason": "stop"}))
        if (body.get("stream_options") or {}).get("include_usage"):
            lines.append(event(None, {"usage": usage}))
        lines.append(b"data: [DONE]\n\n")
        return await self._stream_lines(request, "text/event-stream", lines)

    async def _vllm_dialect(self, request: web.Request) -> web.StreamResponse:
        """Responses and Anthropic Messages, which vLLM serves natively: a real vLLM's recorded
        answers (serve_app/demo/recordings/, by tests/e2e/record_wire.py) with the demo's text, ids,
        model and counts filled in, so that what passes through the router to the demo has
        vLLM's shape rather than the router's own idea of it."""
        body = await self._record(request)
        bad = await self._misbehave(request)
        if bad is not None:
            return bad
        stems = _DIALECT_RECORDINGS[request.path]
        model = body.get("model")
        if not self._serves(model):  # in Anthropic's shape on /v1/messages*, as vLLM
            status, error = _recorded_error(stems.error, f"The model `{model}` does not exist.")
            return web.json_response(error, status=status)
        messages = _dialect_messages(request.path, body)
        previous = body.get("previous_response_id") if request.path == "/v1/responses" else None
        if previous is not None:  # as vLLM: only what it stored itself
            if not self.knobs.responses_store or previous not in self.responses:
                return _vllm_error(
                    404,
                    "invalid_request_error",
                    f"Response with id '{previous}' not found.",
                    param="response_id",
                )
            messages = [*self.responses[previous], *messages]
        text = self._reply_text({"messages": messages})
        pieces = self._pieces(text)
        unary = _recorded(stems.unary)
        prompt = prompt_tokens({**body, "input": None, "messages": messages})
        fill = _Fill(text, str(model), prompt, len(pieces), body, unary["request"]["body"])
        if stems.stream is None:  # count_tokens: only the prompt's count
            return web.json_response(fill.usage(unary["body"]))
        keep = request.path == "/v1/responses" and self.knobs.responses_store
        keep = keep and body.get("store", True) is not False
        if not body.get("stream"):
            answer = fill.fill(unary["body"], _recorded_text(unary["body"]))
            if keep:
                self.responses[answer["id"]] = [*messages, *answer["output"]]
            return web.json_response(answer)
        events = _recorded_stream(stems.stream)
        recorded_text = "".join(_delta_text(data) for _, data in events if _is_delta(data))
        lines: list[tuple[str | None, dict[str, Any]]] = []
        deltas_done = False
        for name, data in events:
            if _is_delta(data):  # the recorded deltas, replaced by one per demo piece
                if not deltas_done:
                    lines += [(name, _with_delta(fill.fill(data, ""), p)) for p in pieces]
                deltas_done = True
                continue
            lines.append((name, fill.fill(data, recorded_text)))
        for i, (_, data) in enumerate(lines):
            if "sequence_number" in data:
                data["sequence_number"] = i
        final = lines[-1][1].get("response") if lines else None
        if keep and isinstance(final, dict):
            self.responses[final["id"]] = [*messages, *final["output"]]
        return await self._stream_lines(
            request,
            "text/event-stream; charset=utf-8",
            [_sse(name, data) for name, data in lines],
        )

    def _vector(self, text: str) -> list[float]:
        return [float((len(text) + i) % 7) for i in range(self.knobs.embedding_dim)]

    async def _openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        bad = await self._misbehave(request)
        if bad is not None:
            return bad
        inputs = body.get("input")
        items = (
            [inputs]
            if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int))
            else inputs
        )
        data = [
            {"object": "embedding", "index": i, "embedding": self._vector(str(x))}
            for i, x in enumerate(items or [])
        ]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )

    def _serves(self, model: object) -> bool:
        if model in self.loras:
            return True
        if self.served is not None:
            return model in self.served
        # Names with "@" are the router's LoRA names: like vLLM, refuse one not loaded.
        return not (isinstance(model, str) and "@" in model)

    async def _health(self, request: web.Request) -> web.StreamResponse:
        """vLLM's liveness route (200, empty body): routers probe it before sending traffic."""
        return web.Response()

    async def _openai_models(self, request: web.Request) -> web.StreamResponse:
        def entry(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "demo",
                "root": root,
                "parent": parent,
            }

        bases = sorted(self.served or {self.name})
        loras = [entry(name, path, bases[0]) for name, path in self.loras.items()]
        data = [entry(name, name, None) for name in bases] + loras
        return web.json_response({"object": "list", "data": data})

    # ---- vLLM runtime LoRA API ----------------------------------------------------------------
    async def _load_lora(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if self.knobs.lora_load_s:
            await asyncio.sleep(self.knobs.lora_load_s)
        if self.knobs.lora_fail_status is not None:
            return _vllm_error(self.knobs.lora_fail_status, "BadRequestError", "load failed")
        for key in ("lora_name", "lora_path"):
            if not isinstance(body.get(key), str):
                return _vllm_error(400, "Bad Request", f"body.{key}: Field required", f"body.{key}")
        if name in self.loras and body.get("load_inplace") is not True:
            return _vllm_error(
                400,
                "InvalidUserInput",
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True.",
            )
        if not (Path(path) / "adapter_config.json").is_file():
            return _vllm_error(
                404, "NotFoundError", f"Loading lora {name} failed: No adapter found for {path}"
            )
        self.loras[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        name = body.get("lora_name")
        if self.loras.pop(name, None) is None:
            return _vllm_error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # ---- Ollama -----------------------------------------------------------------------------
    # Held to a real Ollama's wire format by tests/test_ollama_wire.py (tests/wire/ollama_*.json).
    def _on_disk(self) -> list[str]:
        """Ollama's models on disk: its own name, `served` and what was pulled."""
        return [self.name, *sorted({*(self.served or ()), *self.pulled} - {self.name})]

    def _ollama_has(self, model: object) -> bool:
        """Whether Ollama would find `model` (`llama3` is `llama3:latest`). With `served` None it
        serves any name, as on the OpenAI side."""
        if self.served is None:
            return True
        return isinstance(model, str) and _tagged(model) in {_tagged(n) for n in self._on_disk()}

    async def _ollama(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic_ns()
        body = await self._record(request)
        bad = await self._misbehave(request, ollama=True)
        if bad is not None:
            return bad
        model = body.get("model")
        if not self._ollama_has(model):
            return _ollama_error(404, f"model '{model}' not found")
        chat = request.path == "/api/chat"
        text = self._reply_text(body)
        base = {"model": model, "created_at": now_iso()}
        tools = body.get("tools") if chat and self.knobs.tool_call else None
        calls = (
            [
                {
                    "id": f"call_{uuid.uuid4().hex[:8]}",
                    "function": {
                        "index": 0,
                        "name": tools[0]["function"]["name"],
                        "arguments": {"echo": text},
                    },
                }
            ]
            if tools
            else None
        )
        final = {
            **base,
            "done": True,
            "done_reason": "stop",
            **_ollama_metrics(started, prompt_tokens(body), len(self._pieces(text))),
        }
        if body.get("stream", True) is False:
            if chat:
                msg: dict[str, Any] = {"role": "assistant", "content": "" if calls else text}
                if calls:
                    msg["tool_calls"] = calls
                return web.json_response({**final, "message": msg})
            return web.json_response({**final, "response": text})
        lines = []
        for piece in [] if calls else self._pieces(text):
            part = (
                {"message": {"role": "assistant", "content": piece}}
                if chat
                else {"response": piece}
            )
            lines.append(orjson.dumps({**base, **part, "done": False}) + b"\n")
        if calls:
            lines.append(
                orjson.dumps(
                    {
                        **base,
                        "message": {"role": "assistant", "content": "", "tool_calls": calls},
                        "done": False,
                    }
                )
                + b"\n"
            )
        end = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
        lines.append(orjson.dumps({**final, **end}) + b"\n")
        return await self._stream_lines(request, "application/x-ndjson", lines)

    async def _ollama_embed(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic_ns()
        body = await self._record(request)
        bad = await self._misbehave(request, ollama=True)
        if bad is not None:
            return bad
        model = body.get("model")
        if not self._ollama_has(model):
            return _ollama_error(404, f"model '{model}' not found")
        inputs = body.get("input")
        items = ([inputs] if inputs else []) if isinstance(inputs, str) else inputs or []
        if not isinstance(items, list) or any(not isinstance(x, str) for x in items):
            return _ollama_error(400, "invalid input type")
        if not items:  # Ollama answers an empty input without the counts
            return web.json_response({"model": model, "embeddings": []})
        metrics = _ollama_metrics(started, len(items), 0)
        return web.json_response(
            {
                "model": model,
                "embeddings": [self._vector(x) for x in items],
                "total_duration": metrics["total_duration"],
                "load_duration": metrics["load_duration"],
                "prompt_eval_count": len(items),
            }
        )

    async def _ollama_tags(self, request: web.Request) -> web.StreamResponse:
        if self.knobs.tags_status is not None:
            return _ollama_error(self.knobs.tags_status, "tags failing")
        return web.json_response({"models": [_ollama_model(n) for n in self._on_disk()]})

    async def _ollama_ps(self, request: web.Request) -> web.StreamResponse:
        """The models in memory: as on disk (it loads nothing)."""
        expires = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
        running = {"expires_at": expires.replace("+00:00", "Z"), "context_length": 4096}
        models = []
        for name in self._on_disk():
            entry = _ollama_model(name)
            del entry["modified_at"]
            models.append(entry | running | {"size_vram": entry["size"]})
        return web.json_response({"models": models})

    async def _vllm_metrics(self, request: web.Request) -> web.StreamResponse:
        """vLLM's load gauges (names and labels as a real vLLM 0.32 writes them)."""
        labels = f'{{engine="0",model_name="{self.name}"}}'
        lines = []
        for name, kind, value in (
            ("vllm:num_requests_running", "gauge", self.active),
            ("vllm:num_requests_waiting", "gauge", self.knobs.waiting),
            ("vllm:kv_cache_usage_perc", "gauge", self.knobs.kv_usage),
        ):
            lines += [f"# HELP {name} {name}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _ollama_pull(self, request: web.Request) -> web.StreamResponse:
        """Ollama's streaming pull: NDJSON progress lines, then success (or an error line)."""
        body = await self._record(request)
        name = body.get("model") or body.get("name")
        k = self.knobs
        resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(orjson.dumps({"status": "pulling manifest"}) + b"\n")
        total = 1000 * k.pull_steps
        digest = "sha256:" + hashlib.sha256(str(name).encode()).hexdigest()
        for step in range(1, k.pull_steps + 1):
            if k.pull_step_s:
                await asyncio.sleep(k.pull_step_s)
            if k.pull_fail_after is not None and step > k.pull_fail_after:
                line = {"error": f"pull {name}: connection reset while downloading layer"}
                await resp.write(orjson.dumps(line) + b"\n")
                await resp.write_eof()
                return resp
            # As Ollama's download.go: "pulling " and the digest's first 12 hex digits.
            line = {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total}
            await resp.write(orjson.dumps({**line, "completed": 1000 * step}) + b"\n")
        for status in ("verifying sha256 digest", "writing manifest"):
            await resp.write(orjson.dumps({"status": status}) + b"\n")
        self.pulled.add(str(name))
        await resp.write(orjson.dumps({"status": "success"}) + b"\n")
        await resp.write_eof()
        return resp


def _named_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The call a `tool_choice` naming one of the request's functions gets (vLLM with a tool
    parser: content "", finish_reason "stop"), its arguments what the schema allows: each
    required property its enum's first value, else a value of its type."""
    choice = body.get("tool_choice")
    if not isinstance(choice, dict) or choice.get("type") != "function":
        return None
    name = (choice.get("function") or {}).get("name")
    functions = [t.get("function") or {} for t in body.get("tools") or [] if isinstance(t, dict)]
    tool = next((f for f in functions if f.get("name") == name), None)
    if tool is None:
        return None
    schema = tool.get("parameters") or {}
    properties = schema.get("properties") or {}
    arguments = {key: _example(properties.get(key) or {}) for key in schema.get("required") or []}
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex[:16]}",
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(arguments).decode()},
    }


_EXAMPLES = {"string": "x", "integer": 0, "number": 0, "boolean": False, "array": [], "object": {}}


def _example(schema: dict[str, Any]) -> Any:
    return schema["enum"][0] if schema.get("enum") else _EXAMPLES.get(schema.get("type"))


def _tagged(name: str) -> str:
    """Ollama's full name of a model: `llama3` is `llama3:latest` (a tag follows the last `/`)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _ollama_model(name: str) -> dict[str, Any]:
    """One model as Ollama's /api/tags lists it (api.ListModelResponse, without the omitempty
    capabilities), under its full name; sizes and digest are made up but of Ollama's types."""
    full = _tagged(name)
    return {
        "name": full,
        "model": full,
        "modified_at": "2026-01-01T00:00:00Z",
        "size": 1_321_098_329,
        "digest": hashlib.sha256(full.encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "1.2B",
            "quantization_level": "Q4_K_M",
        },
    }


def _ollama_metrics(started_ns: int, prompt: int, evals: int) -> dict[str, int]:
    """The done line's counts. Ollama's durations are integer nanoseconds and zero ones are
    dropped (omitempty), so each is at least 1."""
    total = max(4, time.monotonic_ns() - started_ns)
    return {
        "total_duration": total,
        "load_duration": total // 4,
        "prompt_eval_count": prompt,
        "prompt_eval_duration": total // 4,
        "eval_count": evals,
        "eval_duration": total // 2,
    }


def _ollama_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Ollama's error body, whatever the status: `{"error": "..."}` (gin.H in its routes.go)."""
    return web.json_response({"error": message}, status=status, headers=headers)


# ---- vLLM's Responses and Messages answers, from its recorded ones ------------------------------
# A real vLLM's answers (recorded by tests/e2e/record_wire.py), shipped with the package.
RECORDINGS = Path(__file__).with_name("recordings")
# Fields of a Responses object that echo the request (vLLM's ResponsesResponse.from_request):
# the request's value when it has one, else the recorded one.
_ECHOED = (
    "background",
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "parallel_tool_calls",
    "previous_response_id",
    "reasoning",
    "service_tier",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "truncation",
    "user",
)


@dataclass(frozen=True)
class _Stems:
    """The recordings one route's answers are made from (file stems under RECORDINGS)."""

    unary: str
    stream: str | None
    error: str


_DIALECT_RECORDINGS = {
    "/v1/responses": _Stems(
        "vllm_responses", "vllm_responses_stream", "vllm_responses_error_model"
    ),
    "/v1/messages": _Stems("vllm_messages", "vllm_messages_stream", "vllm_messages_error_model"),
    "/v1/messages/count_tokens": _Stems("vllm_count_tokens", None, "vllm_count_tokens_error_model"),
}
RECORDED_STEMS = frozenset(
    stem for s in _DIALECT_RECORDINGS.values() for stem in (s.unary, s.stream, s.error) if stem
)


@functools.cache
def _recorded(stem: str) -> dict[str, Any]:
    """A JSON recording: {request, status, content_type, body}, read on first use."""
    return orjson.loads((RECORDINGS / f"{stem}.json").read_bytes())


@functools.cache
def _recorded_stream_cached(stem: str) -> tuple[tuple[str | None, bytes], ...]:
    """A stream recording's events, unparsed: read once, parsed per answer."""
    events: list[tuple[str | None, bytes]] = []
    for block in (RECORDINGS / f"{stem}.txt").read_bytes().split(b"\n\n"):
        name, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        if data is not None:  # the header's comment lines have none
            events.append((name, data))
    return tuple(events)


def _recorded_stream(stem: str) -> list[tuple[str | None, dict[str, Any]]]:
    """A recorded SSE stream as (event name, data) pairs, parsed anew (callers change them)."""
    return [(name, orjson.loads(data)) for name, data in _recorded_stream_cached(stem)]


def _recorded_error(stem: str, message: str) -> tuple[int, dict[str, Any]]:
    """The recorded unknown-model error (status, body) with the demo's message."""
    doc = _recorded(stem)
    body = copy.deepcopy(doc["body"])
    body["error"]["message"] = message
    return doc["status"], body


def _recorded_text(answer: dict[str, Any]) -> str:
    """The text of a recorded unary answer (Responses output items or Messages blocks)."""
    parts = answer.get("content") or [
        p for item in answer.get("output") or [] for p in item.get("content") or []
    ]
    return "".join(p.get("text") or "" for p in parts)


def _is_delta(data: dict[str, Any]) -> bool:
    return data.get("type") in ("response.output_text.delta", "content_block_delta")


def _delta_text(data: dict[str, Any]) -> str:
    delta = data["delta"]
    return delta if isinstance(delta, str) else delta.get("text") or ""


def _with_delta(data: dict[str, Any], piece: str) -> dict[str, Any]:
    if isinstance(data["delta"], str):  # Responses
        data["delta"] = piece
    else:  # Anthropic: {"type": "text_delta", "text": ...}
        data["delta"]["text"] = piece
    return data


def _sse(name: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def _dialect_messages(path: str, body: dict[str, Any]) -> list[Any]:
    """The request's conversation as chat-like messages, for `_reply_text`: a Responses input
    (a string, or items with a role and text parts) or Anthropic's messages (text blocks)."""
    if path == "/v1/responses":
        items = body.get("input")
        if isinstance(items, str):
            return [{"role": "user", "content": items}]
        return [i for i in items or [] if isinstance(i, dict)]
    return [m for m in body.get("messages") or [] if isinstance(m, dict)]


@dataclass
class _Fill:
    """Turns a recorded vLLM answer into the demo's: its text, fresh ids (the recorded ids'
    prefixes kept, one new id per recorded one), the model asked for, its counts, and a finished
    answer (the recording was cut by max tokens; the demo always ends its text itself)."""

    text: str
    model: str
    prompt: int
    completion: int
    request: dict[str, Any]
    recorded_request: dict[str, Any]
    ids: dict[str, str] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    def fill(self, node: Any, recorded_text: str) -> Any:
        if isinstance(node, list):
            return [self.fill(x, recorded_text) for x in node]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "usage" and isinstance(value, dict):
                value = self.usage(value)
            elif key in ("id", "item_id") and isinstance(value, str):
                value = self._id(value)
            elif key == "model":
                value = self.model
            elif key in ("created_at", "created") and isinstance(value, int):
                value = self.created
            elif key == "text" and value == recorded_text and recorded_text:
                value = self.text
            elif key == "status" and value == "incomplete":
                value = "completed"
            elif key == "incomplete_details":
                value = None
            elif key == "stop_reason" and value == "max_tokens":
                value = "end_turn"
            else:
                value = self.fill(value, recorded_text)
            out[key] = value
        if out.get("object") == "response":  # vLLM echoes the request; null where the demo's
            for key in _ECHOED:  # request left out what the recorded one set
                if key in out and key in self.request:
                    out[key] = self.request[key]
                elif key in out and key in self.recorded_request:
                    out[key] = None
        return out

    def usage(self, node: dict[str, Any]) -> dict[str, Any]:
        """Counts in a recorded usage (or count_tokens) object: the demo's prompt and completion,
        a completion still 0 where the recording's was (Anthropic's message_start)."""
        out = dict(node)
        for key in ("input_tokens", "original_input_tokens"):
            if key in out:
                out[key] = self.prompt
        if "context_management" in out and isinstance(out["context_management"], dict):
            out["context_management"] = self.usage(out["context_management"])
        if out.get("output_tokens"):
            out["output_tokens"] = self.completion
        if "total_tokens" in out:
            out["total_tokens"] = out.get("input_tokens", 0) + out.get("output_tokens", 0)
        return out

    def _id(self, recorded: str) -> str:
        if recorded not in self.ids:
            cut = max(recorded.rfind("_"), recorded.rfind("-")) + 1
            self.ids[recorded] = recorded[:cut] + uuid.uuid4().hex[:16]
        return self.ids[recorded]


def prompt_tokens(body: dict[str, Any]) -> int:
    """The demo's prompt count: the words of every text the prompt holds, and a template's
    overhead (more history, more tokens, as a real server counts)."""
    parts = ("messages", "prompt", "input", "instructions", "system")
    return PROMPT_OVERHEAD + sum(_words(body.get(key)) for key in parts)


def _words(node: Any) -> int:
    if isinstance(node, str):
        return len(node.split())
    if isinstance(node, list):
        return sum(_words(x) for x in node)
    if isinstance(node, dict):
        return sum(_words(node.get(key)) for key in ("content", "text", "arguments", "output"))
    return 0


def _vllm_error(status: int, type_: str, message: str, param: str | None = None) -> web.Response:
    error = {"message": message, "type": type_, "param": param, "code": status}
    return web.json_response({"error": error}, status=status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--name", default="demo")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before headers")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--chunks", type=int, default=4)
    args = parser.parse_args(argv)
    knobs = Knobs(latency_s=args.latency, chunk_delay_s=args.chunk_delay, chunks=args.chunks)
    upstream = FakeUpstream(args.name, knobs, record=False)
    web.run_app(upstream._app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
