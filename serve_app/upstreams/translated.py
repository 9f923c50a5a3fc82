"""A request of another dialect sent to a provider that does not speak it: the provider's own
exchange carries the internal form, and its answers are written back in the client's dialect."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from serve_app.core.errors import bad_upstream_response
from serve_app.dialects.base import Translation
from serve_app.dialects.internal import DONE, SSEReader, error_message, read_answer
from serve_app.upstreams.base import JSON, Exchange


class TranslatedExchange:
    def __init__(self, inner: Exchange, translation: Translation) -> None:
        self.inner = inner
        self.translation = translation
        self.url, self.headers, self.body = inner.url, inner.headers, inner.body

    def unary(self, status: int, body: bytes, content_type: str) -> tuple[bytes, str]:
        out, ctype = self.inner.unary(status, body, content_type)
        if status >= 400:  # reshaped into the client's dialect at the ingress
            return out, ctype
        try:
            doc = orjson.loads(out)
            return orjson.dumps(self.translation.unary(read_answer(doc), doc)), JSON
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            raise bad_upstream_response(
                "the provider's answer is not a chat, completion or embedding object"
            ) from None

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        writer = self.translation.writer()
        yield writer.start()
        sse = SSEReader()
        async for chunk in self.inner.stream(chunks):
            out = b""
            for data in sse.feed(chunk):
                if data == DONE:
                    continue
                doc = orjson.loads(data)
                message = error_message(doc)
                if message is not None:  # the stream broke upstream: that ends it
                    yield out + writer.error(message, "upstream_error")
                    return
                out += writer.deltas(writer.reader.read(doc))
            if out:
                yield out
        yield writer.end()
