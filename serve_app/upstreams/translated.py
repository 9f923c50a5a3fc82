"""A request of another dialect sent to a provider that does not speak it: the provider's own
exchange carries the internal form, and its answers are written back in the client's dialect."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from serve_app.dialects.base import Translation
from serve_app.dialects.internal import DONE, SSEReader, error_message, read_answer
from serve_app.upstreams.base import Exchange
from serve_app.upstreams.checks import translating


class TranslatedExchange:
    def __init__(self, inner: Exchange, translation: Translation) -> None:
        self.inner = inner
        self.translation = translation
        self.url, self.headers, self.body = inner.url, inner.headers, inner.body
        self.wire = inner.wire

    def unary(self, status: int, body: bytes) -> bytes:
        out = self.inner.unary(status, body)
        if status >= 400:  # reshaped into the client's dialect at the ingress
            return out
        with translating():
            doc = orjson.loads(out)
            return orjson.dumps(self.translation.unary(read_answer(doc), doc))

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        writer = self.translation.writer()
        yield writer.start()
        sse = SSEReader()
        async for chunk in self.inner.stream(chunks):
            out = b""
            for data in sse.feed(chunk):
                if data == DONE:
                    continue
                with translating():
                    doc = orjson.loads(data)
                    message = error_message(doc)
                    if message is None:
                        out += writer.deltas(writer.reader.read(doc))
                if message is not None:  # the stream broke upstream: that ends it
                    yield out + writer.error(message, "upstream_error")
                    return
            if out:
                yield out
        yield writer.end()
