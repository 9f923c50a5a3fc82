"""What a provider has, and Ollama's pull: the HTTP side of provisioning, as plain functions."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson

from serve_app.core.config import ProviderConfig
from serve_app.upstreams import probe_url
from serve_app.upstreams.base import json_headers
from serve_app.upstreams.ollama import ollama_root

LIST_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)
# A pull may take an hour for a large model; what must not stall is the progress stream.
PULL_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=300)


class Unreachable(Exception):
    """The provider did not answer at all."""


class Failed(Exception):
    """The provider answered with an error; the message says which."""


async def list_models(session: aiohttp.ClientSession, provider: ProviderConfig) -> set[str]:
    """Model names on the provider (`/api/tags` for Ollama, `/v1/models` for vLLM)."""
    try:
        async with session.get(
            probe_url(provider), headers=json_headers(provider), timeout=LIST_TIMEOUT
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise Failed(f"HTTP {resp.status}: {body[:200].decode(errors='replace')}")
    except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
        raise Unreachable(f"{type(exc).__name__} {exc}".strip()) from None
    try:
        doc = orjson.loads(body)
        if provider.api_type == "ollama":
            return {m["name"] for m in doc["models"]}
        return {m["id"] for m in doc["data"]}
    except (ValueError, KeyError, TypeError):
        raise Failed("unexpected model list") from None


def has_model(names: set[str], name: str) -> bool:
    """Ollama lists `llama3` as `llama3:latest`."""
    return name in names or (":" not in name and f"{name}:latest" in names)


async def pull(
    session: aiohttp.ClientSession, provider: ProviderConfig, name: str
) -> AsyncIterator[dict[str, object]]:
    """Ollama's streaming `/api/pull`, yielding its progress lines. Raises Failed."""
    url = f"{ollama_root(provider)}/api/pull"
    body = {"model": name, "stream": True}
    last: dict[str, object] = {}
    try:
        async with session.post(
            url, json=body, headers=json_headers(provider), timeout=PULL_TIMEOUT
        ) as resp:
            if resp.status != 200:
                raise Failed(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for line in resp.content:
                if not line.strip():
                    continue
                last = orjson.loads(line)
                if "error" in last:
                    raise Failed(str(last["error"]))
                yield last
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise Failed(f"{type(exc).__name__} {exc}".strip()) from None
    if last.get("status") != "success":
        raise Failed("the pull ended without success")
