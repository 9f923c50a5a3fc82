"""OpenAI-style errors: the one shape every client of this router receives on failure."""

from __future__ import annotations

import orjson


class RouterError(Exception):
    """A request that ends with an HTTP error the client can act on (never a 500 traceback)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


# How much of a client's text an error message quotes back.
QUOTE_CHARS = 256


def quoted(text: str) -> str:
    """`text` as an error message quotes it: repr, cut to QUOTE_CHARS characters."""
    return repr(text[:QUOTE_CHARS]) + ("..." if len(text) > QUOTE_CHARS else "")


def model_not_found(model: str) -> RouterError:
    return RouterError(
        404, f"the model {quoted(model)} does not exist", code="model_not_found", param="model"
    )


def key_not_found(key_id: str) -> RouterError:
    return RouterError(404, f"no client key {quoted(key_id)}", code="key_not_found", param="id")


class BadUpstream(RouterError):
    """An upstream answer the router cannot read, translate, or hold (past a size bound): a 502,
    and a failure of the provider that sent it. `reason` names it in outcomes and metrics."""

    def __init__(self, message: str, reason: str = "bad answer") -> None:
        super().__init__(502, message, type="api_error", code="bad_upstream_response")
        self.reason = reason


def adapter_unavailable(name: str) -> RouterError:
    """A registered adapter that no server has loaded right now (they restarted and the registry
    is loading it again, or every load failed): a retry can succeed, unlike an unknown model."""
    return RouterError(
        503,
        f"the adapter {quoted(name)} is not loaded on any server right now; retry shortly",
        type="api_error",
        code="adapter_unavailable",
        param="model",
        headers={"retry-after": "2"},
    )


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """The event that ends a stream which broke after its first byte."""
    return b"data: " + error_body(message, "api_error", code) + b"\n\n"
