"""The ingress carries the bytes: it calls the providers of a plan itself, in order, and relays
the first answer (translated where the provider speaks another wire format). It fails over
before the answer's first byte; after it, a break or the deadline ends a stream with an error
event in the client's dialect. Every attempt's outcome goes to the plan's picker (outcomes.py),
off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import NamedTuple, Protocol

import aiohttp

from serve_app.cluster.registry.manifest import is_lora_name
from serve_app.core.config import ProviderConfig, RoutingConfig
from serve_app.core.errors import BadUpstream, RouterError, adapter_unavailable
from serve_app.core.metrics import (
    KV_PREDICTED_METRIC,
    KV_PREDICTIONS_METRIC,
    KV_REPORTED_METRIC,
    Tally,
)
from serve_app.core.schemas import RequestMeta
from serve_app.dialects.translate import STREAM_TYPES, stream_error
from serve_app.dialects.usage import cached_tokens
from serve_app.ingress.outcomes import Reporter
from serve_app.pickers.picker import retry_seconds
from serve_app.pickers.plan import (
    ATTEMPTS_HEADER,
    OK,
    PROVIDER_HEADER,
    Event,
    Head,
    Plan,
    Unary,
    error_answer,
)
from serve_app.upstreams import prepare
from serve_app.upstreams.base import JSON, Exchange
from serve_app.upstreams.checks import Body, Decoder, StreamCheck

log = logging.getLogger("ray.serve")

UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ValueError)
ATTEMPTS_METRIC = "llm_router_upstream_attempts"
# How long the request waited in its picker's queue (flow control), milliseconds.
QUEUED_HEADER = "x-router-queued-ms"


class Streamed(NamedTuple):
    """A stream whose first bytes have come: its head, the rest of its body, and `end`, which
    ends the upstream call and the plan (the body's end calls it; call it too in case the body
    is never iterated, e.g. a client that left at once)."""

    head: Head
    body: AsyncIterator[bytes]
    end: Callable[[], None]


class _End:
    """Ends a relayed stream once: the upstream connection back to the pool (or closed, so the
    upstream stops generating, when the body did not finish) and the plan reported done."""

    def __init__(self, reporter: Reporter, route: Route, resp: aiohttp.ClientResponse) -> None:
        self._reporter, self._route, self._resp = reporter, route, resp
        self._ended = False

    def __call__(self, finished: bool = False) -> None:
        if self._ended:
            return
        self._ended = True
        if finished:
            self._resp.release()
        else:
            self._resp.close()
        plan = self._route.plan
        self._reporter.closed(self._route.key, plan.plan_id, at_once=plan.more)


class Planner(Protocol):
    """The picker deployment a plan came from, as the relay sees it (ingress/picking.py)."""

    model_type: str

    async def next(self, plan: Plan) -> Plan:
        """A slot plan's next provider."""

    def failed(self, model: str, provider: str) -> None:
        """A provider of the model failed an attempt."""


class Keeper(NamedTuple):
    """The provider that keeps the state a request continues (a vLLM with its Responses store),
    and the body it gets: the short form that names the state. Every other provider gets the
    whole request; a 404 from the keeper (it restarted and lost the state) goes on to them."""

    provider: str
    body: bytes


class Limits(NamedTuple):
    """How one model's upstream calls are bounded (its routing settings)."""

    timeout: aiohttp.ClientTimeout  # connect, and each read
    answer_bytes: int  # a unary answer, whole
    event_bytes: int  # one event of a stream (an SSE event, an Ollama line)


def call_limits(routing: RoutingConfig) -> Limits:
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=routing.connect_timeout_s,
        sock_connect=routing.connect_timeout_s,
        sock_read=routing.read_timeout_s,
    )
    return Limits(timeout, routing.max_answer_bytes, routing.max_event_bytes)


