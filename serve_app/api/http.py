"""What every API surface shares: the replica's state, bodies, errors in the client's dialect.

No `from __future__ import annotations` in the surface modules: FastAPI reads the endpoint
signatures at run time and must see real `Request` annotations.
"""

import asyncio
import logging
import uuid
from typing import Any

import ray.serve.context
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException

from serve_app.api.openapi import json_body
from serve_app.core.errors import RouterError
from serve_app.core.schemas import Dialect, Endpoint
from serve_app.dialects.translate import error_in_dialect
from serve_app.upstreams.base import JSON

log = logging.getLogger("ray.serve")


def replica() -> Any:
    """The ingress replica serving this request (it holds the gateway and the admin state)."""
    return serve.get_replica_context().servable_object


def request_id() -> str:
    """Serve's id for this request: the client's `x-request-id` if it sent one, else generated.

    Serve also writes it back as the response's `x-request-id`, so the router does not.
    """
    return ray.serve.context._get_serve_request_context().request_id or uuid.uuid4().hex


def error_response(err: RouterError, dialect: Dialect = "openai") -> Response:
    body = error_in_dialect(dialect, err.status, err.body())
    return Response(body, status_code=err.status, media_type=JSON, headers=err.headers)


def dialect_of(path: str) -> Dialect:
    """The dialect a path belongs to, for errors raised before an endpoint runs."""
    if path.startswith("/api/") and not path.startswith("/api/v1/"):
        return "ollama"
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai"


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes, and with 408
    (the connection closed) when it has not all come within `timeout_s`: a client trickling
    its body holds a connection and a replica's memory no longer than that."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RouterError(413, f"request body over {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RouterError(
                        413, f"request body over {limit} bytes", code="request_too_large"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RouterError(
            408,
            f"the request body did not arrive within {timeout_s:g} s",
            code="request_timeout",
            headers={"connection": "close"},
        ) from None
    return b"".join(chunks)


def install_error_handlers(app: FastAPI) -> None:
    """A RouterError raised by an endpoint, unknown routes, wrong methods and anything
    unexpected answer in the path's dialect."""

    @app.exception_handler(RouterError)
    async def _router_error(request: Request, exc: RouterError) -> Response:
        return error_response(exc, dialect_of(request.url.path))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = RouterError(exc.status_code, str(exc.detail), code=code)
        return error_response(err, dialect_of(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        err = RouterError(400, str(exc.errors()[0].get("msg", "invalid request")))
        return error_response(err, dialect_of(request.url.path))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return unexpected_error(request.url.path)


def unexpected_error(path: str) -> Response:
    """A 500 in the path's dialect for an exception no endpoint expected (logged with it)."""
    log.exception("unexpected error in the ingress")
    err = RouterError(500, "internal error in the router", type="api_error", code="internal_error")
    return error_response(err, dialect_of(path))


# POST path -> the operation, of every route whose whole job is the gateway's relay (the lean
# path in api/lean.py serves them without FastAPI).
RELAYED: dict[str, Endpoint] = {}


def relay_route(
    router: APIRouter, path: str, endpoint: Endpoint, body: type[BaseModel], name: str
) -> None:
    """A POST route that hands the request to the gateway (its OpenAPI entry documents `body`;
    the endpoint's name is the operation's)."""

    async def relay(request: Request) -> Response:
        return await replica().gateway.relay(endpoint, request)

    router.add_api_route(path, relay, methods=["POST"], openapi_extra=json_body(body), name=name)
    RELAYED[path] = endpoint
