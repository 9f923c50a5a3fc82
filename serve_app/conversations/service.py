"""The ingress replica's side of stored responses.

A Responses request becomes a `Turn`: its earlier turns read from the store (one call, the
whole conversation in one record), the whole request for any provider, and the short form for
the provider that keeps its own copy (a vLLM with its Responses store: tried first, it has the
exact state and a warm prefix cache; when it is gone or lost the state, another provider
continues from the router's copy). The answer is stored before the client sees it (unary: before
the response; streamed: before the final event), so a continuation sent at once finds it.
Background responses run here, on the replica that took them, and any replica reads, lists or
cancels them through the store.

The store is a SQLite file owned by an actor (actor.py). A replica on the actor's node reads and
writes the file itself: a Responses request then costs no actor call (an actor call is about
1 ms on a small machine, the file about 0.1 ms). Elsewhere every read and write is an actor
call. Background runs and cancels always go through the actor, which wakes their runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson
import ray
from ray.actor import ActorHandle

from serve_app.cluster.follow import ActorLink
from serve_app.conversations.chain import (
    RUNNING,
    StoredResponse,
    TerminalTap,
    conversation,
    expanded,
    listed_items,
    page,
)
from serve_app.conversations.store import ResponseStore
from serve_app.core.config import ResponsesConfig
from serve_app.core.errors import RouterError, quoted
from serve_app.dialects.base import now_s
from serve_app.dialects.responses import echo_of, response_object
from serve_app.ingress.relay import Keeper
from serve_app.pickers.plan import PROVIDER_HEADER, Unary, error_answer

log = logging.getLogger("ray.serve")
T = TypeVar("T")

STORE_TIMEOUT_S = 5.0
STORE_TRIES = 3
# How long past its request's deadline a background response may stay running before it
# reads as failed (the replica running it stopped).
BACKGROUND_SLACK_S = 30.0


class Turn(NamedTuple):
    """A Responses request with what the store knows of its conversation."""

    doc: dict[str, Any]
    owner: str  # the client key's id, "" when keys are off
    previous: StoredResponse | None
    items: list[dict[str, Any]]  # the whole conversation's input for this turn
    body: bytes  # what a provider without the earlier turns gets
    keeper: Keeper | None  # the provider with its own copy of the earlier turns, if any
    store: bool
    background: bool

    @property
    def turns(self) -> int:
        return 1 + (self.previous.turns if self.previous else 0)


def response_not_found(response_id: str, param: str | None = None) -> RouterError:
    return RouterError(
        404,
        f"Response with id {quoted(response_id)} not found.",
        param=param,
        code="response_not_found",
    )


def _unsupported(message: str, param: str) -> RouterError:
    return RouterError(400, message, param=param, code="unsupported_parameter")


def _room(running: int, bound: int, whose: str) -> None:
    """429 when `running` background responses already reach `bound`."""
    if running >= bound:
        raise RouterError(
            429,
            f"{whose} already runs {bound} background responses; retry once one has ended",
            type="rate_limit_error",
            code="too_many_background_responses",
            headers={"retry-after": "1"},
        )


def store_unavailable() -> RouterError:
    return RouterError(
        503,
        "the responses store is unavailable; retry",
        type="api_error",
        code="store_unavailable",
        headers={"retry-after": "1"},
    )


class Conversations:
    def __init__(self, connect: Callable[[], ActorHandle], holder: str, local: bool = True) -> None:
        """`connect`: the store actor's handle (created if it is gone). `local`: read and write
        the store's file directly when this replica runs on the actor's node (a request then
        costs no actor call); else every call goes through the actor."""
        self._link = ActorLink(connect, holder, "responses store")
        self._running: set[asyncio.Task[None]] = set()
        self._running_of: Counter[str] = Counter()  # owner -> its background runs here
        self._limits = ResponsesConfig()
        self._local: ResponseStore | None = None
        self._located = not local  # whether the store's place is known
        self._locating = asyncio.Lock()

    def limit(self, limits: ResponsesConfig) -> None:
        """The models config's `responses` block (the actor follows it too)."""
        self._limits = limits
        if self._local is not None:
            self._local.limit(limits.store_ttl_s, limits.max_bytes)

    async def _call(self, method: str, *args: Any) -> Any:
        """One actor call, tried again on a restarting or re-created actor; 503 if it stays
        out of reach."""
        for attempt in range(STORE_TRIES):
            try:
                call = getattr(self._link.get(), method).remote(*args)
                return await asyncio.wait_for(call, STORE_TIMEOUT_S)
            except Exception as exc:
                self._link.lost(exc)
                if attempt + 1 < STORE_TRIES:
                    await asyncio.sleep(0.2 * (attempt + 1))
        raise store_unavailable()

    async def _file(self) -> ResponseStore | None:
        """The store's file, opened here if this replica shares the actor's node."""
        if self._located:
            return self._local
        async with self._locating:  # the first requests all wait for one answer
            if not self._located:
                node, path = await self._call("where")
                self._located = True
                if node == ray.get_runtime_context().get_node_id() and Path(path).exists():
                    limits = self._limits
                    try:
                        self._local = ResponseStore(
                            path, limits.store_ttl_s, limits.max_bytes, owner=False
                        )
                    except sqlite3.Error as exc:  # through the actor, then
                        log.warning(
                            "responses store file not usable here",
                            extra={"reason": type(exc).__name__},
                        )
        return self._local

    async def _get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        local = await self._file()
        if local is not None:
            return _locally(local.get, response_id, owner)
        blob = await self._call("get", response_id, owner)
        return None if blob is None else StoredResponse.model_validate_json(blob)

    async def _put(self, record: StoredResponse) -> bool:
        local = await self._file()
        if local is not None:
            return _locally(local.put, record)
        return await self._call("put", record.model_dump_json().encode())

    async def _ended(self, record: StoredResponse) -> StoredResponse | None:
        """A background response's new state, through the actor (it wakes who waits on it):
        as stored, or None if it was deleted meanwhile."""
        blob = await self._call("finish", record.model_dump_json().encode())
        return None if blob is None else StoredResponse.model_validate_json(blob)

    # --- a request's turn ----------------------------------------------------------------------

    async def begin(self, body: bytes, owner: str) -> Turn:
        """The request's turn (404 when its previous response is not this owner's or gone)."""
        doc = orjson.loads(body)
        store = doc.get("store") is not False
        background = doc.get("background") is True
        if background and doc.get("stream"):
            raise _unsupported("background responses cannot be streamed here; poll them", "stream")
        if background and not store:
            raise _unsupported("a background response must be stored (store: true)", "store")
        previous = None
        if (previous_id := doc.get("previous_response_id")) is not None:
            previous = await self._get(previous_id, owner)
            if previous is None:
                raise response_not_found(previous_id, "previous_response_id")
            if previous.status in RUNNING:
                raise RouterError(
                    400,
                    f"response {quoted(previous_id)} is still {previous.status}; continue it "
                    "once it has completed",
                    param="previous_response_id",
                    code="previous_response_running",
                )
        sent = {k: v for k, v in doc.items() if k != "background"}
        items = conversation(previous, doc)
        keeper = None
        if previous is not None:
            body = orjson.dumps(expanded(sent, items))
            if previous.keeper:
                short = sent | {"previous_response_id": previous.upstream_id or previous.id}
                keeper = Keeper(previous.keeper, orjson.dumps(short))
        elif background:
            body = orjson.dumps(sent)
        return Turn(doc, owner, previous, items, body, keeper, store, background)

    def _record(
        self, turn: Turn, response: dict[str, Any], provider: str, keeps: bool
    ) -> StoredResponse:
        """`keeps`: the provider keeps its own copy (a vLLM with its Responses store)."""
        return StoredResponse(
            id=str(response["id"]),
            owner=turn.owner,
            model=str(turn.doc.get("model")),
            created=time.time(),
            input=turn.items,
            response=response,
            turns=turn.turns,
            keeper=provider if keeps else "",
            upstream_id=str(response["id"]),
        )

    async def record(self, turn: Turn, answer: Unary, keeps: Callable[[str], bool]) -> None:
        """Stores a unary answer (200) of a stored turn (`keeps`: whether a provider keeps its
        own copy)."""
        if not turn.store or answer.head.status != 200:
            return
        try:
            response = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            return
        provider = answer.head.headers.get(PROVIDER_HEADER, "")
        await self._keep(turn, response, provider, keeps(provider))

    async def _keep(self, turn: Turn, response: Any, provider: str, keeps: bool) -> None:
        if not isinstance(response, dict) or not isinstance(response.get("id"), str):
            return
        record = self._record(turn, response, provider, keeps)
        try:
            stored = await self._put(record)
        except RouterError:
            stored = False
        if not stored:  # the client still gets its answer; it cannot be continued
            log.warning(
                "response not stored", extra={"response_id": record.id, "model": record.model}
            )

    def tapped(
        self, turn: Turn, body: AsyncIterator[bytes], provider: str, keeps: bool
    ) -> AsyncIterator[bytes]:
        """A stored turn's stream, its final response stored before the final event goes."""
        if not turn.store:
            return body

        async def relayed() -> AsyncIterator[bytes]:
            tap = TerminalTap()
            async for chunk in body:
                if tap.feed(chunk):
                    await self._keep(turn, tap.response, provider, keeps)
                yield chunk

        return relayed()

    # --- background ---------------------------------------------------------------------------

    async def start(
        self,
        turn: Turn,
        timeout_s: float,
        run: Callable[[], Awaitable[Unary]],
        keeps: Callable[[str], bool],
    ) -> bytes:
        """Stores the turn as queued and runs it here (`run`: the upstream call); the queued
        Response object's JSON, answered at once. 429 past the replica's or the key's bound on
        running background responses."""
        _room(len(self._running), self._limits.max_background, "this router replica")
        _room(self._running_of[turn.owner], self._limits.max_background_per_key, "this key")
        response_id = f"resp_{uuid.uuid4().hex}"
        echo = echo_of(turn.doc)
        record = StoredResponse(
            id=response_id,
            owner=turn.owner,
            model=str(turn.doc.get("model")),
            created=time.time(),
            input=turn.items,
            response=response_object(response_id, now_s(), echo, "queued"),
            turns=turn.turns,
            background=True,
            expires=time.time() + timeout_s + BACKGROUND_SLACK_S,
        )
        if not await self._call("put", record.model_dump_json().encode()):
            raise RouterError(400, "the request is larger than the responses store", param="input")
        task = asyncio.get_running_loop().create_task(self._run(record, run, keeps, timeout_s))
        self._running.add(task)
        self._running_of[turn.owner] += 1
        task.add_done_callback(lambda done: self._ran(done, turn.owner))
        return orjson.dumps(record.response)

    def _ran(self, task: asyncio.Task[None], owner: str) -> None:
        self._running.discard(task)
        self._running_of[owner] -= 1
        if self._running_of[owner] <= 0:
            del self._running_of[owner]

    async def _run(
        self,
        record: StoredResponse,
        run: Callable[[], Awaitable[Unary]],
        keeps: Callable[[str], bool],
        timeout_s: float,
    ) -> None:
        running = record.model_copy(
            update={"response": {**record.response, "status": "in_progress"}}
        )
        with contextlib.suppress(RouterError):
            if await self._ended(running) is None:  # deleted before it started
                return
        work = asyncio.ensure_future(run())
        watch = asyncio.ensure_future(self._settled(record.id, timeout_s + BACKGROUND_SLACK_S))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # cancelled, deleted (or lost): the upstream call stops
                return
            try:
                answer = work.result()
            except Exception:
                log.exception("background response failed", extra={"response_id": record.id})
                answer = error_answer(
                    RouterError(500, "the request failed in the router", type="api_error")
                )
            final = self._final(running, answer, keeps)
            with contextlib.suppress(RouterError):
                await self._ended(final)
        finally:  # also when this replica stops: neither outlives the run
            for task in (work, watch):
                task.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)

    async def _settled(self, response_id: str, timeout_s: float) -> None:
        """Returns when someone else ended the background response (a cancel)."""
        until = time.monotonic() + timeout_s
        while (left := until - time.monotonic()) > 0:
            try:
                status = await self._link.get().wait_settled.remote(response_id, left)
            except Exception as exc:  # the store restarts: wait on the new one
                self._link.lost(exc)
                await asyncio.sleep(0.5)
                continue
            if status is None or status not in RUNNING:
                return

    def _final(
        self, running: StoredResponse, answer: Unary, keeps: Callable[[str], bool]
    ) -> StoredResponse:
        """The background response as its upstream answer ended it."""
        head = answer.head
        response: Any = None
        with contextlib.suppress(orjson.JSONDecodeError):
            response = orjson.loads(answer.body)
        if head.status != 200 or not isinstance(response, dict):
            error = response.get("error") if isinstance(response, dict) else None
            if not isinstance(error, dict):
                error = {"code": "server_error", "message": f"upstream answered {head.status}"}
            failed = {**running.response, "status": "failed", "error": error}
            return running.model_copy(update={"response": failed, "expires": None})
        provider = head.headers.get(PROVIDER_HEADER, "")
        upstream_id = str(response.get("id") or running.id)
        response = {**response, "id": running.id, "background": True}
        return running.model_copy(
            update={
                "response": response,
                "expires": None,
                "keeper": provider if keeps(provider) else "",
                "upstream_id": upstream_id,
            }
        )

    # --- the id routes ------------------------------------------------------------------------

    async def get(self, response_id: str, owner: str | None) -> dict[str, Any]:
        record = await self._get(response_id, owner)
        if record is None:
            raise response_not_found(response_id)
        return record.response

    async def delete(self, response_id: str, owner: str | None) -> dict[str, Any]:
        """Through the actor always: a running background response's runner must stop."""
        if not await self._call("delete", response_id, owner):
            raise response_not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def cancel(self, response_id: str, owner: str | None) -> dict[str, Any]:
        blob = await self._call("cancel", response_id, owner)
        if blob is None:
            raise response_not_found(response_id)
        record = StoredResponse.model_validate_json(blob)
        if not record.background:
            raise RouterError(
                400,
                "only a background response can be cancelled",
                param="response_id",
                code="not_cancellable",
            )
        return record.response

    async def input_items(
        self, response_id: str, owner: str | None, order: str, after: str | None, limit: int
    ) -> dict[str, Any]:
        record = await self._get(response_id, owner)
        if record is None:
            raise response_not_found(response_id)
        return page(listed_items(record), order, after, limit)

    async def stop(self) -> None:
        for task in list(self._running):
            task.cancel()
        if self._local is not None:
            self._local.close()


def _locally(call: Callable[..., T], *args: Any) -> T:
    """A call on the store's file; 503 if SQLite fails (a full disk, a lock held too long)."""
    try:
        return call(*args)
    except sqlite3.Error as exc:
        log.warning("responses store file failed", extra={"reason": type(exc).__name__})
        raise store_unavailable() from None
