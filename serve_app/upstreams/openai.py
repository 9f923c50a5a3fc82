"""OpenAI wire format (OpenAI, Gemini's compatible endpoint, vLLM): bytes pass through."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from serve_app.core.config import ProviderConfig
from serve_app.core.errors import error_body
from serve_app.core.schemas import RequestMeta
from serve_app.upstreams.base import api_root, json_headers, upstream_model


class OpenAIExchange:
    def __init__(self, provider: ProviderConfig, meta: RequestMeta, body: bytes) -> None:
        self.url = f"{api_root(provider.api_host, default_path='/v1')}/{meta.endpoint.value}"
        self.headers = json_headers(provider)
        self.wire = meta.endpoint.dialect  # vLLM streams Responses and Messages natively
        model = upstream_model(provider, meta.model)
        if model != meta.model:
            doc = orjson.loads(body)
            doc["model"] = model
            body = orjson.dumps(doc)
        self.body = body

    def unary(self, status: int, body: bytes) -> bytes:
        if status >= 400 and not _json_object(body):  # a proxy's HTML page, say: quoted
            kind = "invalid_request_error" if status < 500 else "api_error"
            return error_body(body.decode(errors="replace")[:500], kind, "upstream_error")
        return body

    def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return chunks


def _json_object(body: bytes) -> bool:
    try:
        return isinstance(orjson.loads(body), dict)
    except orjson.JSONDecodeError:
        return False
