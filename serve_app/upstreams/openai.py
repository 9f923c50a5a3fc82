"""OpenAI wire format (OpenAI, Gemini's compatible endpoint, vLLM): bytes pass through."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from serve_app.core.config import ProviderConfig
from serve_app.core.schemas import RequestMeta
from serve_app.upstreams.base import JSON, api_root, json_headers, upstream_model


class OpenAIExchange:
    def __init__(self, provider: ProviderConfig, meta: RequestMeta, body: bytes) -> None:
        self.url = f"{api_root(provider.api_host, default_path='/v1')}/{meta.endpoint.value}"
        self.headers = json_headers(provider)
        model = upstream_model(provider, meta.model)
        if model != meta.model:
            doc = orjson.loads(body)
            doc["model"] = model
            body = orjson.dumps(doc)
        self.body = body

    def unary(self, status: int, body: bytes, content_type: str) -> tuple[bytes, str]:
        return body, content_type or JSON

    def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return chunks
