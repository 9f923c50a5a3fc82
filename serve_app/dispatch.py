"""One router replica's request path: plan the attempts, call upstreams, fail over.

Errors come back as values (a status and an OpenAI-style body), never as exceptions, because
the result crosses a Ray Serve handle to the ingress.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import aiohttp

from serve_app.config import SLOT_STRATEGIES, ProviderConfig, RoutingConfig
from serve_app.dialects.translate import STREAM_TYPES, stream_error
from serve_app.errors import RouterError, adapter_unavailable
from serve_app.handler import ModelHandler
from serve_app.metrics import Tally
from serve_app.providers import prepare
from serve_app.providers.base import JSON, Exchange
from serve_app.registry.manifest import is_lora_name
from serve_app.schemas import RequestMeta
from serve_app.shared import SharedState, Slot

log = logging.getLogger("ray.serve")

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
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ValueError)
ATTEMPTS_METRIC = "llm_router_upstream_attempts"
# The longest an upstream's Retry-After keeps it aside.
MAX_RETRY_AFTER_S = 300.0


class Head(NamedTuple):
    """The first item of every answer: what the ingress needs before any body byte."""

    status: int
    content_type: str
    headers: dict[str, str]


class Unary(NamedTuple):
    head: Head
    body: bytes


class _Failure(NamedTuple):
    provider_id: str
    reason: str
    status: int | None
    retry_after: str | None


def _retryable(status: int, provider: ProviderConfig) -> bool:
    """Worth another provider: busy, broken, or without this adapter version (a restarted vLLM
    forgot it, and the registry has not yet noticed and loaded it again)."""
    return status == 429 or status >= 500 or (status == 404 and is_lora_name(provider.model_path))


def error_answer(err: RouterError) -> Unary:
    headers = dict(err.headers)
    if err.code in UNSERVABLE:
        headers[UNSERVABLE_HEADER] = "1"
    return Unary(Head(err.status, JSON, headers), err.body())


class _View(NamedTuple):
    """What one request runs on from start to end, even if the config changes meanwhile."""

    handler: ModelHandler
    routing: RoutingConfig
    timeout: aiohttp.ClientTimeout


class _Attempts:
    """The providers one request tries, one at a time. Each is held while it is tried and its
    answer relayed: this replica's in-flight count, and under first_available* a slot taken
    from the broker (waiting for one up to wait_timeout_s)."""

    def __init__(
        self,
        view: _View,
        meta: RequestMeta,
        body: bytes,
        deadline: float,
        shared: SharedState | None,
    ) -> None:
        handler = view.handler
        self._view, self._meta, self._deadline, self._shared = view, meta, deadline, shared
        candidates = handler.candidates(meta)
        self._tiers = candidates.tiers
        self.paths = {p.model_path for tier in self._tiers for p in tier if p.model_path}
        self._strategy = handler.strategy_names[meta.model]
        # As many attempts as a plan has: max_attempts per tier that has providers.
        self._left = view.routing.max_attempts * sum(1 for tier in self._tiers if tier)
        self._plan: Iterator[ProviderConfig] | None = None
        self._prefix: Sequence[int] = ()
        if shared is None or self._strategy not in SLOT_STRATEGIES:
            stats = handler.stats(meta, candidates, body, shared)
            self._prefix = stats.prefix
            self._plan = iter(handler.order(meta.model, candidates, stats))
        self._current: ProviderConfig | None = None
        self._slot: Slot | None = None
        self._tried: set[str] = set()
        self._started = 0.0

    async def next(self, failures: list[_Failure]) -> ProviderConfig | None:
        """The next provider to try (the previous one is let go); None when there is none."""
        self.release()
        provider = await (self._next_planned() if self._plan else self._next_slot(failures))
        if provider is not None:
            self._current = provider
            self._tried.add(provider.id)
            self._view.handler.states[provider.id].in_flight += 1
            self._started = time.monotonic()
            if self._shared is not None:
                self._shared.used(self._meta.model, provider.id)
        return provider

    async def _next_planned(self) -> ProviderConfig | None:
        assert self._plan is not None
        return next(self._plan, None)

    async def _next_slot(self, failures: list[_Failure]) -> ProviderConfig | None:
        assert self._shared is not None
        tiers = [[p for p in tier if p.id not in self._tried] for tier in self._tiers]
        if self._left <= 0 or not any(tiers):
            return None
        self._left -= 1
        wait = min(
            self._view.routing.wait_timeout_s,
            self._deadline - asyncio.get_running_loop().time(),
        )
        slot = await self._shared.acquire(self._meta.model, self._strategy, tiers, wait)
        if slot is None:
            if failures:
                return None
            raise _no_free_provider(self._meta.model, max(wait, 0.0))
        self._slot = slot
        return next(p for tier in tiers for p in tier if p.id == slot.provider)

    def answered(self) -> None:
        """The provider's answer began: its latency (to the answer's head) is one sample, and
        it has the prompt's blocks in its cache now."""
        if self._shared is not None and self._current is not None:
            self._shared.took(self._current.id, time.monotonic() - self._started)
            self._shared.routed(self._current.id, self._prefix)

    def release(self) -> None:
        if self._current is not None:
            self._view.handler.states[self._current.id].in_flight -= 1
            self._current = None
        if self._slot is not None:
            assert self._shared is not None
            self._shared.release(self._slot)
            self._slot = None


