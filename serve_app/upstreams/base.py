"""What every upstream wire format provides: one prepared exchange per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import urlsplit

from serve_app.core.config import ProviderConfig
from serve_app.core.schemas import Dialect

JSON = "application/json"
SSE = "text/event-stream"


class Exchange(Protocol):
    """One request to one provider, and how its answer becomes the client's."""

    url: str
    headers: dict[str, str]
    body: bytes
    wire: Dialect  # the format of the provider's streamed answer (upstreams/checks.py)

    def unary(self, status: int, body: bytes) -> bytes:
        """The client-facing JSON body of a complete (non-streamed) answer."""

    def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The client-facing bytes of a streamed answer, from the provider's whole frames."""


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
    """A JSON request's headers, with the provider's bearer token when it has one. The answer is
    asked for uncompressed: the router relays and translates it, the client's side compresses."""
    headers = {"content-type": JSON, "accept-encoding": "identity"}
    token = provider.api_token.get_secret_value()
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers
