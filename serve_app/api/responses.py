"""OpenAI's Responses API: vLLM providers serve it natively, others through chat completions;
the router keeps the responses (serve_app/conversations) for `previous_response_id`, these id
routes and background mode. A key sees only its own responses (404 for the others', never 403);
the admin token sees all."""

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from serve_app.api.admin import json_response
from serve_app.api.http import relay_route, replica
from serve_app.conversations.chain import RUNNING
from serve_app.core.errors import RouterError
from serve_app.core.schemas import Endpoint, ResponsesRequest
from serve_app.dialects.responses import replay
from serve_app.dialects.translate import SSE

router = APIRouter()
relay_route(router, "/v1/responses", Endpoint.RESPONSES, ResponsesRequest, "create_response")


def _owner(request: Request) -> str | None:
    """Whose responses the caller may see: None (all) with the admin token, else its key's."""
    served = replica()
    if served.admin.holds_token(request):
        return None
    return served.gate.owner(request.headers)


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str, stream: bool = False) -> Response:
    """The stored response; `stream=true` replays a finished one as its stream's events."""
    owner = _owner(request)
    response = await replica().gateway.conversations.get(response_id, owner)
    if not stream:
        return json_response(response)
    if response.get("status") in RUNNING:
        raise RouterError(
            400,
            "a running background response is not streamed; poll it without `stream`",
            param="stream",
            code="unsupported_parameter",
        )
    return Response(replay(response), media_type=SSE)


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> Response:
    owner = _owner(request)
    return json_response(await replica().gateway.conversations.delete(response_id, owner))


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str) -> Response:
    owner = _owner(request)
    return json_response(await replica().gateway.conversations.cancel(response_id, owner))


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    request: Request,
    response_id: str,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    limit: int = Query(default=20, ge=1, le=100),
) -> Response:
    owner = _owner(request)
    conversations = replica().gateway.conversations
    return json_response(await conversations.input_items(response_id, owner, order, after, limit))
