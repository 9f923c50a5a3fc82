"""Records the real vLLM's answers that the dialect unit tests translate (tests/wire/vllm_*) and
the demo upstream imitates (serve_app/demo/recordings/, shipped with the package):
`python -m tests.e2e.record_wire` after `make e2e` has made the environment and the model.

Every request is greedy with few tokens, so a new recording differs from the last only where
vLLM's wire format changed:
- a chat completion unary and streamed (with usage), kept raw as before (`vllm_chat.json`,
  `vllm_chat_stream.txt`), and the server's Prometheus page (the load gauges the monitor scrapes);
- `/v1/responses` and `/v1/messages` unary and streamed, `/v1/messages/count_tokens`, and the
  unknown-model error of each of those three: the demo's answers on those routes are these
  bodies with its own text, ids and counts filled in (`serve_app/demo/upstream.py`);
- a chat whose `tool_choice` names a function, unary and streamed: vLLM decodes it under the
  tool's JSON schema, so even the random tiny model answers a valid call. The schema's one
  property is an enum, so the arguments end after a few tokens (a free string would run on
  to `max_tokens` and be cut mid-JSON).

A JSON answer is saved as `{"request", "status", "content_type", "body"}` (the body parsed, its
key order kept). A stream is saved byte for byte after a header of SSE comment lines (`: ...`,
which SSE readers skip) naming the request, status and content type, and a blank line.

Not recorded: a reasoning stream. vLLM emits reasoning only with `--reasoning-parser` and a model
whose tokenizer has the parser's think tokens and that generates them; the tiny model is random,
so it would need a second tokenizer with those tokens, a second server start and a prompt that
forces them (a guided grammar over both parts), a lot more than one recording is worth here.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.demo import upstream as demo_upstream
from tests.conftest import free_port
from tests.e2e.vllm_server import ROOT, SERVED_MODEL, VllmServer

WIRE = ROOT / "tests" / "wire"


def folder(stem: str) -> Path:
    """Where a recording lives: the package's own for those the demo answers from."""
    return demo_upstream.RECORDINGS if stem in demo_upstream.RECORDED_STEMS else WIRE


UNKNOWN = "no-such-model"
HELLO = [{"role": "user", "content": "hello there"}]

REQUEST = {
    "model": SERVED_MODEL,
    "messages": HELLO,
    "max_tokens": 4,
    "temperature": 0,
}
RESPONSES = {
    "model": SERVED_MODEL,
    "input": "hello there",
    "max_output_tokens": 4,
    "temperature": 0,
}
MESSAGES = {"model": SERVED_MODEL, "messages": HELLO, "max_tokens": 4, "temperature": 0}
COUNT = {"model": SERVED_MODEL, "messages": HELLO}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TOOL_CHAT = {
    "model": SERVED_MODEL,
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "max_tokens": 32,
    "temperature": 0,
}
STREAM = {"stream": True, "stream_options": {"include_usage": True}}
RAW = ("vllm_chat", "vllm_chat_stream", "vllm_metrics")  # kept raw, as the unit tests read them

# A named tool_choice needs a tool parser loaded, and vLLM loads none without auto tool choice
# on; any parser does (this one needs no special tokens). Without whitespace in the grammar the
# random model cannot pad the JSON with blanks until max_tokens (it did).
TOOL_SERVER = (
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "pythonic",
    "--structured-outputs-config",
    '{"backend": "xgrammar", "disable_any_whitespace": true}',
)


@dataclass(frozen=True)
class Recording:
    """One exchange: a body with `"stream": true` whose answer is a stream is saved as .txt.
    `server`: the extra arguments of the server it is recorded from."""

    path: str
    body: dict[str, Any]
    server: tuple[str, ...] = ()


RECORDINGS: dict[str, Recording] = {
    "vllm_responses": Recording("/v1/responses", RESPONSES),
    "vllm_responses_stream": Recording("/v1/responses", RESPONSES | {"stream": True}),
    "vllm_messages": Recording("/v1/messages", MESSAGES),
    "vllm_messages_stream": Recording("/v1/messages", MESSAGES | {"stream": True}),
    "vllm_count_tokens": Recording("/v1/messages/count_tokens", COUNT),
    "vllm_responses_error_model": Recording("/v1/responses", RESPONSES | {"model": UNKNOWN}),
    "vllm_messages_error_model": Recording("/v1/messages", MESSAGES | {"model": UNKNOWN}),
    "vllm_count_tokens_error_model": Recording(
        "/v1/messages/count_tokens", COUNT | {"model": UNKNOWN}
    ),
    # What the servers `make e2e` starts (no tool-call parser) answer: a 400, JSON even streamed.
    "vllm_chat_tool_named_refused": Recording("/v1/chat/completions", TOOL_CHAT),
    "vllm_chat_tool_named_refused_stream": Recording("/v1/chat/completions", TOOL_CHAT | STREAM),
    "vllm_chat_tool_named": Recording("/v1/chat/completions", TOOL_CHAT, TOOL_SERVER),
    "vllm_chat_tool_named_stream": Recording(
        "/v1/chat/completions", TOOL_CHAT | STREAM, TOOL_SERVER
    ),
}


def _post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read()


def _exchange(url: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    """Status, content type and body, error statuses included (they are recorded too)."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.headers.get("content-type") or "", resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type") or "", err.read()


def record(base: str, stem: str, rec: Recording) -> None:
    """One exchange saved as <stem>.json in its folder, or .txt when the answer is a stream."""
    path, body = rec.path, rec.body
    status, ctype, raw = _exchange(base + path, body)
    request = {"method": "POST", "path": path, "body": body, "server_args": list(rec.server)}
    if ctype.startswith("text/event-stream"):
        header = [
            f": recorded from vLLM by tests/e2e/record_wire.py: POST {path}",
            f": request {json.dumps(body)}",
            f": server args {' '.join(rec.server) or '(as tests/e2e/vllm_server.py)'}",
            f": status {status}, content-type {ctype}",
        ]
        (folder(stem) / f"{stem}.txt").write_bytes("\n".join(header).encode() + b"\n\n" + raw)
        return
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace")
    doc = {"request": request, "status": status, "content_type": ctype, "body": parsed}
    (folder(stem) / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Records all, or the stems named; one server at a time (the machine is small)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "only",
        nargs="*",
        choices=[*RAW, *RECORDINGS],
        help="record only these (file stems); all by default",
    )
    only = set(parser.parse_args(argv).only or [*RAW, *RECORDINGS])
    groups: dict[tuple[str, ...], list[str]] = {(): []}
    for stem, rec in RECORDINGS.items():
        if stem in only:
            groups.setdefault(rec.server, []).append(stem)
    for args, stems in groups.items():
        if args == () and not stems and not only & set(RAW):
            continue
        server = VllmServer("record", free_port(), core=0, extra=args)
        server.start()
        try:
            server.wait_ready()
            if args == ():
                _record_raw(server.url, only)
            for stem in stems:
                record(server.url, stem, RECORDINGS[stem])
        finally:
            server.stop()


def _record_raw(base: str, only: set[str]) -> None:
    url = f"{base}/v1/chat/completions"
    if "vllm_chat" in only:
        (WIRE / "vllm_chat.json").write_bytes(_post(url, REQUEST))
    if "vllm_chat_stream" in only:
        (WIRE / "vllm_chat_stream.txt").write_bytes(_post(url, REQUEST | STREAM))
    if "vllm_metrics" in only:
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
            (WIRE / "vllm_metrics.txt").write_bytes(resp.read())


if __name__ == "__main__":
    main()
