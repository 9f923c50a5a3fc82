"""The Serve application: one ingress, one router deployment per active model type.

`serve run deployments/serve_config.yaml` imports `serve_app.app:build_app`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application
from ray.serve.schema import LoggingConfig

from serve_app.config import RouterConfig, load_config
from serve_app.deployments.ingress import DEFAULT_MAX_BODY_BYTES, Ingress
from serve_app.deployments.router import ModelTypeRouter

APP_NAME = "llm-router"
# JSON lines, no per-request access log (it costs throughput and carries client paths).
LOGGING = LoggingConfig(encoding="JSON", enable_access_log=False, log_level="INFO")


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models_config: str | None = None
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0)


def router_deployment_name(model_type: str) -> str:
    return f"router-{model_type}"


def router_app(config: RouterConfig, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Application:
    routers = {
        name: ModelTypeRouter.options(
            name=router_deployment_name(name),
            num_replicas=group.routing.num_replicas,
            max_ongoing_requests=group.routing.max_ongoing_requests,
            logging_config=LOGGING,
        ).bind(group)
        for name, group in config.model_types.items()
    }
    return Ingress.options(logging_config=LOGGING).bind(routers, config, max_body_bytes)


def build_app(args: dict[str, object] | None = None) -> Application:
    """Serve's app-builder entry: args are the YAML's `args` (see AppArgs)."""
    parsed = AppArgs.model_validate(args or {})
    return router_app(load_config(parsed.models_config), parsed.max_body_bytes)
