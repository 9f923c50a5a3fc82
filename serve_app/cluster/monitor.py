"""The monitor actor: provider health (probes, circuits) and the app's metrics, for every replica.

One named, detached actor per registry, separate from the registry because its state changes
often, needs no disk and its probing I/O must never delay a manifest acknowledgement. One actor
serves every model type: provider ids are unique across the config. Router replicas follow its
`HealthView` (providers out of service) with the same long-poll as the manifest, report a trip
when they see `circuit_failures` requests fail in a row, and push their metric totals each second.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson
import ray
from ray.actor import ActorHandle

from serve_app.cluster.follow import Followers, Signal
from serve_app.cluster.health import CIRCUIT_LEVEL, Breaker, Circuit, HealthView
from serve_app.cluster.registry.actor import RegistryRef
from serve_app.cluster.registry.companion import ManifestCompanion, companion_handle
from serve_app.cluster.registry.manifest import Manifest, config_of
from serve_app.cluster.status import StatusRow, health_of, status_rows
from serve_app.core.config import ConfigError, ProviderConfig, RouterConfig, RoutingConfig
from serve_app.core.metrics import IN_FLIGHT_METRIC, Snapshot, Tally, merge, render
from serve_app.core.series import SAMPLE_S, Series, summarize
from serve_app.pickers.queues import LENGTH_METRIC
from serve_app.routing.load import LoadSignal, parse_ollama_ps, parse_vllm_metrics
from serve_app.upstreams import probe_url, signal_url
from serve_app.upstreams.base import json_headers

log = logging.getLogger(__name__)

TICK_S = 0.2
# A replica that has not pushed metrics for this long is gone; its numbers leave the sums.
METRICS_TTL_S = 15.0


def monitor_handle(registry: RegistryRef) -> ActorHandle:
    """The registry's monitor; created if there is none (it starts from the manifest)."""
    return companion_handle(Monitor, registry, "monitor")


class _Provider:
    def __init__(self, provider: ProviderConfig, routing: RoutingConfig) -> None:
        self.config = provider
        self.routing = routing
        self.breaker = Breaker(routing.circuit_failures, routing.circuit_cooldown_s)
        self.next_probe = 0.0
        self.probing = False
        self.up: bool | None = None
        self.signal: LoadSignal | None = None
        self.signal_error = ""  # why the last scrape gave nothing


