"""Anthropic's Messages API: vLLM providers serve it natively, others through chat completions.
Errors in Anthropic's shape; `x-api-key` and `anthropic-version` are accepted (keys are checked
where the router checks keys)."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve_app.api.http import replica
from serve_app.openapi import json_body
from serve_app.schemas import CountTokensRequest, Endpoint, MessagesRequest

router = APIRouter()


@router.post("/v1/messages", openapi_extra=json_body(MessagesRequest))
async def messages(request: Request) -> Response:
    return await replica().gateway.relay(Endpoint.MESSAGES, request)


@router.post("/v1/messages/count_tokens", openapi_extra=json_body(CountTokensRequest))
async def count_tokens(request: Request) -> Response:
    return await replica().gateway.relay(Endpoint.COUNT_TOKENS, request)
