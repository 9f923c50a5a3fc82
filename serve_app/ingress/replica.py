"""The ingress deployment: one FastAPI app with a router per API surface (serve_app/api), the
upstream calls it relays itself (one pooled aiohttp session per replica), and the replica's
lifecycle: following the registry's manifest, reporting to the pickers, pushing metrics,
watching the config.

The surfaces reach this replica's state through `serve_app.api.http.replica()`.
"""

import asyncio
import socket

import aiohttp
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp

from serve_app.access.gate import Gate
from serve_app.access.limiter import limiter_handle
from serve_app.api import admin, anthropic, console, keys, ollama, openai, ops, responses
from serve_app.api.admin import Admin, AdminSettings
from serve_app.api.auth import admin_token
from serve_app.api.http import install_error_handlers
from serve_app.cluster.follow import Follower
from serve_app.cluster.monitor import monitor_handle
from serve_app.cluster.registry.actor import RegistryRef
from serve_app.cluster.registry.manifest import Manifest, effective_config
from serve_app.conversations.actor import responses_handle
from serve_app.conversations.service import Conversations
from serve_app.core.config import StrategyName
from serve_app.core.metrics import Tally
from serve_app.core.schemas import BodyLimits
from serve_app.core.serve_env import REPLICA_CPUS
from serve_app.ingress.gateway import BodyRules, Gateway, router_error
from serve_app.ingress.lean import LeanRoutes
from serve_app.ingress.outcomes import Reporter
from serve_app.ingress.picking import PickerLink
from serve_app.ingress.relay import Relay
from serve_app.local.loopback import keep_replica_grpc_on_loopback
from serve_app.pickers.plan import Report

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 60.0
METRICS_PUSH_S = 1.0

api = FastAPI(
    title="serve-router",
    version="0.1.0",
    description="LLM router on Ray Serve: OpenAI, Ollama, OpenAI Responses and Anthropic "
    "Messages APIs",
)
# The surfaces' routes are added to the app's own router rather than by include_router: an
# included router is a node that each request is matched through first (about 15 us more per
# request, measured in-process with FastAPI 0.163).
for surface in (openai, responses, anthropic, ollama, ops, admin, keys, console):
    api.router.routes.extend(surface.router.routes)
install_error_handlers(api)


class IngressSettings(AdminSettings):
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    body_limits: BodyLimits = BodyLimits()
    # The Host names requests must carry (any port); None: any (core/door.py).
    allowed_hosts: tuple[str, ...] | None = None
    watch_config: bool = False
    # For model types whose routing names no strategy (the pickers' default too).
    default_strategy: StrategyName = "balanced"


def _session() -> aiohttp.ClientSession:
    """Pooled keep-alive connections to the upstreams, Nagle off (a streamed event goes out as
    soon as it is written)."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, socket_factory=_no_delay_socket)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False)


def _no_delay_socket(addr_info: tuple) -> socket.socket:  # type: ignore[type-arg]
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=2000)
@serve.ingress()
class Ingress:
    async def __init__(
        self,
        routers: dict[str, DeploymentHandle],
        registry: RegistryRef,
        settings: IngressSettings,
    ) -> None:
        keep_replica_grpc_on_loopback()  # before Serve opens this replica's gRPC server
        token = admin_token()  # a guessable one stops the replica here, with its reason
        self._id = f"ingress:{serve.get_replica_context().replica_id.unique_id}"
        self._registry = registry
        self._monitor_handle: ActorHandle | None = None
        self.gate = Gate(self._id, lambda: limiter_handle(registry), Tally())
        links: dict[str, PickerLink] = {}

        async def send(key: tuple[str, str], report: Report) -> None:
            await links[key[0]].report(key[1], report)

        self._reporter: Reporter[tuple[str, str]] = Reporter(self._id, send)
        links.update({t: PickerLink(t, h, self._reporter) for t, h in routers.items()})
        self._links = links
        self._session = _session()
        relay = Relay(self._session, self._reporter, self.gate.tally)
        conversations = Conversations(lambda: responses_handle(registry), self._id)
        self.gateway = Gateway(
            links,
            relay,
            BodyRules(settings.max_body_bytes, settings.body_timeout_s, settings.body_limits),
            self.gate,
            settings.default_strategy,
            conversations,
        )
        self._follower = Follower(registry.handle, self._id, Manifest(), self._apply)
        self.admin = Admin(self._follower, registry, self.gateway, settings, token)
        await self._follower.start()
        self._reporter.start()
        loop = asyncio.get_running_loop()
        self._pusher = loop.create_task(self._push_metrics())
        self._watcher = loop.create_task(self.admin.watch()) if settings.watch_config else None
        self._allowed_hosts = settings.allowed_hosts

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """Serve's hook, after __init__: the inference routes on the lean path, the rest on
        FastAPI (api/lean.py)."""
        return LeanRoutes(api, self.gateway, self._allowed_hosts)

    def _apply(self, manifest: Manifest) -> None:
        config = effective_config(manifest)
        self.gateway.apply(manifest, config)
        self.gate.apply(manifest, config)
        self.admin.apply(config)

    async def __del__(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self._pusher.cancel()
        self.gate.stop()
        await self.gateway.conversations.stop()
        await self._reporter.stop()
        await self._session.close()
        await self._follower.stop()

    def _monitor(self) -> ActorHandle:
        if self._monitor_handle is None:
            self._monitor_handle = monitor_handle(self._registry)
        return self._monitor_handle

    async def _push_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_PUSH_S)
            for link in self._links.values():
                link.sweep()
            try:
                await asyncio.wait_for(
                    self._monitor().push_metrics.remote(self._id, self.gateway.tally.snapshot()),
                    METRICS_PUSH_S,
                )
            except Exception:
                self._monitor_handle = None

    async def metrics(self) -> Response:
        """Prometheus text for the whole app (every replica's totals, provider health)."""
        try:
            text = await asyncio.wait_for(
                self._monitor().render_metrics.remote(self._id, self.gateway.tally.snapshot()), 5.0
            )
        except Exception:
            self._monitor_handle = None
            raise router_error(503, "metrics are unavailable") from None
        return Response(text, media_type=CONTENT_TYPE_LATEST)
