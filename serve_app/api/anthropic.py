"""Anthropic's Messages API: vLLM providers serve it natively, others through chat completions.
Errors in Anthropic's shape; `x-api-key` and `anthropic-version` are accepted (keys are checked
where the router checks keys)."""

from fastapi import APIRouter

from serve_app.api.http import relay_route
from serve_app.core.schemas import CountTokensRequest, Endpoint, MessagesRequest

router = APIRouter()
relay_route(router, "/v1/messages", Endpoint.MESSAGES, MessagesRequest, "messages")
relay_route(
    router, "/v1/messages/count_tokens", Endpoint.COUNT_TOKENS, CountTokensRequest, "count_tokens"
)
