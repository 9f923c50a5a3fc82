"""The Serve application: one ingress, one picker deployment (`router-<type>`) per active model
type.

`serve run deployments/serve_config.yaml` imports `serve_app.app:build_app`. Building the app
validates the models config and publishes it to the registry, so the replicas start on it.
"""

from __future__ import annotations

import sys
from typing import NamedTuple, NoReturn

import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import RayServeException
from ray.serve.schema import LoggingConfig

from serve_app.api.auth import admin_token
from serve_app.cluster.registry.actor import Published, RegistryRef
from serve_app.core.config import (
    Autoscaling,
    ConfigError,
    RouterConfig,
    StrategyName,
    config_path,
    default_strategy,
    exclusive_with_autoscaling,
    json_path,
    parse_config,
    read_raw,
    replicas_options,
)
from serve_app.core.schemas import BodyLimits
from serve_app.ingress.replica import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    Ingress,
    IngressSettings,
)
from serve_app.pickers.owner import PlanOwnerRouter
from serve_app.pickers.replica import ModelTypeRouter
from serve_app.provision.profiles import (
    KIND,
    active_profile_name,
    parse_profiles,
    profiles_path,
    read_profiles,
)

APP_NAME = "llm-router"
# JSON lines, no per-request access log (it costs throughput and carries client paths).
LOGGING = LoggingConfig(encoding="JSON", enable_access_log=False, log_level="INFO")
# How often a stopping replica checks that its requests are done (Serve's default, 2 s, is
# slept before the first check, so every stop and redeploy took at least that long).
DRAIN_POLL_S = 0.1


class AppArgs(BaseModel):
    """The YAML's `args`; every field has a default."""

    model_config = ConfigDict(extra="forbid")

    models_config: str | None = None
    # configs/llm_models.json (default: $LLM_MODELS_CONFIG, else that path if it exists).
    profiles_config: str | None = None
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0)
    # How long a request's body may take to arrive (408 past it), and what it may hold.
    body_timeout_s: float = Field(default=DEFAULT_BODY_TIMEOUT_S, gt=0)
    body_limits: BodyLimits = BodyLimits()
    # The Host names (any port) requests must carry: `serve-router run` on loopback sets the
    # loopback names (DNS rebinding); None: any.
    allowed_hosts: tuple[str, ...] | None = None
    ingress_replicas: int = Field(default=1, ge=1)
    # Serve's autoscaling of the ingress instead of ingress_replicas.
    ingress_autoscaling: Autoscaling | None = None
    # Registry actor name and manifest file (default: $LLM_ADAPTER_REGISTRY_PATH, else
    # state/registry.json under the working directory).
    registry_name: str | None = None
    registry_path: str | None = None
    watch_config: bool = False
    ack_timeout_s: float = Field(default=5.0, gt=0)
    # For model types whose routing names no strategy (default: $LLM_ROUTER_BALANCE_STRATEGY,
    # else balanced).
    balance_strategy: StrategyName | None = None

    @model_validator(mode="after")
    def _replicas(self) -> AppArgs:
        exclusive_with_autoscaling(self, "ingress_replicas", "ingress_autoscaling")
        return self


def router_deployment_name(model_type: str) -> str:
    return f"router-{model_type}"


class Checked(NamedTuple):
    """Everything the app is built from, validated before any Ray call."""

    raw: object
    source: str
    config: RouterConfig
    strategy: StrategyName
    profiles: tuple[object, str] | None
    active_profile: str


def check_settings(args: AppArgs, document: tuple[object, str] | None = None) -> Checked:
    """The models config, the profiles and the settings from the environment, validated.

    Pure (files and environment only), so `make run` checks them before Ray starts. Raises
    ConfigError (one line: file, JSON path, reason) on the first file or setting that fails.
    """
    raw, source = document or read_raw(args.models_config)
    config = parse_config(raw, source)
    strategy = default_strategy(args.balance_strategy)
    admin_token()  # a guessable admin token stops the start (api/auth.py)
    profiles = read_profiles(args.profiles_config)
    active = active_profile_name()
    if profiles is not None:
        parse_profiles(*profiles).roles(active)
    return Checked(raw, source, config, strategy, profiles, active)


def router_app(args: AppArgs, document: tuple[object, str] | None = None) -> Application:
    """The app for the models config file named in `args` (or `document`, already decoded).

    Raises ConfigError when the config does not validate (or clashes with a registered adapter).
    """
    checked = check_settings(args, document)
    config, profiles = checked.config, checked.profiles
    registry = RegistryRef.resolve(args.registry_name, args.registry_path)
    published: Published = ray.get(
        registry.handle().publish_config.remote(checked.raw, checked.source)
    )
    published.checked(checked.source)
    if profiles is not None:
        published = ray.get(
            registry.handle().publish_profiles.remote(*profiles, checked.active_profile)
        )
        published.checked(profiles[1], KIND)
    routers = {
        name: ModelTypeRouter.options(
            name=router_deployment_name(name),
            **replicas_options(group.routing.num_replicas, group.routing.autoscaling),
            max_ongoing_requests=group.routing.picker_ongoing(len(group.models)),
            graceful_shutdown_timeout_s=group.routing.drain_timeout_s,
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
            logging_config=LOGGING,
            request_router_config=RequestRouterConfig(request_router_class=PlanOwnerRouter),
        ).bind(name, registry, checked.strategy)
        for name, group in config.model_types.items()
    }
    settings = IngressSettings(
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout_s,
        body_limits=args.body_limits,
        allowed_hosts=args.allowed_hosts,
        config_path=str(config_path(args.models_config).resolve()),
        profiles_path=None if profiles is None else str(profiles_path(profiles[1]).resolve()),
        active_profile=checked.active_profile,
        watch_config=args.watch_config,
        ack_timeout_s=args.ack_timeout_s,
        default_strategy=checked.strategy,
    )
    drain = max(g.routing.drain_timeout_s for g in config.model_types.values())
    return Ingress.options(
        **replicas_options(args.ingress_replicas, args.ingress_autoscaling),
        logging_config=LOGGING,
        graceful_shutdown_timeout_s=drain,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    ).bind(routers, registry, settings)


def build_app(args: dict[str, object] | None = None) -> Application:
    """Serve's app-builder entry: args are the YAML's `args` (see AppArgs).

    A bad config or setting is one line, never a traceback: in a terminal (`serve run
    serve_app.app:build_app`, which builds before Ray starts) it is printed and the process
    exits 2; where Serve builds the app in its controller (`serve run` / `serve deploy` of a
    YAML) it is the application's status message (`serve status`).
    """
    try:
        app_args = AppArgs.model_validate(args or {})
    except ValidationError as exc:
        problems = [(json_path(e["loc"]), e["msg"]) for e in exc.errors()]
        return _refuse(ConfigError(APP_NAME, problems, "args of the Serve application"))
    try:
        return router_app(app_args)
    except ConfigError as exc:
        return _refuse(exc)


def _refuse(exc: ConfigError) -> NoReturn:
    if not ray.is_initialized():
        print(f"serve-router: {exc}", file=sys.stderr)
        raise SystemExit(2)
    raise RayServeException(str(exc))