def _no_free_provider(model: str, wait_s: float) -> RouterError:
    return RouterError(
        503,
        f"no provider of model {model} came free within {wait_s:g} s",
        type="api_error",
        code="no_free_provider",
        headers={"retry-after": "1"},
    )


class Dispatcher:
    def __init__(
        self,
        handler: ModelHandler,
        routing: RoutingConfig,
        session: aiohttp.ClientSession,
        on_trip: Callable[[str, str], None] = lambda provider_id, reason: None,
        shared: SharedState | None = None,
    ) -> None:
        """`on_trip(provider_id, reason)`: a provider failed `circuit_failures` times in a row.
        `shared`: the state shared with the other replicas (without it, first_available*
        strategies order by config and hold nothing, and counts stay local)."""
        self.session = session
        self.on_trip = on_trip
        self.shared = shared
        self.tally = shared.tally if shared is not None else Tally()
        # Requests under way per upstream model name (model_path): tells when nothing uses a
        # retiring adapter version any more.
        self.in_use: Counter[str] = Counter()
        self.update(handler, routing)

    def update(self, handler: ModelHandler, routing: RoutingConfig) -> None:
        """Serve new requests with a new config; requests under way finish on their own."""
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=routing.connect_timeout_s,
            sock_connect=routing.connect_timeout_s,
            sock_read=routing.read_timeout_s,
        )
        self._view = _View(handler, routing, timeout)

    @property
    def handler(self) -> ModelHandler:
        return self._view.handler

    @contextmanager
    def _attempts(
        self, view: _View, meta: RequestMeta, body: bytes, deadline: float
    ) -> Iterator[_Attempts]:
        """The request's attempts; raises RouterError when it cannot go anywhere."""
        attempts = _Attempts(view, meta, body, deadline, self.shared)
        self.in_use.update(attempts.paths)
        try:
            yield attempts
        finally:
            attempts.release()
            self.in_use.subtract(attempts.paths)

    def _failed(
        self,
        view: _View,
        provider: ProviderConfig,
        meta: RequestMeta,
        failure: _Failure,
        failures: list[_Failure],
    ) -> None:
        state = view.handler.states[provider.id]
        pause = view.routing.unhealthy_cooldown_s
        if failure.retry_after is not None:  # the upstream said when to come back: believe it
            pause = min(max(_seconds(failure.retry_after), 0.0), MAX_RETRY_AFTER_S)
        if failure.status != 404:  # a missing adapter version says nothing of the server
            state.down_until = view.handler.clock() + pause
        if failure.status not in (404, 429):  # nor is busy broken
            state.failures += 1
            if state.failures >= view.routing.circuit_failures:
                state.failures = 0
                self.on_trip(provider.id, failure.reason)
        self.tally.inc(ATTEMPTS_METRIC, (provider.id, failure.reason))
        failures.append(failure)
        log.warning(
            "upstream attempt failed",
            extra={
                "request_id": meta.request_id,
                "provider": provider.id,
                "reason": failure.reason,
            },
        )

    def _succeeded(self, view: _View, provider: ProviderConfig) -> None:
        state = view.handler.states[provider.id]
        state.down_until, state.failures = 0.0, 0
        self.tally.inc(ATTEMPTS_METRIC, (provider.id, "ok"))

    def _deadline(self, view: _View, meta: RequestMeta) -> float:
        return min(view.routing.request_timeout_s, meta.timeout_s or float("inf"))

    def _exhausted(self, meta: RequestMeta, failures: list[_Failure]) -> RouterError:
        if failures and all(f.status == 404 for f in failures):
            # Only adapter 404s are retried: every server tried has just lost this version (a
            # restart the registry has not seen yet), and it will load it again.
            return adapter_unavailable(meta.model)
        detail = "; ".join(f"{f.provider_id}: {f.reason}" for f in failures)
        if failures and all(f.status == 429 for f in failures):
            waits = [f.retry_after for f in failures if f.retry_after]
            return RouterError(
                429,
                f"every provider of model {meta.model} is rate limited ({detail})",
                type="rate_limit_error",
                code="upstream_rate_limited",
                headers={"retry-after": min(waits, key=_seconds) if waits else "1"},
            )
        return RouterError(
            503,
            f"no provider of model {meta.model} could serve the request ({detail})",
            type="api_error",
            code="upstream_unavailable",
        )

    async def unary(self, body: bytes, meta: RequestMeta) -> Unary:
        view = self._view
        timeout = self._deadline(view, meta)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                return await self._unary(view, body, meta, deadline)
        except TimeoutError:
            return error_answer(_deadline_error(timeout))

    async def _unary(self, view: _View, body: bytes, meta: RequestMeta, deadline: float) -> Unary:
        failures: list[_Failure] = []
        try:
            with self._attempts(view, meta, body, deadline) as attempts:
                while (provider := await attempts.next(failures)) is not None:
                    exchange = prepare(provider, meta, body)
                    try:
                        async with self.session.post(
                            exchange.url,
                            data=exchange.body,
                            headers=exchange.headers,
                            timeout=view.timeout,
                        ) as resp:
                            if _retryable(resp.status, provider):
                                failure = _status_failure(provider, resp)
                                self._failed(view, provider, meta, failure, failures)
                                continue
                            data = await resp.read()
                            out, ctype = exchange.unary(resp.status, data, resp.content_type)
                    except UPSTREAM_ERRORS as exc:
                        self._failed(view, provider, meta, _exc_failure(provider, exc), failures)
                        continue
                    attempts.answered()
                    self._succeeded(view, provider)
                    headers = _answer_headers(provider, failures)
                    return Unary(Head(resp.status, ctype, headers), out)
            raise self._exhausted(meta, failures)
        except RouterError as err:
            return error_answer(err)

    async def stream(self, body: bytes, meta: RequestMeta) -> AsyncIterator[Head | bytes]:
        """Yields a Head, then body chunks. Failover is possible until the Head is yielded,
        which waits for the upstream's first body bytes.

        The request's deadline ends it with a 504 before the Head, an SSE error event after.
        """
        view = self._view
        timeout = self._deadline(view, meta)
        deadline = asyncio.get_running_loop().time() + timeout
        failures: list[_Failure] = []
        try:
            with self._attempts(view, meta, body, deadline) as attempts:
                while (provider := await attempts.next(failures)) is not None:
                    exchange = prepare(provider, meta, body)
                    try:
                        async with asyncio.timeout_at(deadline):
                            resp = await self.session.post(
                                exchange.url,
                                data=exchange.body,
                                headers=exchange.headers,
                                timeout=view.timeout,
                            )
                    except UPSTREAM_ERRORS as exc:
                        if _past(deadline):
                            raise _deadline_error(timeout) from None
                        self._failed(view, provider, meta, _exc_failure(provider, exc), failures)
                        continue
                    try:
                        if _retryable(resp.status, provider):
                            failure = _status_failure(provider, resp)
                            self._failed(view, provider, meta, failure, failures)
                            continue
                        headers = _answer_headers(provider, failures)
                        if resp.status >= 400:
                            attempts.answered()
                            try:
                                data = await resp.read()
                            except UPSTREAM_ERRORS as exc:
                                failure = _exc_failure(provider, exc)
                                self._failed(view, provider, meta, failure, failures)
                                continue
                            out, ctype = exchange.unary(resp.status, data, resp.content_type)
                            yield Head(resp.status, ctype, headers)
                            yield out
                            return
                        # The answer starts with its first body bytes: an upstream that dies
                        # between its headers and them is failed over like one that never
                        # answered (nothing has gone to the client yet).
                        upstream = resp.content.iter_any()
                        try:
                            async with asyncio.timeout_at(deadline):
                                first = await anext(upstream, b"")
                        except UPSTREAM_ERRORS as exc:
                            if _past(deadline):
                                raise _deadline_error(timeout) from None
                            failure = _exc_failure(provider, exc)
                            self._failed(view, provider, meta, failure, failures)
                            continue
                        attempts.answered()
                        self._succeeded(view, provider)
                        yield Head(resp.status, STREAM_TYPES[meta.endpoint.dialect], headers)
                        chunks = _prepended(first, upstream)
                        relay = self._relay(
                            exchange, chunks, resp, meta, provider, deadline, timeout
                        )
                        async for out in relay:
                            yield out
                        return
                    finally:
                        resp.release()
                raise self._exhausted(meta, failures)
        except RouterError as err:
            answer = error_answer(err)
        yield answer.head
        yield answer.body

    async def _relay(
        self,
        exchange: Exchange,
        chunks: AsyncIterator[bytes],
        resp: aiohttp.ClientResponse,
        meta: RequestMeta,
        provider: ProviderConfig,
        deadline: float,
        timeout: float,
    ) -> AsyncIterator[bytes]:
        """The upstream's streamed body, translated; a break or the deadline ends it with an
        SSE error event."""
        timer = _BodyDeadline(deadline, resp)
        try:
            async for out in exchange.stream(chunks):
                yield out
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
                yield stream_error(
                    meta.endpoint.dialect,
                    f"upstream {provider.id} broke off the stream",
                    "upstream_error",
                )
        finally:
            timer.cancel()
        if timer.expired:
            message = _deadline_error(timeout).message
            yield stream_error(meta.endpoint.dialect, message, "deadline_exceeded")


class _BodyDeadline:
    """One timer per streamed body, not one per chunk: at the deadline it closes the upstream
    response, which ends the read."""

    def __init__(self, deadline: float, resp: aiohttp.ClientResponse) -> None:
        self.expired = False
        self._resp = resp
        self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)

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


def _past(deadline: float) -> bool:
    return asyncio.get_running_loop().time() >= deadline


def _deadline_error(timeout: float) -> RouterError:
    return RouterError(
        504,
        f"the request did not finish within its {timeout:g} s deadline",
        type="api_error",
        code="deadline_exceeded",
    )


def _answer_headers(provider: ProviderConfig, failures: list[_Failure]) -> dict[str, str]:
    return {PROVIDER_HEADER: provider.id, ATTEMPTS_HEADER: str(len(failures) + 1)}


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("inf")


def _status_failure(provider: ProviderConfig, resp: aiohttp.ClientResponse) -> _Failure:
    return _Failure(
        provider.id, f"HTTP {resp.status}", resp.status, resp.headers.get("retry-after")
    )


def _exc_failure(provider: ProviderConfig, exc: BaseException) -> _Failure:
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        reason = "connection failed"
    else:
        reason = type(exc).__name__
    return _Failure(provider.id, reason, None, None)
