"""Upstream wire formats by `api_type`, and which operations each serves natively."""

from __future__ import annotations

from urllib.parse import urlsplit

import orjson

from serve_app.core.config import ProviderConfig
from serve_app.core.schemas import Endpoint, RequestMeta
from serve_app.dialects.translate import translation
from serve_app.upstreams.base import Exchange, api_root
from serve_app.upstreams.ollama import OllamaExchange, OllamaNativeExchange, ollama_root
from serve_app.upstreams.openai import OpenAIExchange
from serve_app.upstreams.translated import TranslatedExchange

_BY_TYPE = {"openai": OpenAIExchange, "vllm": OpenAIExchange, "ollama": OllamaExchange}
_INTERNAL = {Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS}
# What each api_type is sent as is (Ollama providers take the internal form translated).
_NATIVE = {
    "openai": _INTERNAL,
    "vllm": _INTERNAL | {Endpoint.RESPONSES, Endpoint.MESSAGES, Endpoint.COUNT_TOKENS},
    "ollama": _INTERNAL,
}


def prepare(provider: ProviderConfig, meta: RequestMeta, body: bytes) -> Exchange:
    """The request as `provider` takes it (RouterError 400 when its format cannot express it)."""
    if meta.endpoint in _NATIVE[provider.api_type]:
        return _BY_TYPE[provider.api_type](provider, meta, body)
    if provider.api_type == "ollama" and meta.endpoint.dialect == "ollama":
        return OllamaNativeExchange(provider, meta, body)
    t = translation(meta.endpoint, orjson.loads(body), meta.stream)
    inner = _BY_TYPE[provider.api_type](
        provider, meta._replace(endpoint=t.endpoint), orjson.dumps(t.body)
    )
    return TranslatedExchange(inner, t)


def signal_url(provider: ProviderConfig) -> str | None:
    """Where a provider says how loaded it is (routing.load): vLLM's Prometheus page at the
    server's root, Ollama's running models; None for other types."""
    if provider.api_type == "vllm":
        parts = urlsplit(provider.api_host)
        return f"{parts.scheme}://{parts.netloc}/metrics"
    if provider.api_type == "ollama":
        return f"{ollama_root(provider)}/api/ps"
    return None


def probe_url(provider: ProviderConfig) -> str:
    """The cheap GET that tells whether a provider is up: its model list."""
    if provider.api_type == "ollama":
        return f"{ollama_root(provider)}/api/tags"
    return f"{api_root(provider.api_host, default_path='/v1')}/models"
