"""One router replica's request path: plan the attempts, call upstreams, fail over.

Errors come back as values (a status and an OpenAI-style body), never as exceptions, because
the result crosses a Ray Serve handle to the ingress.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import aiohttp

from serve_app.config import ProviderConfig, RoutingConfig
from serve_app.errors import RouterError, sse_error_event
from serve_app.handler import ModelHandler
from serve_app.metrics import Tally
from serve_app.providers import prepare
from serve_app.providers.base import JSON, SSE
from serve_app.schemas import RequestMeta

log = logging.getLogger("ray.serve")

PROVIDER_HEADER = "x-router-provider"
ATTEMPTS_HEADER = "x-router-attempts"
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


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def error_answer(err: RouterError) -> Unary:
    return Unary(Head(err.status, JSON, dict(err.headers)), err.body())


class _View(NamedTuple):
    """What one request runs on from start to end, even if the config changes meanwhile."""

    handler: ModelHandler
    routing: RoutingConfig
    timeout: aiohttp.ClientTimeout


class Dispatcher:
    def __init__(
        self,
        handler: ModelHandler,
        routing: RoutingConfig,
        session: aiohttp.ClientSession,
        on_trip: Callable[[str, str], None] = lambda provider_id, reason: None,
    ) -> None:
        """`on_trip(provider_id, reason)`: a provider failed `circuit_failures` times in a row."""
        self.session = session
        self.on_trip = on_trip
        self.tally = Tally()
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
    def _using(self, plan: list[ProviderConfig]) -> Iterator[None]:
        paths = {p.model_path for p in plan if p.model_path}
        self.in_use.update(paths)
        try:
            yield
        finally:
            self.in_use.subtract(paths)

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
        state.down_until = view.handler.clock() + pause
        if failure.status != 429:  # busy is not broken
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
        try:
            async with asyncio.timeout(timeout):
                return await self._unary(view, body, meta)
        except TimeoutError:
            return error_answer(_deadline_error(timeout))

    async def _unary(self, view: _View, body: bytes, meta: RequestMeta) -> Unary:
        failures: list[_Failure] = []
        try:
            plan = view.handler.plan(meta)
            with self._using(plan):
                for provider in plan:
                    exchange = prepare(provider, meta, body)
                    state = view.handler.states[provider.id]
                    state.in_flight += 1
                    try:
                        async with self.session.post(
                            exchange.url,
                            data=exchange.body,
                            headers=exchange.headers,
                            timeout=view.timeout,
                        ) as resp:
                            if _retryable(resp.status):
                                failure = _status_failure(provider, resp)
                                self._failed(view, provider, meta, failure, failures)
                                continue
                            data = await resp.read()
                            out, ctype = exchange.unary(resp.status, data, resp.content_type)
                    except UPSTREAM_ERRORS as exc:
                        self._failed(view, provider, meta, _exc_failure(provider, exc), failures)
                        continue
                    finally:
                        state.in_flight -= 1
                    self._succeeded(view, provider)
                    headers = _answer_headers(provider, failures)
                    return Unary(Head(resp.status, ctype, headers), out)
            raise self._exhausted(meta, failures)
        except RouterError as err:
            return error_answer(err)

    async def stream(self, body: bytes, meta: RequestMeta) -> AsyncIterator[Head | bytes]:
        """Yields a Head, then body chunks. Failover is possible until the Head is yielded.

        The request's deadline ends it with a 504 before the Head, an SSE error event after.
        """
        view = self._view
        timeout = self._deadline(view, meta)
        deadline = asyncio.get_running_loop().time() + timeout
        failures: list[_Failure] = []
        try:
            plan = view.handler.plan(meta)
        except RouterError as err:
            plan, answer = [], error_answer(err)
        else:
            answer = None
        with self._using(plan):
            for provider in plan:
                try:
                    exchange = prepare(provider, meta, body)
                except RouterError as err:
                    answer = error_answer(err)
                    break
                state = view.handler.states[provider.id]
                state.in_flight += 1
                try:
                    async with asyncio.timeout_at(deadline):
                        resp = await self.session.post(
                            exchange.url,
                            data=exchange.body,
                            headers=exchange.headers,
                            timeout=view.timeout,
                        )
                except UPSTREAM_ERRORS as exc:
                    state.in_flight -= 1
                    if _past(deadline):
                        answer = error_answer(_deadline_error(timeout))
                        break
                    self._failed(view, provider, meta, _exc_failure(provider, exc), failures)
                    continue
                try:
                    if _retryable(resp.status):
                        failure = _status_failure(provider, resp)
                        self._failed(view, provider, meta, failure, failures)
                        continue
                    headers = _answer_headers(provider, failures)
                    if resp.status >= 400:
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
                    self._succeeded(view, provider)
                    yield Head(resp.status, SSE, headers)
                    timer = _BodyDeadline(deadline, resp)
                    try:
                        async for out in exchange.stream(resp.content.iter_any()):
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
                            yield sse_error_event(f"upstream {provider.id} broke off the stream")
                    finally:
                        timer.cancel()
                    if timer.expired:
                        message = _deadline_error(timeout).message
                        yield sse_error_event(message, code="deadline_exceeded")
                    return
                finally:
                    resp.release()
                    state.in_flight -= 1
        if answer is None:
            answer = error_answer(self._exhausted(meta, failures))
        yield answer.head
        yield answer.body


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
