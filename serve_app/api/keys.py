"""Client keys (admin token): made, listed, shown with their usage, revoked. A key is shown
once, when it is made; the registry keeps only its salted hash."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve_app.access.keys import KeyLimits, KeyRecord
from serve_app.access.limiter import limiter_handle
from serve_app.api.admin import admin_from, json_response, relayed, validated_body
from serve_app.api.gateway import router_error
from serve_app.api.http import error_response
from serve_app.errors import RouterError
from serve_app.openapi import json_body

router = APIRouter()


@router.post("/api/v1/keys", openapi_extra=json_body(KeyLimits))
async def create_key(request: Request) -> Response:
    try:
        admin = admin_from(request)
        limits = await validated_body(request, KeyLimits, "invalid_key")
        return relayed(await admin.call("create_key", limits, admin.settings.ack_timeout_s))
    except RouterError as err:
        return error_response(err)


@router.get("/api/v1/keys")
async def list_keys(request: Request) -> Response:
    try:
        records = await admin_from(request).call("keys")
    except RouterError as err:
        return error_response(err)
    assert isinstance(records, list)
    return json_response({"data": [r.public() for r in records]})


@router.get("/api/v1/keys/{key_id}")
async def show_key(key_id: str, request: Request) -> Response:
    """The key's record and its usage: tokens and requests per model, and its budget period."""
    try:
        admin = admin_from(request)
        records = await admin.call("keys")
        assert isinstance(records, list)
        record = next((r for r in records if isinstance(r, KeyRecord) and r.id == key_id), None)
        if record is None:
            raise RouterError(404, f"no client key {key_id[:64]!r}", code="key_not_found")
        try:
            usage = await asyncio.wait_for(limiter_handle(admin.registry).usage.remote(key_id), 5.0)
        except Exception:
            raise router_error(503, "usage is unavailable") from None
    except RouterError as err:
        return error_response(err)
    return json_response(record.public() | {"usage": usage})


@router.delete("/api/v1/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> Response:
    """Every replica refuses the key once this answers."""
    try:
        admin = admin_from(request)
        return relayed(await admin.call("delete_key", key_id, admin.settings.ack_timeout_s))
    except RouterError as err:
        return error_response(err)
