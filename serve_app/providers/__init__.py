"""Upstream wire formats by `api_type`."""

from __future__ import annotations

from serve_app.config import ProviderConfig
from serve_app.providers.base import Exchange, api_root
from serve_app.providers.ollama import OllamaExchange, ollama_root
from serve_app.providers.openai import OpenAIExchange
from serve_app.schemas import RequestMeta

_BY_TYPE = {"openai": OpenAIExchange, "vllm": OpenAIExchange, "ollama": OllamaExchange}


def prepare(provider: ProviderConfig, meta: RequestMeta, body: bytes) -> Exchange:
    return _BY_TYPE[provider.api_type](provider, meta, body)


def probe_url(provider: ProviderConfig) -> str:
    """The cheap GET that tells whether a provider is up: its model list."""
    if provider.api_type == "ollama":
        return f"{ollama_root(provider)}/api/tags"
    return f"{api_root(provider.api_host, default_path='/v1')}/models"
