"""Ollama's API, for Ollama clients (Open WebUI, editor plugins, the `ollama` library): every
configured model and role, whatever its providers speak (Ollama providers take the request as
it came; others get it translated). Errors are Ollama's `{"error": "..."}`."""

from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ValidationError

from serve_app.api.http import read_body, relay_route, replica
from serve_app.api.openapi import json_body
from serve_app.core.errors import RouterError, model_not_found
from serve_app.core.schemas import (
    Endpoint,
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
)
from serve_app.dialects import ollama
from serve_app.ingress.gateway import ModelInfo
from serve_app.upstreams.base import JSON

router = APIRouter()
SHOW_MAX_BODY_BYTES = 64 * 1024


class ShowRequest(BaseModel):
    model: str
    verbose: bool | None = None


@router.get("/")
async def root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@router.head("/")
async def root_head() -> PlainTextResponse:
    return PlainTextResponse("")


@router.get("/api/version")
async def version() -> Response:
    return Response(orjson.dumps({"version": ollama.API_VERSION}), media_type=JSON)


def _visible(request: Request) -> list[ModelInfo]:
    served = replica()
    return served.gateway.listed(request.headers, served.admin.holds_token(request))


def _listing(request: Request, entry: Callable[[str, str, str | None], dict[str, Any]]) -> bytes:
    """The models the request may see (with keys required, its key's; 401 without one)."""
    models = _visible(request)
    return orjson.dumps({"models": [entry(m.name, m.model_type, m.parent) for m in models]})


@router.get("/api/tags")
async def tags(request: Request) -> Response:
    return Response(_listing(request, ollama.model_entry), media_type=JSON)


@router.get("/api/ps")
async def running(request: Request) -> Response:
    """What the router serves right now: every model it routes (its providers load them), in
    Ollama's /api/ps shape."""
    return Response(_listing(request, ollama.running_entry), media_type=JSON)


@router.post("/api/show", openapi_extra=json_body(ShowRequest))
async def show(request: Request) -> Response:
    gateway = replica().gateway
    visible = _visible(request)
    try:
        body = await read_body(request, SHOW_MAX_BODY_BYTES, gateway.body.timeout_s)
        req = ShowRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RouterError(400, f"invalid request: {exc.errors()[0]['msg']}") from None
    info = gateway.find(req.model)
    if info is None or info not in visible:  # another key's model is not named to this one
        raise model_not_found(req.model)
    root = info.root or info.name
    answer = ollama.show_answer(info.name, info.model_type, info.parent, root in gateway.tools)
    return Response(orjson.dumps(answer), media_type=JSON)


relay_route(router, "/api/chat", Endpoint.OLLAMA_CHAT, OllamaChatRequest, "chat")
relay_route(router, "/api/generate", Endpoint.OLLAMA_GENERATE, OllamaGenerateRequest, "generate")
relay_route(router, "/api/embed", Endpoint.OLLAMA_EMBED, OllamaEmbedRequest, "embed")
# Ollama's legacy single-embedding endpoint.
relay_route(
    router, "/api/embeddings", Endpoint.OLLAMA_EMBEDDINGS, OllamaEmbeddingsRequest, "embeddings"
)
