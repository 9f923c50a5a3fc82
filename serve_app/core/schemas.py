"""Client request validation at the HTTP boundary, and the small summary that crosses the hop.

Only the fields the router acts on are typed; everything else passes through to the upstream,
which owns its validation (its 4xx comes back to the client as is).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.core.errors import RouterError
from serve_app.core.tokens import estimate_chat, estimate_sequences


class Endpoint(str, Enum):
    """An operation, named by its path under the API root. The first three are the internal
    form every provider is spoken to in; the others are translated to them unless a provider
    serves them natively (vLLM: Responses and Messages; Ollama: its own API)."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    OLLAMA_CHAT = "api/chat"
    OLLAMA_GENERATE = "api/generate"
    OLLAMA_EMBED = "api/embed"
    OLLAMA_EMBEDDINGS = "api/embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"
    COUNT_TOKENS = "messages/count_tokens"

    @property
    def dialect(self) -> Dialect:
        return _DIALECTS.get(self, "openai")


Dialect = Literal["openai", "ollama", "responses", "anthropic"]
_DIALECTS: dict[Endpoint, Dialect] = {
    Endpoint.OLLAMA_CHAT: "ollama",
    Endpoint.OLLAMA_GENERATE: "ollama",
    Endpoint.OLLAMA_EMBED: "ollama",
    Endpoint.OLLAMA_EMBEDDINGS: "ollama",
    Endpoint.RESPONSES: "responses",
    Endpoint.MESSAGES: "anthropic",
    Endpoint.COUNT_TOKENS: "anthropic",
}
# Operations that never stream.
_UNARY = frozenset(
    {
        Endpoint.EMBEDDINGS,
        Endpoint.OLLAMA_EMBED,
        Endpoint.OLLAMA_EMBEDDINGS,
        Endpoint.COUNT_TOKENS,
    }
)


class Shape(NamedTuple):
    """How many messages a body holds, the most content parts in one of them, its tools."""

    messages: int = 0
    parts: int = 0
    tools: int = 0

    @classmethod
    def of(cls, messages: Sequence[Any], tools: Sequence[Any] | None) -> Shape:
        """Of chat-like messages (`content`: a string or a list of parts)."""
        parts = (len(m.content) if isinstance(m.content, list) else 0 for m in messages)
        return cls(len(messages), max(parts, default=0), _count(tools))


def _count(items: Sequence[Any] | None) -> int:
    return len(items) if items else 0


class BodyLimits(BaseModel):
    """What an inference body may hold besides its bytes (the app's args): a bound on the work
    a request makes the ingress and its upstream do, far above what real clients send."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_messages: int = Field(default=4096, gt=0)  # chat messages, Responses input items
    max_content_parts: int = Field(default=512, gt=0)  # in one message (and Anthropic's system)
    max_tools: int = Field(default=512, gt=0)

    def check(self, shape: Shape) -> None:
        """RouterError 400 (`array_above_max_length`, OpenAI's code) past a limit."""
        for what, param, count, limit in (
            ("messages", "messages", shape.messages, self.max_messages),
            ("content parts in one message", "content", shape.parts, self.max_content_parts),
            ("tools", "tools", shape.tools, self.max_tools),
        ):
            if count > limit:
                raise RouterError(
                    400,
                    f"too many {what}: {count}, at most {limit}",
                    param=param,
                    code="array_above_max_length",
                )


DEFAULT_LIMITS = BodyLimits()


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

    def streams(self) -> bool:
        return bool(self.stream)

    def tokens(self) -> int:
        """The prompt estimate (tokens.py)."""
        raise NotImplementedError

    def tools_needed(self) -> bool:
        return False

    def session(self) -> str:
        """The body's session key for session_affinity (OpenAI's `user`)."""
        user = (self.model_extra or {}).get("user")
        return user if isinstance(user, str) else ""

    def shape(self) -> Shape:
        """What the body holds, for BodyLimits."""
        return Shape()


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None

    def tokens(self) -> int:
        return estimate_chat(self.messages, self.tools or self.functions)

    def tools_needed(self) -> bool:
        return bool(self.tools or self.functions)

    def shape(self) -> Shape:
        return Shape.of(self.messages, self.tools or self.functions)


TokenInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Request):
    prompt: TokenInput

    def tokens(self) -> int:
        return estimate_sequences(self.prompt)


class EmbeddingRequest(_Request):
    input: TokenInput

    def tokens(self) -> int:
        return estimate_sequences(self.input)


# --- Ollama's API: `stream` is true unless false. ---------------------------------------------


class _OllamaRequest(_Request):
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None

    def streams(self) -> bool:
        return self.stream is not False


class OllamaMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class OllamaChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None

    def tokens(self) -> int:
        return estimate_chat(self.messages, self.tools)

    def tools_needed(self) -> bool:
        return bool(self.tools)

    def shape(self) -> Shape:
        return Shape(
            len(self.messages), max(len(m.images or ()) for m in self.messages), _count(self.tools)
        )


class OllamaGenerateRequest(_OllamaRequest):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    images: list[str] | None = None
    format: str | dict[str, Any] | None = None
    raw: bool | None = None
    think: bool | str | None = None

    def tokens(self) -> int:
        return estimate_sequences(self.prompt + (self.system or ""))


class OllamaEmbedRequest(_OllamaRequest):
    input: str | list[str]

    def tokens(self) -> int:
        return estimate_sequences(self.input)


class OllamaEmbeddingsRequest(_OllamaRequest):
    prompt: str

    def tokens(self) -> int:
        return estimate_sequences(self.prompt)


# --- OpenAI Responses ---------------------------------------------------------------------------


class ResponsesRequest(_Request):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    previous_response_id: str | None = None

    def tokens(self) -> int:
        items = [self.input] if isinstance(self.input, str) else self.input
        text = [i if isinstance(i, str) else i.get("content") for i in items]
        return estimate_chat([ContentHolder(t) for t in text], self.tools) + estimate_sequences(
            self.instructions or ""
        )

    def tools_needed(self) -> bool:
        return bool(self.tools)

    def shape(self) -> Shape:
        if isinstance(self.input, str):
            return Shape(1, 0, _count(self.tools))
        return Shape.of([ContentHolder(i.get("content")) for i in self.input], self.tools)


class ContentHolder(NamedTuple):
    """Anything with chat-like `content` (a string or parts with `text`), for the estimate."""

    content: Any


# --- Anthropic Messages -------------------------------------------------------------------------


class AnthropicMessage(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class _AnthropicRequest(_Request):
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None

    def tokens(self) -> int:
        system = [ContentHolder(self.system)] if self.system else []
        return estimate_chat(system + list(self.messages), self.tools)

    def tools_needed(self) -> bool:
        return bool(self.tools)

    def shape(self) -> Shape:
        shape = Shape.of(self.messages, self.tools)
        system = len(self.system) if isinstance(self.system, list) else 0
        return shape._replace(parts=max(shape.parts, system))

    def session(self) -> str:
        """Anthropic's end-user id: `metadata.user_id`."""
        metadata = (self.model_extra or {}).get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
        return user if isinstance(user, str) else ""


class MessagesRequest(_AnthropicRequest):
    max_tokens: int = Field(ge=1)


class CountTokensRequest(_AnthropicRequest):
    pass


_MODELS: dict[Endpoint, type[_Request]] = {
    Endpoint.CHAT: ChatRequest,
    Endpoint.COMPLETIONS: CompletionRequest,
    Endpoint.EMBEDDINGS: EmbeddingRequest,
    Endpoint.OLLAMA_CHAT: OllamaChatRequest,
    Endpoint.OLLAMA_GENERATE: OllamaGenerateRequest,
    Endpoint.OLLAMA_EMBED: OllamaEmbedRequest,
    Endpoint.OLLAMA_EMBEDDINGS: OllamaEmbeddingsRequest,
    Endpoint.RESPONSES: ResponsesRequest,
    Endpoint.MESSAGES: MessagesRequest,
    Endpoint.COUNT_TOKENS: CountTokensRequest,
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
    # session_affinity's key: the `x-session-id` header, else the body's end-user id.
    session: str = ""
    # A provider to try first if it may serve the request: the one that keeps the state this
    # request continues (a Responses `previous_response_id` made on a vLLM with its store).
    prefer: str = ""
    # Flow control: the request's priority (None: the routing's default_priority), its tenant
    # (the client key's id, "" without one) and the tenant's weight, its body's size.
    priority: int | None = None
    tenant: str = ""
    weight: float = 1.0
    size: int = 0
    # The prompt's text block hashes (routing.prefix), for the models that route by them
    # (ModelConfig.routes_by_text); set by the ingress just before the plan call.
    text_blocks: Sequence[int] = ()


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


def validate_request(
    endpoint: Endpoint, body: bytes, request_id: str, limits: BodyLimits = DEFAULT_LIMITS
) -> RequestMeta:
    """Parse and check a body in one pass (pydantic-core parses the JSON itself), then what
    it holds against `limits`."""
    try:
        req = _MODELS[endpoint].model_validate_json(body)
    except ValidationError as exc:
        raise _as_error(exc) from None
    limits.check(req.shape())
    stream = req.streams() and endpoint not in _UNARY
    return RequestMeta(
        endpoint,
        req.model,
        stream,
        req.tokens(),
        req.tools_needed(),
        request_id,
        session=req.session(),
    )


TIMEOUT_HEADER = "x-request-timeout"
SESSION_HEADER = "x-session-id"


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
