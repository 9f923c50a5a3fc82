"""What admission counts for a request against its key's tokens per minute and budget (pure):
its prompt estimate and the most it may generate, so that requests in flight together cannot
pass the limits by what they have yet to generate. The answer's real usage settles the
difference (serve_app/access/gate.py)."""

from __future__ import annotations

from typing import Any

import orjson

from serve_app.core.schemas import Endpoint

# Each operation's fields that bound what it generates, in the order they are read.
_OUTPUT_FIELDS: dict[Endpoint, tuple[str, ...]] = {
    Endpoint.CHAT: ("max_completion_tokens", "max_tokens"),
    Endpoint.COMPLETIONS: ("max_tokens",),
    Endpoint.RESPONSES: ("max_output_tokens",),
    Endpoint.MESSAGES: ("max_tokens",),
}
_OLLAMA_GENERATING = frozenset({Endpoint.OLLAMA_CHAT, Endpoint.OLLAMA_GENERATE})


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def requested_output(endpoint: Endpoint, body: bytes) -> int | None:
    """The most tokens the request may generate, as its body says (`max_tokens`,
    `max_completion_tokens`, `max_output_tokens`, Ollama's `options.num_predict`; times `n`
    choices): 0 for operations that generate nothing (embeddings, token counts), None when
    the body names no bound."""
    if endpoint in _OLLAMA_GENERATING:
        options = orjson.loads(body).get("options")
        return _positive(options.get("num_predict")) if isinstance(options, dict) else None
    fields = _OUTPUT_FIELDS.get(endpoint)
    if fields is None:
        return 0
    doc = orjson.loads(body)
    bound = next((v for f in fields if (v := _positive(doc.get(f))) is not None), None)
    return None if bound is None else bound * (_positive(doc.get("n")) or 1)


def reservation(prompt: int, output: int | None, default: int | None) -> int:
    """Tokens counted for a request when it is admitted: its prompt estimate and its bound on
    what it generates (`output`), else the key's `default_max_tokens`, else nothing more."""
    return prompt + (output if output is not None else default or 0)
