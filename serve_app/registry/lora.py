"""vLLM's runtime LoRA API (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`).

The server needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`. Both calls are made idempotent here:
"already loaded" counts as loaded and "not found" as unloaded, so a retry after a registry restart
converges instead of failing.
"""

from __future__ import annotations

import aiohttp

from serve_app.config import ProviderConfig
from serve_app.providers.base import api_root, json_headers

TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=5)


async def _post(
    session: aiohttp.ClientSession, provider: ProviderConfig, path: str, body: dict[str, str]
) -> tuple[int, str]:
    headers = json_headers(provider)
    url = f"{api_root(provider.api_host, default_path='/v1')}/{path}"
    try:
        async with session.post(url, json=body, headers=headers, timeout=TIMEOUT) as resp:
            return resp.status, f"HTTP {resp.status}: {(await resp.text())[:300]}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return 0, f"{type(exc).__name__} {exc}".strip()


async def load(
    session: aiohttp.ClientSession, provider: ProviderConfig, name: str, path: str
) -> str | None:
    """None once `name` is loaded on the provider, else why not."""
    status, text = await _post(
        session, provider, "load_lora_adapter", {"lora_name": name, "lora_path": path}
    )
    if status == 200 or (status == 400 and "already" in text):
        return None
    return text


async def unload(session: aiohttp.ClientSession, provider: ProviderConfig, name: str) -> str | None:
    """None once `name` is not loaded on the provider, else why not."""
    status, text = await _post(session, provider, "unload_lora_adapter", {"lora_name": name})
    if status in (200, 404):
        return None
    return text