class Route(NamedTuple):
    """One request's plan and how to go on with it."""

    plan: Plan
    link: Planner  # its picker deployment: a slot plan's next provider, failures
    limits: Limits  # the model's (call_limits)
    keeper: Keeper | None = None

    @property
    def key(self) -> tuple[str, str]:
        """Where its outcomes go: (model type, picker replica)."""
        return self.link.model_type, self.plan.picker


class Deadline(NamedTuple):
    """A request's deadline: when (the event loop's clock) and its length (for the message)."""

    at: float
    seconds: float

    @classmethod
    def within(cls, seconds: float) -> Deadline:
        return cls(asyncio.get_running_loop().time() + seconds, seconds)

    @property
    def past(self) -> bool:
        return asyncio.get_running_loop().time() >= self.at

    def error(self) -> RouterError:
        return RouterError(
            504,
            f"the request did not finish within its {self.seconds:g} s deadline",
            type="api_error",
            code="deadline_exceeded",
        )


class _Failure(NamedTuple):
    reason: str
    status: int | None = None
    retry_after: str | None = None


def _retryable(status: int, provider: ProviderConfig) -> bool:
    """Worth another provider: busy, broken, or without this adapter version (a restarted vLLM
    forgot it, and the registry has not yet noticed and loaded it again)."""
    return status == 429 or status >= 500 or (status == 404 and is_lora_name(provider.model_path))


class _Attempts:
    """One request's attempts along its plan: the providers in order (a slot plan asks its
    picker for the next), each outcome reported, the failures kept for the final error."""

    def __init__(self, relay: Relay, route: Route, meta: RequestMeta) -> None:
        self._relay, self._route, self._meta = relay, route, meta
        self.failures: list[tuple[str, _Failure]] = []
        self._started = 0.0
        self._keeper = route.keeper  # None once it said it lost the state
        self._again = False  # the keeper is asked again with the whole request

    async def providers(self) -> AsyncIterator[ProviderConfig]:
        plan = self._route.plan
        while True:
            for provider in plan.targets:
                self._started = time.monotonic()
                yield provider
                if self._again:
                    self._again = False
                    yield provider
            if not plan.more or not plan.targets:
                return
            plan = await self._route.link.next(plan)

    def body(self, provider: ProviderConfig, body: bytes) -> bytes:
        """What `provider` gets: the keeper the short form, every other the whole request."""
        keeper = self._keeper
        return keeper.body if keeper is not None and keeper.provider == provider.id else body

    def retryable(self, status: int, provider: ProviderConfig) -> bool:
        """Worth another provider (see _retryable); a keeper that lost the state (404) is
        asked again at once with the whole request."""
        keeper = self._keeper
        if status == 404 and keeper is not None and keeper.provider == provider.id:
            self._keeper, self._again = None, True
            return True
        return _retryable(status, provider)

    def failed(self, provider: ProviderConfig, failure: _Failure) -> None:
        route = self._route
        if not self._again:  # (a keeper that lost the state is asked again: its health is fine)
            event = Event(
                route.plan.plan_id, provider.id, failure.reason, failure.status, failure.retry_after
            )
            self._relay.reporter.event(route.key, event, at_once=True)
            route.link.failed(self._meta.model, provider.id)
        self._relay.tally.inc(ATTEMPTS_METRIC, (provider.id, failure.reason))
        self.failures.append((provider.id, failure))
        log.warning(
            "upstream attempt failed",
            extra={
                "request_id": self._meta.request_id,
                "provider": provider.id,
                "reason": failure.reason,
            },
        )

    def predicted(self, provider: ProviderConfig) -> int | None:
        """The cached prompt tokens the plan predicted for `provider` (kv_aware), else None."""
        plan = self._route.plan
        if plan.hits:
            for target, hit in zip(plan.targets, plan.hits, strict=True):
                if target.id == provider.id:
                    return hit
        return None

    def reported(self, predicted: int, raw: bytes) -> bool:
        """Holds the prediction to the cached tokens `raw` (the upstream's answer or one of
        its stream chunks) reports, if it reports them; whether it did."""
        cached = cached_tokens(raw)
        if cached is None:
            return False
        result = "exact" if cached == predicted else "over" if predicted > cached else "under"
        count_prediction(self._relay.tally, self._meta.model, result, predicted, cached)
        return True

    def answered(self, provider: ProviderConfig) -> dict[str, str]:
        """The provider's answer began; the answer's headers."""
        seconds = time.monotonic() - self._started
        self._relay.reporter.event(
            self._route.key, Event(self._route.plan.plan_id, provider.id, OK, seconds=seconds)
        )
        self._relay.tally.inc(ATTEMPTS_METRIC, (provider.id, "ok"))
        headers = {PROVIDER_HEADER: provider.id, ATTEMPTS_HEADER: str(len(self.failures) + 1)}
        if waited := self._route.plan.waited:
            headers[QUEUED_HEADER] = f"{waited * 1000:.0f}"
        return headers

    def exhausted(self) -> RouterError:
        model, failures = self._meta.model, [f for _, f in self.failures]
        if failures and all(f.status == 404 for f in failures):
            # Only adapter 404s are retried: every server tried has just lost this version (a
            # restart the registry has not seen yet), and it will load it again.
            return adapter_unavailable(model)
        detail = "; ".join(f"{pid}: {f.reason}" for pid, f in self.failures)
        if failures and all(f.status == 429 for f in failures):
            waits = [f.retry_after for f in failures if f.retry_after]
            return RouterError(
                429,
                f"every provider of model {model} is rate limited ({detail})",
                type="rate_limit_error",
                code="upstream_rate_limited",
                headers={"retry-after": min(waits, key=retry_seconds) if waits else "1"},
            )
        return RouterError(
            503,
            f"no provider of model {model} could serve the request ({detail})",
            type="api_error",
            code="upstream_unavailable",
        )


