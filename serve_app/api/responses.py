"""OpenAI's Responses API: vLLM providers serve it natively, others through chat completions."""

from fastapi import APIRouter

from serve_app.api.http import relay_route
from serve_app.core.schemas import Endpoint, ResponsesRequest

router = APIRouter()
relay_route(router, "/v1/responses", Endpoint.RESPONSES, ResponsesRequest, "create_response")
