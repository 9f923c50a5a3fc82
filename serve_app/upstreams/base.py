"""What every upstream wire format provides: one prepared exchange per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import urlsplit

from serve_app.core.config import ProviderConfig

JSON = "application/json"
SSE = "text/event-stream"


class Exchange(Protocol):
    """One request to one provider, and how its answer becomes an OpenAI-format answer."""

    url: str
    headers: dict[str, str]
    body: bytes

    def unary(self, status: int, body: bytes, content_type: str) -> tuple[bytes, str]:
        """The client-facing body and content type of a complete (non-streamed) answer."""

    def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The client-facing SSE bytes of a streamed answer, chunk by chunk."""


def api_root(api_host: str, *, default_path: str) -> str:
    """`api_host` as the API root: a bare host gets `default_path`; a host with a path keeps it.

    So `http://h:7000`, `http://h:7000/` and `http://h:7000/v1/` all become `http://h:7000/v1`,
    while Gemini's `.../v1beta/openai/` is used as given.
    """
    parts = urlsplit(api_host)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path or default_path}"


def upstream_model(provider: ProviderConfig, requested: str) -> str:
    return provider.model_path or requested


def json_headers(provider: ProviderConfig) -> dict[str, str]:
    """A JSON request's headers, with the provider's bearer token when it has one."""
    headers = {"content-type": JSON}
    token = provider.api_token.get_secret_value()
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers
