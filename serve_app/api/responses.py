"""OpenAI's Responses API: vLLM providers serve it natively, others through chat completions."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve_app.api.http import replica
from serve_app.openapi import json_body
from serve_app.schemas import Endpoint, ResponsesRequest

router = APIRouter()


@router.post("/v1/responses", openapi_extra=json_body(ResponsesRequest))
async def create_response(request: Request) -> Response:
    return await replica().gateway.relay(Endpoint.RESPONSES, request)
