"""The inference routes without FastAPI's request machinery, behind the door's checks.

FastAPI's middleware stack, route matching and endpoint call cost an ingress replica about
60 us per request (measured in-process: 70 us through the app, 10 us straight to the endpoint),
and the inference routes use none of it: each reads the raw body and answers with the gateway's
Response. So POSTs to them (api.http.RELAYED) go straight to the gateway; every other request
(model lists, admin, keys, docs, unknown paths) goes to the FastAPI app, which also keeps the
inference routes for the OpenAPI document.

Every HTTP request first passes the door (core/door.py): its Host, when the router answers only
some names, and a JSON Content-Type on a request with a body; refused in the path's dialect
before any route runs. Every answer not relayed by the gateway (which adds it itself) gets
`X-Content-Type-Options: nosniff`, so no browser takes a JSON answer or a console file for
another type.
"""

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.http import RELAYED, dialect_of, error_response, unexpected_error
from serve_app.core.door import content_type_refusal, host_refusal
from serve_app.core.errors import RouterError
from serve_app.ingress.gateway import NOSNIFF, Gateway

_NOSNIFF = [(k.encode(), v.encode()) for k, v in NOSNIFF.items()]


def _nosniff(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *_NOSNIFF]
        await send(message)

    return sending


def _refusal(scope: Scope, allowed_hosts: tuple[str, ...] | None) -> RouterError | None:
    headers = Headers(scope=scope)
    has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
    return host_refusal(headers.get("host"), allowed_hosts) or content_type_refusal(
        scope["method"], headers.get("content-type"), has_body
    )


class LeanRoutes:
    def __init__(
        self, app: ASGIApp, gateway: Gateway, allowed_hosts: tuple[str, ...] | None
    ) -> None:
        self._app = app
        self._gateway = gateway
        self._allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            root = scope.get("root_path", "")
            path = path[len(root) :] if root and path.startswith(root) else path
            endpoint = RELAYED.get(path) if scope["method"] == "POST" else None
            refusal = _refusal(scope, self._allowed_hosts)
            if refusal is not None:
                dialect = dialect_of(path) if endpoint is None else endpoint.dialect
                await error_response(refusal, dialect)(scope, receive, _nosniff(send))
                return
            if endpoint is not None:
                request = Request(scope, receive)
                try:
                    response = await self._gateway.relay(endpoint, request)
                except Exception:
                    response = unexpected_error(request.url.path)
                    send = _nosniff(send)
                await response(scope, receive, send)
                return
            send = _nosniff(send)
        await self._app(scope, receive, send)
