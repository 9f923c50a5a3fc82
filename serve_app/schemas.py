"""Client request validation at the HTTP boundary, and the small summary that crosses the hop.

Only the fields the router acts on are typed; everything else passes through to the upstream,
which owns its validation (its 4xx comes back to the client as is).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.errors import RouterError
from serve_app.tokens import estimate_chat, estimate_sequences


class Endpoint(str, Enum):
    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class _Request(_Strict):
    model: str = Field(min_length=1)
    stream: bool | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None


TokenInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Request):
    prompt: TokenInput


class EmbeddingRequest(_Request):
    input: TokenInput


_MODELS: dict[Endpoint, type[_Request]] = {
    Endpoint.CHAT: ChatRequest,
    Endpoint.COMPLETIONS: CompletionRequest,
    Endpoint.EMBEDDINGS: EmbeddingRequest,
}


class RequestMeta(NamedTuple):
    """What the router needs to choose a provider; a tuple so the hop pickles it cheaply."""

    endpoint: Endpoint
    model: str
    stream: bool
    prompt_tokens: int
    needs_tools: bool
    request_id: str
    # The client's deadline (`x-request-timeout`), seconds; the model type's limit still applies.
    timeout_s: float | None = None


def _as_error(exc: ValidationError) -> RouterError:
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return RouterError(400, f"invalid JSON body: {err['msg']}", code="invalid_json")
    if err["type"] in ("model_type", "model_attributes_type") and not err["loc"]:
        return RouterError(400, "request body must be a JSON object", code="invalid_json")
    loc = ".".join(str(p) for p in err["loc"])
    param = str(err["loc"][0]) if err["loc"] else None
    code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
    return RouterError(400, f"{loc}: {err['msg']}", param=param, code=code)


def validate_request(endpoint: Endpoint, body: bytes, request_id: str) -> RequestMeta:
    """Parse and check a body in one pass (pydantic-core parses the JSON itself)."""
    try:
        req = _MODELS[endpoint].model_validate_json(body)
    except ValidationError as exc:
        raise _as_error(exc) from None
    if isinstance(req, ChatRequest):
        tools = req.tools or req.functions
        tokens = estimate_chat(req.messages, tools)
        needs_tools = bool(tools)
    else:
        tokens = estimate_sequences(req.prompt if isinstance(req, CompletionRequest) else req.input)
        needs_tools = False
    stream = bool(req.stream) and endpoint is not Endpoint.EMBEDDINGS
    return RequestMeta(endpoint, req.model, stream, tokens, needs_tools, request_id)


TIMEOUT_HEADER = "x-request-timeout"


def parse_timeout(value: str | None) -> float | None:
    """The `x-request-timeout` header: seconds, a positive number."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise RouterError(
            400, f"{TIMEOUT_HEADER} must be a positive number of seconds", param=TIMEOUT_HEADER
        )
    return seconds
