"""OpenAI's chat, completions, embeddings and model list: the router's internal form."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve_app.api.http import relay_route, replica
from serve_app.core.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, Endpoint
from serve_app.upstreams.base import JSON

router = APIRouter()
relay_route(router, "/v1/chat/completions", Endpoint.CHAT, ChatRequest, "chat_completions")
relay_route(router, "/v1/completions", Endpoint.COMPLETIONS, CompletionRequest, "completions")
relay_route(router, "/v1/embeddings", Endpoint.EMBEDDINGS, EmbeddingRequest, "embeddings")


@router.get("/v1/models")
async def models(request: Request) -> Response:
    """Every model, or with keys required (401 without one) those the key may use; every
    model for the admin token."""
    served = replica()
    listing = served.gateway.openai_listing(request.headers, served.admin.holds_token(request))
    return Response(listing, media_type=JSON)
