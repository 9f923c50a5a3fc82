"""Client keys (admin token): made, listed, shown with their usage, revoked. A key is shown
once, when it is made; the registry keeps only its salted hash."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from serve_app.access.history import Window
from serve_app.access.keys import KeyLimits, KeyRecord
from serve_app.access.limiter import limiter_handle
from serve_app.api.admin import Admin, admin_from, json_response, relayed, validated_body
from serve_app.api.openapi import json_body
from serve_app.core.errors import key_not_found
from serve_app.ingress.gateway import router_error

router = APIRouter()


def _record(admin: Admin, key_id: str) -> KeyRecord:
    """The key's record in this replica's manifest (every replica has it once its POST answered)."""
    record = admin.follower.state.keys.get(key_id)
    if record is None:
        raise key_not_found(key_id)
    return record


@router.post("/api/v1/keys", openapi_extra=json_body(KeyLimits))
async def create_key(request: Request) -> Response:
    admin = admin_from(request)
    limits = await validated_body(request, KeyLimits, "invalid_key")
    return relayed(await admin.call("create_key", limits, admin.settings.ack_timeout_s))


@router.get("/api/v1/keys")
async def list_keys(request: Request) -> Response:
    keys = admin_from(request).follower.state.keys
    return json_response({"data": [r.public() for r in keys.values()]})


@router.get("/api/v1/keys/{key_id}")
async def show_key(key_id: str, request: Request) -> Response:
    """The key's record and its usage: tokens and requests per model, and its budget period."""
    admin = admin_from(request)
    record = _record(admin, key_id)
    try:
        usage = await asyncio.wait_for(limiter_handle(admin.registry).usage.remote(key_id), 5.0)
    except Exception:
        raise router_error(503, "usage is unavailable") from None
    return json_response(record.public() | {"usage": usage})


@router.put("/api/v1/keys/{key_id}", openapi_extra=json_body(KeyLimits))
async def update_key(key_id: str, request: Request) -> Response:
    """Replace the key's name and limits (the key itself stays the same); every replica
    applies them once this answers."""
    admin = admin_from(request)
    _record(admin, key_id)
    limits = await validated_body(request, KeyLimits, "invalid_key")
    return relayed(await admin.call("update_key", key_id, limits, admin.settings.ack_timeout_s))


@router.get("/api/v1/keys/{key_id}/usage")
async def key_usage_history(
    key_id: str, request: Request, window: Annotated[Window, Query()] = "1h"
) -> Response:
    """The key's usage per model over the last hour (minute buckets), day (hourly) or 30 days
    (daily): requests, prompt and completion tokens per bucket, oldest first."""
    admin = admin_from(request)
    _record(admin, key_id)
    try:
        history = await asyncio.wait_for(
            limiter_handle(admin.registry).history.remote(key_id, window), 5.0
        )
    except Exception:
        raise router_error(503, "usage is unavailable") from None
    return json_response(history)


@router.delete("/api/v1/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> Response:
    """Every replica refuses the key once this answers."""
    admin = admin_from(request)
    return relayed(await admin.call("delete_key", key_id, admin.settings.ack_timeout_s))
