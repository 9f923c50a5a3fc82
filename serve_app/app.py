"""The Serve application: one ingress, one router deployment per active model type.

`serve run deployments/serve_config.yaml` imports `serve_app.app:build_app`. Building the app
validates the models config and publishes it to the registry, so the replicas start on it.
"""

from __future__ import annotations

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application
from ray.serve.schema import LoggingConfig

from serve_app.config import (
    StrategyName,
    config_path,
    default_strategy,
    parse_config,
    read_raw,
)
from serve_app.deployments.ingress import DEFAULT_MAX_BODY_BYTES, Ingress, IngressSettings
from serve_app.deployments.router import ModelTypeRouter
from serve_app.profiles import (
    KIND,
    active_profile_name,
    profiles_path,
    read_profiles,
)
from serve_app.registry.actor import Published, RegistryRef

APP_NAME = "llm-router"
# JSON lines, no per-request access log (it costs throughput and carries client paths).
LOGGING = LoggingConfig(encoding="JSON", enable_access_log=False, log_level="INFO")


class AppArgs(BaseModel):
    """The YAML's `args`; every field has a default."""

    model_config = ConfigDict(extra="forbid")

    models_config: str | None = None
    # configs/llm_models.json (default: $LLM_MODELS_CONFIG, else that path if it exists).
    profiles_config: str | None = None
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0)
    # Registry actor name and manifest file (default: $LLM_ADAPTER_REGISTRY_PATH, else
    # state/registry.json under the working directory).
    registry_name: str | None = None
    registry_path: str | None = None
    watch_config: bool = False
    ack_timeout_s: float = Field(default=5.0, gt=0)
    # For model types whose routing names no strategy (default: $LLM_ROUTER_BALANCE_STRATEGY,
    # else balanced).
    balance_strategy: StrategyName | None = None


def router_deployment_name(model_type: str) -> str:
    return f"router-{model_type}"


def router_app(args: AppArgs, document: tuple[object, str] | None = None) -> Application:
    """The app for the models config file named in `args` (or `document`, already decoded).

    Raises ConfigError when the config does not validate (or clashes with a registered adapter).
    """
    raw, source = document or read_raw(args.models_config)
    config = parse_config(raw, source)
    strategy = default_strategy(args.balance_strategy)
    registry = RegistryRef.resolve(args.registry_name, args.registry_path)
    published: Published = ray.get(registry.handle().publish_config.remote(raw, source))
    published.checked(source)
    profiles = read_profiles(args.profiles_config)
    active = active_profile_name()
    if profiles is not None:
        published = ray.get(registry.handle().publish_profiles.remote(*profiles, active))
        published.checked(profiles[1], KIND)
    routers = {
        name: ModelTypeRouter.options(
            name=router_deployment_name(name),
            num_replicas=group.routing.num_replicas,
            max_ongoing_requests=group.routing.max_ongoing_requests,
            graceful_shutdown_timeout_s=group.routing.drain_timeout_s,
            logging_config=LOGGING,
        ).bind(name, registry, strategy)
        for name, group in config.model_types.items()
    }
    settings = IngressSettings(
        max_body_bytes=args.max_body_bytes,
        config_path=str(config_path(args.models_config).resolve()),
        profiles_path=None if profiles is None else str(profiles_path(profiles[1]).resolve()),
        active_profile=active,
        watch_config=args.watch_config,
        ack_timeout_s=args.ack_timeout_s,
    )
    drain = max(g.routing.drain_timeout_s for g in config.model_types.values())
    return Ingress.options(logging_config=LOGGING, graceful_shutdown_timeout_s=drain).bind(
        routers, registry, settings
    )


def build_app(args: dict[str, object] | None = None) -> Application:
    """Serve's app-builder entry: args are the YAML's `args` (see AppArgs)."""
    return router_app(AppArgs.model_validate(args or {}))
