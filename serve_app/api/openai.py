"""OpenAI's chat, completions, embeddings and model list: the router's internal form."""

from fastapi import APIRouter
from fastapi.responses import Response

from serve_app.api.http import relay_route, replica
from serve_app.core.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, Endpoint
from serve_app.upstreams.base import JSON

router = APIRouter()
relay_route(router, "/v1/chat/completions", Endpoint.CHAT, ChatRequest, "chat_completions")
relay_route(router, "/v1/completions", Endpoint.COMPLETIONS, CompletionRequest, "completions")
relay_route(router, "/v1/embeddings", Endpoint.EMBEDDINGS, EmbeddingRequest, "embeddings")


@router.get("/v1/models")
async def models() -> Response:
    return Response(replica().gateway.openai_models, media_type=JSON)
