"""Upstream wire formats by `api_type`."""

from __future__ import annotations

from serve_app.config import ProviderConfig
from serve_app.providers.base import Exchange
from serve_app.providers.ollama import OllamaExchange
from serve_app.providers.openai import OpenAIExchange
from serve_app.schemas import RequestMeta

_BY_TYPE = {"openai": OpenAIExchange, "vllm": OpenAIExchange, "ollama": OllamaExchange}


def prepare(provider: ProviderConfig, meta: RequestMeta, body: bytes) -> Exchange:
    return _BY_TYPE[provider.api_type](provider, meta, body)
