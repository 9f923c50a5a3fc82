"""For operators and load balancers: liveness (`/healthz`, llm-router's `/ping`) and Prometheus
`/metrics` for the whole app (the admin token's: it names every model, provider and key)."""

from fastapi import APIRouter, Request
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
async def metrics(request: Request) -> Response:
    """Prometheus text for the whole app (every replica's totals, provider health)."""
    served = replica()
    served.admin.check(request)
    return await served.metrics()
