"""vLLM's runtime LoRA API (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) and its
listing (`GET /v1/models`, where a loaded adapter appears with its path as `root`).

The server needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`. Both calls are made idempotent here:
a load replaces a same-named adapter (`load_inplace`: one left by a registry that lost its state
may come from another path) and "not found" counts as unloaded, so retries converge.
"""

from __future__ import annotations

import aiohttp

from serve_app.core.config import ProviderConfig
from serve_app.upstreams.base import api_root, json_headers

TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=5)
# Listing is polled every second under the registry's lock: a server that is slow to list counts
# as not answering this time.
LISTING_TIMEOUT = aiohttp.ClientTimeout(total=3, sock_connect=1)


def _url(provider: ProviderConfig, path: str) -> str:
    return f"{api_root(provider.api_host, default_path='/v1')}/{path}"


async def _post(
    session: aiohttp.ClientSession, provider: ProviderConfig, path: str, body: dict[str, object]
) -> tuple[int, str]:
    headers = json_headers(provider)
    try:
        async with session.post(
            _url(provider, path), json=body, headers=headers, timeout=TIMEOUT
        ) as resp:
            return resp.status, f"HTTP {resp.status}: {(await resp.text())[:300]}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return 0, f"{type(exc).__name__} {exc}".strip()


async def load(
    session: aiohttp.ClientSession, provider: ProviderConfig, name: str, path: str
) -> str | None:
    """None once `name` is loaded on the provider, else why not."""
    body = {"lora_name": name, "lora_path": path, "load_inplace": True}
    status, text = await _post(session, provider, "load_lora_adapter", body)
    # A server older than `load_inplace` refuses a same-named adapter as "already loaded".
    if status == 200 or (status == 400 and "already" in text):
        return None
    return text


async def unload(session: aiohttp.ClientSession, provider: ProviderConfig, name: str) -> str | None:
    """None once `name` is not loaded on the provider, else why not."""
    status, text = await _post(session, provider, "unload_lora_adapter", {"lora_name": name})
    if status in (200, 404):
        return None
    return text


async def listing(
    session: aiohttp.ClientSession, provider: ProviderConfig
) -> dict[str, str] | None:
    """Model id -> root ("" when not given) of what the server serves now; None when it does not
    answer with a list."""
    try:
        async with session.get(
            _url(provider, "models"), headers=json_headers(provider), timeout=LISTING_TIMEOUT
        ) as resp:
            if resp.status != 200:
                return None
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    try:
        return {str(m["id"]): str(m.get("root") or "") for m in doc["data"]}
    except (KeyError, TypeError):
        return None
