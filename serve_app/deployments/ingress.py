"""The HTTP front: validates a request, picks its model type's router, relays the answer.

No `from __future__ import annotations` here: Serve rebuilds the endpoint signatures and FastAPI
must see real `Request` annotations, not strings.

The body crosses the hop as the client's raw bytes plus a small RequestMeta tuple, so it is
parsed once here (by pydantic-core) and re-encoded only where an upstream needs another shape.
"""

import logging
import uuid
from collections.abc import AsyncIterator

import orjson
import ray.serve.context
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException

from serve_app.coalesce import Coalescer
from serve_app.config import RouterConfig
from serve_app.dispatch import Head, Unary
from serve_app.errors import RouterError, model_not_found
from serve_app.handler import ApiModelConfig
from serve_app.providers.base import JSON
from serve_app.schemas import Endpoint, RequestMeta, validate_request
from serve_app.serve_env import REPLICA_CPUS

log = logging.getLogger("ray.serve")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

api = FastAPI(
    title="serve-router", version="0.1.0", description="OpenAI-compatible LLM router on Ray Serve"
)


def _error(err: RouterError) -> Response:
    return Response(err.body(), status_code=err.status, media_type=JSON, headers=err.headers)


def _request_id() -> str:
    """Serve's id for this request: the client's `x-request-id` if it sent one, else generated.

    Serve also writes it back as the response's `x-request-id`, so the router does not.
    """
    return ray.serve.context._get_serve_request_context().request_id or uuid.uuid4().hex


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error(RouterError(exc.status_code, str(exc.detail), code=code))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return _error(RouterError(400, str(exc.errors()[0].get("msg", "invalid request"))))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error in the ingress")
    return _error(
        RouterError(500, "internal error in the router", type="api_error", code="internal_error")
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RouterError(413, f"request body over {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RouterError(413, f"request body over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _rest(gen: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """The stream's body; a client that leaves early cancels the router's call (and upstream)."""
    finished = False
    try:
        async for chunk in gen:
            yield chunk
        finished = True
    finally:
        if not finished:
            gen.cancel()


def _coalescer(handle: DeploymentHandle) -> Coalescer[tuple[bytes, RequestMeta], Unary]:
    one = handle.options(method_name="unary")
    many = handle.options(method_name="unary_many", stream=True)

    async def send_one(call: tuple[bytes, RequestMeta]) -> Unary:
        return await one.remote(*call)

    def send_many(calls: list[tuple[bytes, RequestMeta]]) -> AsyncIterator[tuple[int, Unary]]:
        return many.remote(calls)

    return Coalescer(send_one, send_many)


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=2000)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        routers: dict[str, DeploymentHandle],
        config: RouterConfig,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._type_of = config.model_type_of()
        self._unary = {t: _coalescer(h) for t, h in routers.items()}
        self._stream = {t: h.options(method_name="stream", stream=True) for t, h in routers.items()}
        self._max_body = max_body_bytes
        self._models = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": group}
                    for group, names in ApiModelConfig(config).active_names().items()
                    for name in names
                ],
            }
        )

    async def _relay(self, endpoint: Endpoint, request: Request) -> Response:
        request_id = _request_id()
        try:
            body = await read_body(request, self._max_body)
            meta = validate_request(endpoint, body, request_id)
            model_type = self._type_of.get(meta.model)
            if model_type is None:
                raise model_not_found(meta.model)
        except RouterError as err:
            return _error(err)
        try:
            if meta.stream:
                return await self._streamed(self._stream[model_type].remote(body, meta))
            head, out = await self._unary[model_type].call((body, meta))
        except Exception:
            log.exception("router call failed", extra={"request_id": request_id})
            return _error(
                RouterError(
                    503,
                    "the router for this model is unavailable; retry",
                    type="api_error",
                    code="router_unavailable",
                )
            )
        return Response(
            out, status_code=head.status, media_type=head.content_type, headers=head.headers
        )

    async def _streamed(self, gen: DeploymentResponseGenerator) -> Response:
        head: Head = await gen.__anext__()
        if head.status != 200:
            out = b"".join([chunk async for chunk in gen])
            return Response(
                out, status_code=head.status, media_type=head.content_type, headers=head.headers
            )
        return StreamingResponse(
            _rest(gen),
            status_code=head.status,
            media_type=head.content_type,
            headers={**head.headers, "cache-control": "no-cache"},
        )

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._relay(Endpoint.CHAT, request)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._relay(Endpoint.COMPLETIONS, request)

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._relay(Endpoint.EMBEDDINGS, request)

    @api.get("/v1/models")
    async def models(self) -> Response:
        return Response(self._models, media_type=JSON)

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)
