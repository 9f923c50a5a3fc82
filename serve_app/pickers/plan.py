"""What the ingress and a model type's picker say to each other.

The ingress asks for a Plan (small: the request's RequestMeta, with its prompt's text block
hashes where the model routes by them, and for kv_aware its KV block keys; never the body),
calls the plan's providers itself, and tells the picker what happened as Events, batched and
off the request path. Tuples, so the hop pickles them cheaply.
"""

from __future__ import annotations

from typing import NamedTuple

from serve_app.core.config import ProviderConfig
from serve_app.core.errors import RouterError

PROVIDER_HEADER = "x-router-provider"
ATTEMPTS_HEADER = "x-router-attempts"
# Set on answers that say the model cannot be served at all (the ingress then tries the
# model's fallback_model; it never reaches the client).
UNSERVABLE_HEADER = "x-router-unservable"
UNSERVABLE = frozenset(
    {
        "no_healthy_provider",
        "all_providers_busy",
        "no_free_provider",
        "upstream_unavailable",
        "upstream_rate_limited",
    }
)


class Head(NamedTuple):
    """The first item of every answer: what the ingress needs before any body byte."""

    status: int
    content_type: str
    headers: dict[str, str]


class Unary(NamedTuple):
    head: Head
    body: bytes


def error_answer(err: RouterError) -> Unary:
    headers = dict(err.headers)
    if err.code in UNSERVABLE:
        headers[UNSERVABLE_HEADER] = "1"
    return Unary(Head(err.status, "application/json", headers), err.body())


class Spare(NamedTuple):
    """A plan made ahead for a later request of the same model (see Plan.spares)."""

    plan_id: str
    targets: tuple[ProviderConfig, ...]


class Plan(NamedTuple):
    """Where one request goes: the providers to try, in order, booked for it by `picker` (one
    replica of the model type's picker deployment) under `plan_id` until the ingress reports
    it done. `more`: a slot strategy's plan; when its providers fail, ask the picker for the
    next (`Picker.next`). `error`: the request can go nowhere; answer it. `spares`: plans the
    picker made and booked ahead, in its strategy's order, for the ingress's next requests of
    this model (only where the strategy's choice depends on nothing in the request but its
    size and tools); the ingress uses them for GRANT_S or gives them back. `queued`: every
    provider is full and the request waits in the picker's queue under the ticket `plan_id`
    (flow control; the ingress then asks `Picker.wait`); `waited`: how long it waited.
    `hits` (kv_aware): the prompt tokens each target's engine is predicted to serve from its
    cache, which the ingress holds to the `cached_tokens` the engine reports."""

    plan_id: str
    picker: str
    targets: tuple[ProviderConfig, ...]
    more: bool = False
    error: Unary | None = None
    spares: tuple[Spare, ...] = ()
    queued: bool = False
    waited: float = 0.0
    hits: tuple[int, ...] = ()


class Event(NamedTuple):
    """One outcome of a plan: `outcome` is "ok" (the provider's answer began, `seconds` after
    it was called), "done" (the request ended; what the plan booked comes back), or why an
    attempt failed ("HTTP 503", "timed out", ...; `status` and `retry_after` from the answer
    when there was one)."""

    plan_id: str
    provider: str
    outcome: str
    status: int | None = None
    retry_after: str | None = None
    seconds: float = 0.0


OK = "ok"
DONE = "done"


class Report(NamedTuple):
    """What one ingress replica tells one picker replica: new events, and the plans still
    under way (a plan that stops being listed comes back after the picker's PLAN_TTL_S, e.g.
    when its ingress replica died)."""

    holder: str
    events: list[Event]
    open: list[str]
