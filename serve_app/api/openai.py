"""OpenAI's chat, completions, embeddings and model list: the router's internal form."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve_app.api.http import replica
from serve_app.openapi import json_body
from serve_app.providers.base import JSON
from serve_app.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, Endpoint

router = APIRouter()


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatRequest))
async def chat_completions(request: Request) -> Response:
    return await replica().gateway.relay(Endpoint.CHAT, request)


@router.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
async def completions(request: Request) -> Response:
    return await replica().gateway.relay(Endpoint.COMPLETIONS, request)


@router.post("/v1/embeddings", openapi_extra=json_body(EmbeddingRequest))
async def embeddings(request: Request) -> Response:
    return await replica().gateway.relay(Endpoint.EMBEDDINGS, request)


@router.get("/v1/models")
async def models() -> Response:
    return Response(replica().gateway.openai_models, media_type=JSON)