@ray.remote
class Monitor(ManifestCompanion):
    def __init__(self, registry: RegistryRef, role: str) -> None:
        super().__init__(registry, role)
        self._providers: dict[str, _Provider] = {}
        self._view = HealthView()
        self._changed = Signal()
        self._metrics: dict[str, tuple[float, Snapshot]] = {}
        self._signals_changed = False
        self._followers = Followers()
        self._config: RouterConfig | None = None
        self._series = Series()
        self._next_sample = 0.0

    def _apply(self, manifest: Manifest) -> None:
        try:
            config = config_of(manifest)
        except ConfigError:
            return
        self._config = config
        wanted = {
            p.id: (p, group.routing)
            for group in config.model_types.values()
            for model in group.models.values()
            for p in (*model.providers, *model.providers_sleep)
        }
        for pid, (provider, routing) in wanted.items():
            known = self._providers.get(pid)
            if known is None or known.config != provider or known.routing != routing:
                self._providers[pid] = _Provider(provider, routing)
        for pid in set(self._providers) - set(wanted):
            del self._providers[pid]
        self._publish()

    def _publish(self) -> None:
        self._signals_changed = False
        out = {
            pid: p.breaker.state
            for pid, p in self._providers.items()
            if p.breaker.state is not Circuit.CLOSED
        }
        load = {pid: p.signal for pid, p in self._providers.items() if p.signal is not None}
        if out != self._view.out or load != self._view.load:
            if out != self._view.out:
                log.warning("provider health changed", extra={"out_of_service": list(out)})
            self._view = HealthView(version=self._view.version + 1, out=out, load=load)
            self._changed.fire()

    async def _background(self) -> None:
        """Probes each provider of the manifest when due."""
        while True:
            now = time.monotonic()
            for p in self._providers.values():
                if p.probing:
                    continue
                if p.breaker.trial_due(now):
                    self._publish()
                elif p.breaker.state is Circuit.OPEN or p.next_probe > now:
                    continue
                p.probing = True
                asyncio.get_running_loop().create_task(self._probe(p))
            if self._signals_changed:  # one new view per tick, however many scrapes landed
                self._publish()
            if now >= self._next_sample:
                self._next_sample = now + SAMPLE_S
                self._series.add(time.time(), summarize(self._totals()))
            await asyncio.sleep(TICK_S)

    async def _probe(self, p: _Provider) -> None:
        """Is it up (and, when it is, how loaded: _scrape)."""
        try:
            try:
                status, _ = await self._get(p, probe_url(p.config))
                ok, reason = status < 500, f"probe HTTP {status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                ok, reason = False, f"probe {type(exc).__name__}"
            p.up = ok
            if ok:
                await self._scrape(p)
            else:
                p.signal, p.signal_error = None, "provider down"
        finally:
            p.probing = False
        p.next_probe = time.monotonic() + p.routing.health_check_interval_s
        self._signals_changed = True
        if p.breaker.record(ok, reason, time.monotonic()):
            self._publish()

    async def _scrape(self, p: _Provider) -> None:
        """The provider's load signals (routing.load), if its type reports any."""
        url = signal_url(p.config)
        if url is None:
            return
        try:
            status, data = await self._get(p, url)
            if status >= 400:
                raise ValueError(f"HTTP {status}")
            if p.config.api_type == "vllm":
                p.signal = parse_vllm_metrics(data.decode(errors="replace"))
            else:
                p.signal = parse_ollama_ps(orjson.loads(data))
            p.signal_error = ""
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            p.signal, p.signal_error = None, f"{type(exc).__name__}: {exc}"[:200]

    async def _get(self, p: _Provider, url: str) -> tuple[int, bytes]:
        """A GET of one of the provider's pages within its health-check timeout."""
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=p.routing.health_check_timeout_s)
        async with self._session.get(url, headers=json_headers(p.config), timeout=timeout) as resp:
            return resp.status, await resp.read()

    # --- follow protocol (picker replicas) --------------------------------------------------

    async def current(self, follower_id: str | None = None) -> HealthView:
        await self._ensure_started()
        return self._view

    async def wait_for_change(
        self, follower_id: str, known_version: int, busy: list[str], timeout_s: float
    ) -> HealthView | None:
        await self._ensure_started()
        self._followers.seen(follower_id, known_version, waiting=1)
        try:
            if self._view.version == known_version:
                await self._changed.wait(timeout_s)
        finally:
            self._followers.done_waiting(follower_id)
        return None if self._view.version == known_version else self._view

    async def leave(self, follower_id: str) -> None:
        self._metrics.pop(follower_id, None)
        self._followers.leave(follower_id)

    async def trip(self, provider_id: str, reason: str) -> None:
        """A replica saw the provider's requests fail `circuit_failures` times in a row."""
        p = self._providers.get(provider_id)
        if p is not None and p.breaker.trip(reason, time.monotonic()):
            self._publish()

    async def state(self) -> dict[str, object]:
        """For operators and tests: the health view's version and the one each picker replica
        has; each provider's circuit, last probe, and load signals (or why none)."""
        await self._ensure_started()
        if self._signals_changed:  # the version then covers the signals shown
            self._publish()
        providers = {
            pid: {
                "circuit": p.breaker.state.value,
                "reason": p.breaker.reason or None,  # why it opened (a probe's or a trip's)
                "probe_up": p.up,
                "signals": None if p.signal is None else p.signal.model_dump(),
                "signals_error": p.signal_error or None,
            }
            for pid, p in self._providers.items()
        }
        return {
            "version": self._view.version,
            "followers": self._followers.versions(),
            "providers": providers,
            "queues": self._queues(),
            "in_flight_by_replica": self._in_flight_by_replica(),
        }

    async def status(self) -> list[StatusRow]:
        """One row per model and provider (cluster/status.py), for operators."""
        await self._ensure_started()
        if self._config is None:
            return []
        health = {pid: health_of(p.breaker, p.up, p.signal) for pid, p in self._providers.items()}
        return status_rows(self._config, health, self._totals())

    async def overview(self) -> dict[str, object]:
        """For the console's Overview: the status rows, the flow-control queues and the last
        15 minutes of per-model series."""
        rows = await self.status()
        return {"rows": rows, "queues": self._queues(), "series": self._series.points()}

    def _totals(self) -> Snapshot:
        """The sum of every replica's last push, those at most METRICS_TTL_S old."""
        cutoff = time.monotonic() - METRICS_TTL_S
        return merge(snapshot for at, snapshot in self._metrics.values() if at >= cutoff)

    def _in_flight_by_replica(self) -> dict[str, int]:
        """Requests each picker replica has booked now (its last push): how Serve spreads the
        plan calls over the replicas."""
        cutoff = time.monotonic() - METRICS_TTL_S
        out: dict[str, int] = {}
        for replica_id, (at, snapshot) in self._metrics.items():
            booked = sum(
                value for (name, _), value in snapshot.values.items() if name == IN_FLIGHT_METRIC
            )
            if at >= cutoff and booked:
                out[replica_id] = int(booked)
        return out

    def _queues(self) -> dict[str, dict[str, int]]:
        """Flow control: requests waiting by model and priority, summed over the picker
        replicas' last pushes (at most a second old)."""
        out: dict[str, dict[str, int]] = {}
        for (name, labels), value in self._totals().values.items():
            if name == LENGTH_METRIC and value:
                out.setdefault(labels[0], {})[labels[1]] = int(value)
        return out

    # --- metrics -----------------------------------------------------------------------------

    async def push_metrics(self, replica_id: str, snapshot: Snapshot) -> None:
        self._metrics[replica_id] = (time.monotonic(), snapshot)

    async def render_metrics(self, replica_id: str, snapshot: Snapshot) -> bytes:
        """Every live replica's totals plus the health gauges; the caller's own are fresh."""
        await self._ensure_started()
        await self.push_metrics(replica_id, snapshot)
        cutoff = time.monotonic() - METRICS_TTL_S
        for rid in [r for r, (at, _) in self._metrics.items() if at < cutoff]:
            del self._metrics[rid]
        health = Tally()
        for pid, p in self._providers.items():
            health.set("llm_router_circuit_state", (pid,), CIRCUIT_LEVEL[p.breaker.state])
            if p.up is not None:
                health.set("llm_router_provider_probe_up", (pid,), float(p.up))
        snapshots = {rid: snap for rid, (_, snap) in self._metrics.items()}
        return render({**snapshots, "monitor": health.snapshot()})
