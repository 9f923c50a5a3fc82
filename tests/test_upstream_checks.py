"""What an upstream's answer must be before it is relayed (pure): decoded in bounded pieces, a
unary answer and each stream event within their bounds, a stream in its wire's format and
ended by its terminal event; and a translation that cannot read an answer says so as a 502."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator

import orjson
import pytest

from serve_app.core.errors import BadUpstream
from serve_app.core.schemas import Dialect, Endpoint, validate_request
from serve_app.upstreams import prepare
from serve_app.upstreams.checks import DECODED_PIECE, Body, Decoder, StreamCheck
from serve_app.upstreams.openai import OpenAIExchange
from tests.test_dialects import _provider

LIMIT = 1024


def _frames(wire: Dialect, data: bytes, size: int) -> bytes:
    """`data` fed in pieces of `size` bytes; what the check handed on (it must have ended)."""
    check = StreamCheck(wire, LIMIT)
    out = b"".join(check.feed(data[i : i + size]) for i in range(0, len(data), size))
    check.end()
    return out


def _refused(wire: Dialect, data: bytes, size: int = 5) -> BadUpstream:
    with pytest.raises(BadUpstream) as info:
        _frames(wire, data, size)
    assert info.value.status == 502 and info.value.code == "bad_upstream_response"
    return info.value


def _sse(*payloads: bytes, sep: bytes = b"\n") -> bytes:
    return b"".join(b"data: " + p + sep + sep for p in payloads)


OPENAI = _sse(b'{"choices": [{"delta": {"content": "hi"}}]}', b'{"choices": []}', b"[DONE]")
RESPONSES = b'event: response.created\ndata: {"type": "response.created"}\n\n' + _sse(
    b'{"type": "response.output_text.delta", "delta": "hi"}', b'{"type": "response.completed"}'
)
ANTHROPIC = b': a comment\n\nevent: ping\ndata: {"type": "ping"}\n\n' + _sse(
    b'{"type": "message_start"}', b'{"type": "message_stop"}'
)
OLLAMA = b'{"response": "hi", "done": false}\n\n{"response": "", "done": true}\n'
WHOLE = [("openai", OPENAI), ("responses", RESPONSES), ("anthropic", ANTHROPIC), ("ollama", OLLAMA)]


@pytest.mark.parametrize(("wire", "data"), WHOLE)
def test_a_stream_cut_anywhere_is_handed_on_whole_and_ends(wire: Dialect, data: bytes) -> None:
    for size in range(1, len(data) + 1):
        assert _frames(wire, data, size) == data, size


def test_sse_line_ends_in_crlf_are_read_even_when_cut_between_cr_and_lf() -> None:
    crlf = OPENAI.replace(b"\n", b"\r\n")
    for size in range(1, len(crlf) + 1):
        assert _frames("openai", crlf, size) == OPENAI, size
    lone = b": a lone \r stays\n\n" + OPENAI  # a comment: any bytes but a line end
    for size in range(1, len(lone) + 1):
        assert _frames("openai", lone, size) == lone, size


@pytest.mark.parametrize(
    ("wire", "data"),
    [
        ("openai", OPENAI[: OPENAI.index(b"data: [DONE]")]),  # no [DONE]
        ("responses", RESPONSES[: RESPONSES.rindex(b"data:")]),  # no response.completed
        ("anthropic", ANTHROPIC[: ANTHROPIC.rindex(b"data:")]),  # no message_stop
        ("ollama", OLLAMA[: OLLAMA.rindex(b"{")]),  # no done line
        ("openai", b""),  # nothing at all
    ],
)
def test_a_stream_without_its_terminal_event_is_refused(wire: Dialect, data: bytes) -> None:
    assert _refused(wire, data).reason == "stream cut"


@pytest.mark.parametrize(
    ("wire", "data"),
    [
        ("openai", b"hello world\n\n" + OPENAI),  # a line that is not SSE
        ("openai", _sse(b"not json") + OPENAI),
        ("openai", _sse(b"[1, 2]") + OPENAI),  # JSON, not an object
        ("responses", _sse(b'"response.completed"')),
        ("anthropic", b"<html>\n\n" + ANTHROPIC),
        ("ollama", b"not json\n" + OLLAMA),
        ("ollama", b"[]\n" + OLLAMA),
        ("openai", OPENAI + b"data: {"),  # ended in the middle of an event
    ],
)
def test_malformed_streams_are_refused(wire: Dialect, data: bytes) -> None:
    assert _refused(wire, data).reason == "bad stream"


def test_the_upstreams_own_error_event_ends_its_stream() -> None:
    assert _frames("openai", _sse(b'{"error": {"message": "x"}}'), 3)
    assert _frames("responses", _sse(b'{"type": "error", "message": "x"}'), 3)
    assert _frames("ollama", b'{"error": "x"}\n', 3)


@pytest.mark.parametrize("wire", ["openai", "ollama"])
def test_an_endless_event_is_refused_before_more_than_its_bound_is_held(wire: Dialect) -> None:
    check = StreamCheck(wire, LIMIT)
    held = 0
    with pytest.raises(BadUpstream) as info:
        for _ in range(10 * LIMIT):  # an endless line, 100 bytes at a time
            check.feed(b"data: " if held == 0 else b"x" * 100)
            held += 100
    assert info.value.reason == "event too large" and held <= LIMIT + 100
    # A whole event over the bound in one piece is refused too; one at it passes.
    assert _refused("ollama", b'{"x": "' + b"a" * LIMIT + b'"}\n').reason == "event too large"
    at_bound = b'{"done": true, "x": "' + b"a" * (LIMIT - 23) + b'"}\n'
    assert len(at_bound) == LIMIT + 1 and _frames("ollama", at_bound, 64) == at_bound


def test_a_compressed_answer_is_decoded_in_bounded_pieces() -> None:
    text = b"0" * (20 * DECODED_PIECE)  # a bomb, in small: 1.3 MB from 1.3 KB
    for encoding, packed in (("gzip", gzip.compress(text)), ("deflate", zlib.compress(text))):
        decoder = Decoder(encoding)
        pieces = [p for i in range(0, len(packed), 512) for p in decoder.feed(packed[i : i + 512])]
        decoder.end()
        assert b"".join(pieces) == text and max(map(len, pieces)) <= DECODED_PIECE
    for identity in ("identity", ""):
        assert list(Decoder(identity).feed(b"as is")) == [b"as is"]


def test_a_compressed_answer_that_is_corrupt_cut_or_unknown_is_refused() -> None:
    packed = gzip.compress(b"hello" * 100)
    with pytest.raises(BadUpstream):
        list(Decoder("gzip").feed(b"not gzip at all"))
    cut = Decoder("gzip")
    list(cut.feed(packed[:-8]))
    with pytest.raises(BadUpstream):
        cut.end()
    with pytest.raises(BadUpstream):
        Decoder("br")


def test_a_unary_answer_over_its_bound_is_refused_declared_or_read() -> None:
    with pytest.raises(BadUpstream) as info:
        Body(LIMIT, declared=LIMIT + 1)
    assert info.value.reason == "answer too large"
    body = Body(LIMIT)
    body.add(b"a" * LIMIT)
    assert body.bytes() == b"a" * LIMIT
    with pytest.raises(BadUpstream):
        body.add(b"a")


def test_an_upstream_error_page_that_is_not_json_becomes_a_json_error() -> None:
    meta = validate_request(Endpoint.COMPLETIONS, b'{"model": "m", "prompt": "x"}', "r")
    ex = OpenAIExchange(_provider("openai"), meta, b"{}")
    doc = orjson.loads(ex.unary(502, b"<html><script>x</script></html>"))
    assert doc["error"]["message"] == "<html><script>x</script></html>"
    assert ex.unary(400, b'{"error": {"message": "no"}}') == b'{"error": {"message": "no"}}'
    assert ex.headers["accept-encoding"] == "identity"


def _translated(endpoint: Endpoint, api_type: str, upstream: bytes) -> BadUpstream:
    doc: dict = {"model": "m", "stream": True, "max_tokens": 9}
    if endpoint is Endpoint.RESPONSES:
        doc = {"model": "m", "stream": True, "input": "hi"}
    else:
        doc["messages"] = [{"role": "user", "content": "hi"}]
    body = orjson.dumps(doc)
    ex = prepare(_provider(api_type), validate_request(endpoint, body, "r"), body)

    async def run() -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield upstream

        async for _ in ex.stream(chunks()):
            pass

    with pytest.raises(BadUpstream) as info:
        asyncio.run(run())
    return info.value


def test_stream_events_a_translation_cannot_read_are_a_bad_upstream() -> None:
    """JSON objects of the wrong shape: a 502 event, not an exception that cuts the stream."""
    assert _translated(Endpoint.RESPONSES, "openai", _sse(b'{"choices": 5}'))
    assert _translated(Endpoint.MESSAGES, "openai", _sse(b'{"choices": [{"delta": 1}]}'))
    assert _translated(Endpoint.CHAT, "ollama", b'{"message": "text", "done": false}\n')