PREDICTION_RESULTS = ("exact", "over", "under")


def count_prediction(
    tally: Tally, model: str, result: str | None, predicted: int = 0, cached: int = 0
) -> None:
    """One kv_aware prediction held to the server's count; with `result` None, the model's
    series made at 0 (a dashboard has them before the first answer)."""
    for each in PREDICTION_RESULTS:
        tally.inc(KV_PREDICTIONS_METRIC, (model, each), 1 if each == result else 0)
    tally.inc(KV_PREDICTED_METRIC, (model,), predicted)
    tally.inc(KV_REPORTED_METRIC, (model,), cached)


class Relay:
    def __init__(self, session: aiohttp.ClientSession, reporter: Reporter, tally: Tally) -> None:
        self.session, self.reporter, self.tally = session, reporter, tally

    async def call(
        self, route: Route, body: bytes, meta: RequestMeta, deadline: Deadline
    ) -> Unary | Streamed:
        """The request's answer along its plan, by `deadline` (the whole request's: the plan's
        wait for a slot and a fallback model's plan count too): a Unary (a stream that failed
        before its first byte is one too), or a Streamed whose body the caller relays."""
        plan = route.plan
        if plan.error is not None:
            return plan.error
        self.reporter.opened(route.key, plan.plan_id)
        attempts = _Attempts(self, route, meta)
        streamed = False
        try:
            if meta.stream:
                answer = await self._stream(route, attempts, body, meta, deadline)
                streamed = isinstance(answer, Streamed)
                return answer
            return await self._unary(route, attempts, body, meta, deadline)
        finally:
            if not streamed:
                self.reporter.closed(route.key, plan.plan_id, at_once=plan.more)

    def _post(
        self, exchange: Exchange, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.client._RequestContextManager:
        """The exchange's upstream call (awaited, or used as a context manager)."""
        return self.session.post(
            exchange.url, data=exchange.body, headers=exchange.headers, timeout=timeout
        )

    async def _unary(
        self,
        route: Route,
        attempts: _Attempts,
        body: bytes,
        meta: RequestMeta,
        deadline: Deadline,
    ) -> Unary:
        try:
            async with asyncio.timeout_at(deadline.at):
                async for provider in attempts.providers():
                    exchange = prepare(provider, meta, attempts.body(provider, body))
                    try:
                        async with self._post(exchange, route.limits.timeout) as resp:
                            if attempts.retryable(resp.status, provider):
                                attempts.failed(provider, _status_failure(resp))
                                continue
                            out = await _answer(exchange, resp, route.limits, attempts, provider)
                    except UPSTREAM_ERRORS as exc:
                        attempts.failed(provider, _exc_failure(exc))
                        continue
                    headers = attempts.answered(provider)
                    return Unary(Head(resp.status, JSON, headers), out)
                raise attempts.exhausted()
        except TimeoutError:
            return error_answer(deadline.error())
        except RouterError as err:
            return error_answer(err)

    async def _stream(
        self,
        route: Route,
        attempts: _Attempts,
        body: bytes,
        meta: RequestMeta,
        deadline: Deadline,
    ) -> Unary | Streamed:
        """Failover is possible until the upstream's first whole event; the deadline before it
        is a 504."""
        try:
            async for provider in attempts.providers():
                exchange = prepare(provider, meta, attempts.body(provider, body))
                try:
                    async with asyncio.timeout_at(deadline.at):
                        resp = await self._post(exchange, route.limits.timeout)
                except UPSTREAM_ERRORS as exc:
                    if deadline.past:
                        raise deadline.error() from None
                    attempts.failed(provider, _exc_failure(exc))
                    continue
                handed = False
                try:
                    if attempts.retryable(resp.status, provider):
                        attempts.failed(provider, _status_failure(resp))
                        continue
                    if resp.status >= 400:
                        try:
                            out = await _answer(exchange, resp, route.limits, attempts, provider)
                        except UPSTREAM_ERRORS as exc:
                            attempts.failed(provider, _exc_failure(exc))
                            continue
                        headers = attempts.answered(provider)
                        return Unary(Head(resp.status, JSON, headers), out)
                    # The answer starts with its first whole event: an upstream that dies
                    # between its headers and it is failed over like one that never answered
                    # (nothing has gone to the client yet); one whose first event is past the
                    # bound or malformed is a 502.
                    check = StreamCheck(exchange.wire, route.limits.event_bytes)
                    upstream = _checked(resp, check)
                    if (predicted := attempts.predicted(provider)) is not None:
                        upstream = _watched(upstream, partial(attempts.reported, predicted))
                    try:
                        async with asyncio.timeout_at(deadline.at):
                            first = await anext(upstream, b"")
                    except UPSTREAM_ERRORS as exc:
                        if deadline.past:
                            raise deadline.error() from None
                        attempts.failed(provider, _exc_failure(exc))
                        continue
                    except BadUpstream as err:
                        _refused(resp, attempts, provider, err)
                        raise
                    headers = attempts.answered(provider)
                    head = Head(resp.status, STREAM_TYPES[meta.endpoint.dialect], headers)
                    end = _End(self.reporter, route, resp)
                    failed = partial(attempts.failed, provider)
                    rest = _relay(
                        exchange, first, upstream, resp, meta, provider, end, deadline, failed
                    )
                    handed = True
                    return Streamed(head, rest, end)
                finally:
                    if not handed:
                        resp.release()
            raise attempts.exhausted()
        except RouterError as err:
            return error_answer(err)


async def _answer(
    exchange: Exchange,
    resp: aiohttp.ClientResponse,
    limits: Limits,
    attempts: _Attempts,
    provider: ProviderConfig,
) -> bytes:
    """A unary answer (or a stream's error answer), read whole within the bound and put in the
    client's form; a BadUpstream fails the provider and ends its call."""
    try:
        decoder = Decoder(resp.headers.get(aiohttp.hdrs.CONTENT_ENCODING, ""))
        body = Body(limits.answer_bytes, resp.content_length if decoder.identity else None)
        async for piece in _decoded(resp, decoder):
            body.add(piece)
        raw = body.bytes()
        if resp.status < 400 and (predicted := attempts.predicted(provider)) is not None:
            attempts.reported(predicted, raw)
        return exchange.unary(resp.status, raw)
    except BadUpstream as err:
        _refused(resp, attempts, provider, err)
        raise


def _refused(
    resp: aiohttp.ClientResponse, attempts: _Attempts, provider: ProviderConfig, err: BadUpstream
) -> None:
    """An answer past a bound or unreadable: its connection closed (the rest is never read),
    the provider failed."""
    resp.close()
    attempts.failed(provider, _Failure(err.reason, err.status))


async def _decoded(resp: aiohttp.ClientResponse, decoder: Decoder) -> AsyncIterator[bytes]:
    async for chunk in resp.content.iter_any():
        for piece in decoder.feed(chunk):
            yield piece
    decoder.end()


async def _checked(resp: aiohttp.ClientResponse, check: StreamCheck) -> AsyncIterator[bytes]:
    """A streamed answer, decoded, in whole checked frames (BadUpstream past a rule)."""
    decoder = Decoder(resp.headers.get(aiohttp.hdrs.CONTENT_ENCODING, ""))
    async for piece in _decoded(resp, decoder):
        if frames := check.feed(piece):
            yield frames
    check.end()


async def _watched(
    frames: AsyncIterator[bytes], reported: Callable[[bytes], bool]
) -> AsyncIterator[bytes]:
    """The frames, each shown to `reported` until one reports the cached tokens."""
    async for frame in frames:
        yield frame
        if reported(frame):
            break
    async for frame in frames:
        yield frame


async def _relay(
    exchange: Exchange,
    first: bytes,
    upstream: AsyncIterator[bytes],
    resp: aiohttp.ClientResponse,
    meta: RequestMeta,
    provider: ProviderConfig,
    end: _End,
    deadline: Deadline,
    failed: Callable[[_Failure], None],
) -> AsyncIterator[bytes]:
    """The upstream's streamed body, translated; a break, a bad or oversized event, or the
    deadline ends it with an error event in the client's dialect."""
    timer = _BodyDeadline(deadline, resp)
    finished = False
    dialect = meta.endpoint.dialect
    try:
        try:
            async for out in exchange.stream(_prepended(first, upstream)):
                yield out
            finished = not timer.expired
        except UPSTREAM_ERRORS as exc:
            if not timer.expired:
                log.warning(
                    "upstream stream broke",
                    extra={
                        "request_id": meta.request_id,
                        "provider": provider.id,
                        "reason": type(exc).__name__,
                    },
                )
                message = f"upstream {provider.id} broke off the stream"
                yield stream_error(dialect, message, "upstream_error")
        except BadUpstream as err:  # past a bound, or not its wire format: the provider failed
            if not timer.expired:
                failed(_Failure(err.reason, err.status))
                yield stream_error(dialect, err.message, "bad_upstream_response")
        if timer.expired:
            yield stream_error(dialect, deadline.error().message, "deadline_exceeded")
    finally:
        timer.cancel()
        end(finished)


class _BodyDeadline:
    """One timer per streamed body, not one per chunk: at the deadline it closes the upstream
    response, which ends the read."""

    def __init__(self, deadline: Deadline, resp: aiohttp.ClientResponse) -> None:
        self.expired = False
        self._resp = resp
        self._timer = asyncio.get_running_loop().call_at(deadline.at, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._resp.close()

    def cancel(self) -> None:
        self._timer.cancel()


async def _prepended(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


def _status_failure(resp: aiohttp.ClientResponse) -> _Failure:
    return _Failure(f"HTTP {resp.status}", resp.status, resp.headers.get("retry-after"))


def _exc_failure(exc: BaseException) -> _Failure:
    if isinstance(exc, TimeoutError):
        return _Failure("timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _Failure("connection failed")
    return _Failure(type(exc).__name__)
