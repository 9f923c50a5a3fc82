"""One Serve deployment per model type, its picker: a thin shell around a Picker that follows
the registry (config and adapter changes apply without a restart) and the monitor (health,
load). The ingress asks it where each request goes and reports back what happened; no body or
answer byte crosses to it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from ray import serve

from serve_app.cluster.broker import Terms, broker_handle
from serve_app.cluster.follow import Follower
from serve_app.cluster.health import HealthView
from serve_app.cluster.monitor import monitor_handle
from serve_app.cluster.registry.actor import RegistryRef
from serve_app.cluster.registry.adapters import retiring_names
from serve_app.cluster.registry.manifest import Manifest, effective_config, unplaced_adapters
from serve_app.core.config import RouterConfig, RoutingConfig, StrategyName
from serve_app.core.metrics import (
    IN_FLIGHT_METRIC,
    KV_BLOCKS_METRIC,
    KV_EVENTS_METRIC,
    KV_LAG_METRIC,
    KV_SPILLS_METRIC,
    Tally,
)
from serve_app.core.schemas import RequestMeta
from serve_app.core.serve_env import REPLICA_CPUS
from serve_app.local.loopback import keep_replica_grpc_on_loopback
from serve_app.pickers.handler import ModelHandler
from serve_app.pickers.kv import KvFeeds
from serve_app.pickers.picker import Picker
from serve_app.pickers.plan import Plan, Report
from serve_app.pickers.queues import LENGTH_METRIC
from serve_app.pickers.shared import SharedState
from serve_app.provision.manager import LLMModelManager, auto_pull_models
from serve_app.routing.strategies import KvAware

METRICS_PUSH_S = 1.0
EXPIRE_S = 1.0  # how often plans no ingress lists any more are looked for


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=1000)
class ModelTypeRouter:
    async def __init__(
        self, model_type: str, registry: RegistryRef, default_strategy: StrategyName = "balanced"
    ) -> None:
        """Runs on the replica's event loop; returns (and traffic starts) once the current
        manifest and provider health are applied. `default_strategy`: for a routing without
        one (resolved where the app is built)."""
        keep_replica_grpc_on_loopback()  # before Serve opens this replica's gRPC server
        self._model_type = model_type
        self._default_strategy = default_strategy
        self._picker: Picker | None = None
        self._manager: LLMModelManager | None = None
        self._auto_pull: dict[str, str] = {}
        self._pull_tried: set[str] = set()
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._id = f"router-{model_type}:{self._replica}"
        self._health = HealthView()
        self._shared = SharedState(lambda: broker_handle(registry), self._id)
        # kv_aware: what the engines hold, from their KV events
        self._kv = KvFeeds(lambda pid, s: self._shared.tally.observe(KV_LAG_METRIC, (pid,), s))
        self._monitor = Follower(
            lambda: monitor_handle(registry), self._id, HealthView(), self._apply_health
        )
        self._follower = Follower(registry.handle, self._id, Manifest(), self._apply, self._busy)
        await self._follower.start()
        await self._monitor.start()
        self._shared.start()
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        self._expirer = asyncio.get_running_loop().create_task(self._expire())

    def _apply(self, manifest: Manifest) -> None:
        effective = effective_config(manifest)
        group = effective.model_types.get(self._model_type)
        config = RouterConfig(
            source=manifest.config_source,
            model_types={} if group is None else {group.name: group},
        )
        roles = manifest.roles()
        self._auto_pull = auto_pull_models(config, roles)
        if self._manager is None:
            self._manager = LLMModelManager(roles, config)
        else:
            self._manager.update(roles, config)
        routing = RoutingConfig() if group is None else group.routing
        previous = None if self._picker is None else self._picker.handler
        handler = ModelHandler(
            config=config,
            previous=previous,
            default=self._default_strategy,
            unplaced=unplaced_adapters(manifest, effective),
        )
        self._shared.configure(
            list(handler.states),
            list(handler.strategy_names),
            Terms.of(routing),
            follow_index=any(
                model.routes_by_text(handler.strategy_names[name])
                for name, model in handler.api_model_config.models_configs.items()
            ),
        )
        self._kv.configure(
            [
                p
                for model in handler.api_model_config.models_configs.values()
                for p in (*model.providers, *model.providers_sleep)
            ]
        )
        if self._picker is None:
            self._picker = Picker(
                self._replica, handler, routing, self._trip, self._shared, kv=self._kv
            )
        else:
            self._picker.update(handler, routing)
        self._apply_health(self._health)

    def _apply_health(self, view: HealthView) -> None:
        self._health = view
        if self._picker is not None:
            for pid, state in self._picker.handler.states.items():
                out = pid in view.out
                if state.out_of_service and not out:
                    # Its probes pass again: this replica's own mark of recent failures goes.
                    state.down_until, state.failures = 0.0, 0
                if out and not state.out_of_service:
                    self._kv.forget(pid)  # its circuit opened: what it held is not known
                state.out_of_service = out
                state.signal = view.load.get(pid)
            self._picker.queues.dispatch_all()  # new load figures may leave room

    def _trip(self, provider_id: str, reason: str) -> None:
        self._monitor.actor().trip.remote(provider_id, reason)  # fire and forget

    async def _push_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_PUSH_S)
            tally = self._shared.tally
            for pid, state in self._live.handler.states.items():
                tally.set(IN_FLIGHT_METRIC, (pid,), state.in_flight)
            for (model, priority), length in self._live.queues.lengths().items():
                tally.set(LENGTH_METRIC, (model, str(priority)), length)
            self._kv_metrics(tally)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._monitor.actor().push_metrics.remote(self._id, tally.snapshot()),
                    METRICS_PUSH_S,
                )

    def _kv_metrics(self, tally: Tally) -> None:
        for pid, blocks, stats in self._kv.per_provider():
            tally.set(KV_BLOCKS_METRIC, (pid,), blocks)
            tally.declare(KV_LAG_METRIC, (pid,))
            for kind, value in (
                ("applied", stats.batches),
                ("replayed", stats.replayed),
                ("gap", stats.gaps),
                ("hole", stats.holes),
                ("restart", stats.restarts),
                ("silence", stats.silences),
                ("error", stats.errors + stats.decode_errors),
            ):
                tally.set(KV_EVENTS_METRIC, (pid, kind), value)
        for model, strategy in self._live.handler.strategies.items():
            if isinstance(strategy, KvAware):
                tally.set(KV_SPILLS_METRIC, (model,), strategy.spills)

    async def _expire(self) -> None:
        # Exported at 0 from the start: a rate over it has data before any plan expires.
        self._shared.tally.inc("llm_router_plans_expired", (), 0)
        while True:
            await asyncio.sleep(EXPIRE_S)
            if gone := self._live.expire():
                self._shared.tally.inc("llm_router_plans_expired", (), gone)

    def _busy(self, manifest: Manifest) -> list[str]:
        """Retiring adapter versions this replica still has requests on."""
        retiring = retiring_names(manifest)
        return sorted(n for n, c in self._live.in_use.items() if c > 0 and n in retiring)

    async def _ready(self, meta: RequestMeta) -> None:
        """monGARS's runtime rule: before the first request for a model whose role has
        `auto_download`, ensure it is on its Ollama providers (once per replica, whatever the
        outcome; the admin API or the CLI retries)."""
        role = self._auto_pull.get(meta.model)
        if role is not None and meta.model not in self._pull_tried:
            assert self._manager is not None
            await self._manager.ensure_role(role)
            self._pull_tried.add(meta.model)

    @property
    def _live(self) -> Picker:
        assert self._picker is not None  # set by __init__ before any request
        return self._picker

    async def plan(self, meta: RequestMeta, prefix: Sequence[int], spares: int = 0) -> Plan:
        """Where the request goes, booked until the ingress reports it done (and `spares`
        plans made ahead, where the strategy allows)."""
        await self._ready(meta)
        return await self._live.plan(meta, prefix, spares)

    async def plan_many(
        self, calls: list[tuple[RequestMeta, Sequence[int], int]]
    ) -> AsyncIterator[tuple[int, Plan]]:
        """Several plans in one trip; each is yielded as soon as it is ready."""

        async def one(index: int, call: tuple[RequestMeta, Sequence[int], int]) -> tuple[int, Plan]:
            return index, await self.plan(*call)

        tasks = [asyncio.ensure_future(one(i, call)) for i, call in enumerate(calls)]
        try:
            for done in asyncio.as_completed(tasks):
                yield await done
        finally:
            for task in tasks:
                task.cancel()

    async def next(self, owner: str, plan_id: str) -> Plan:
        """A slot plan's next provider (`owner`: this replica; Serve routes by it)."""
        return await self._live.next(plan_id)

    async def plan_at(self, owner: str, meta: RequestMeta, prefix: Sequence[int]) -> Plan:
        """A plan asked of this replica by name (`owner`; flow control's balance: see
        ingress/picking.py)."""
        return await self.plan(meta, prefix)

    async def wait(self, owner: str, ticket: str) -> Plan:
        """A queued request's plan once it may go (`owner`: this replica; Serve routes by it).
        Cancelled when its client leaves: the request leaves the queue."""
        return await self._live.wait(ticket)

    async def report(self, owner: str, report: Report) -> None:
        """An ingress replica's outcomes (`owner`: this replica; Serve routes by it)."""
        self._live.report(report)

    async def __del__(self) -> None:
        self._pusher.cancel()
        self._expirer.cancel()
        await self._follower.stop()
        await self._monitor.stop()
        await self._shared.stop()
