"""For operators and load balancers: liveness (`/healthz`, llm-router's `/ping`) and Prometheus
`/metrics` for the whole app."""

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from serve_app.api.http import replica
from serve_app.upstreams.base import JSON

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


@router.get("/ping")
async def ping() -> PlainTextResponse:
    return PlainTextResponse("pong")


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus text for the whole app (every replica's totals, provider health)."""
    return await replica().metrics()
