"""One Serve deployment per model type: a thin shell around a Dispatcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from ray import serve

from serve_app.config import ModelTypeConfig, RouterConfig
from serve_app.dispatch import Dispatcher, Head, Unary
from serve_app.handler import ModelHandler
from serve_app.schemas import RequestMeta
from serve_app.serve_env import REPLICA_CPUS


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=1000)
class ModelTypeRouter:
    def __init__(self, model_type: ModelTypeConfig) -> None:
        self._model_type = model_type
        self._dispatcher: Dispatcher | None = None

    def _get(self) -> Dispatcher:
        # The session must be made on the replica's running loop; this has no await, so two
        # first requests cannot both create one.
        if self._dispatcher is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            session = aiohttp.ClientSession(connector=connector)
            config = RouterConfig(
                source=self._model_type.name, model_types={self._model_type.name: self._model_type}
            )
            self._dispatcher = Dispatcher(
                ModelHandler(config=config), self._model_type.routing, session
            )
        return self._dispatcher

    async def unary(self, body: bytes, meta: RequestMeta) -> Unary:
        return await self._get().unary(body, meta)

    async def unary_many(
        self, calls: list[tuple[bytes, RequestMeta]]
    ) -> AsyncIterator[tuple[int, Unary]]:
        """Several unary calls in one trip; each result is yielded as soon as it is ready."""
        dispatcher = self._get()

        async def one(index: int, body: bytes, meta: RequestMeta) -> tuple[int, Unary]:
            return index, await dispatcher.unary(body, meta)

        tasks = [asyncio.ensure_future(one(i, b, m)) for i, (b, m) in enumerate(calls)]
        try:
            for done in asyncio.as_completed(tasks):
                yield await done
        finally:
            for task in tasks:
                task.cancel()

    async def stream(self, body: bytes, meta: RequestMeta) -> AsyncIterator[Head | bytes]:
        async for item in self._get().stream(body, meta):
            yield item

    async def __del__(self) -> None:
        if self._dispatcher is not None:
            await self._dispatcher.session.close()
