"""Who may call the admin API (`/api/v1/...`): holders of $LLM_ROUTER_ADMIN_TOKEN, and no one
when it is unset (the endpoints answer 503 rather than run open)."""

from __future__ import annotations

import hmac

from serve_app.core.errors import RouterError

ADMIN_TOKEN_ENV = "LLM_ROUTER_ADMIN_TOKEN"


def admin_refusal(authorization: str | None, expected: str | None) -> RouterError | None:
    """None when `authorization` carries the admin token; else the error to answer with."""
    if not expected:
        return RouterError(
            503,
            f"the admin API is disabled: set {ADMIN_TOKEN_ENV} in the router's environment",
            type="api_error",
            code="admin_disabled",
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return RouterError(
            401,
            "the admin API needs an `Authorization: Bearer <token>` header",
            type="authentication_error",
            code="missing_admin_token",
            headers={"www-authenticate": "Bearer"},
        )
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        return RouterError(
            403, "wrong admin token", type="permission_error", code="invalid_admin_token"
        )
    return None
