"""ray_cluster.yaml declares a head and GPU workers whose custom resources providers can name,
and keeps the cluster's doors shut: Ray's token authentication on every node, the dashboard on
the head's loopback, HAProxy's admin frontends on loopback, the admin token on the head only
(with the ingress, by deployments/serve_config.yaml)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.api.auth import ADMIN_TOKEN_ENV
from serve_app.core.serve_env import FAST_SERVE_ENV, HAPROXY_BINARY_ENV, REPLICA_CPUS
from serve_app.local.haproxy import ADMIN_HOST_ENV

ROOT = Path(__file__).resolve().parent.parent
DOC = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
SERVE_CONFIG = ROOT / "deployments" / "serve_config.yaml"


def test_gpu_workers_carry_a_named_resource() -> None:
    doc = DOC
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    gpu = [t for name, t in types.items() if t["resources"].get("GPU")]
    assert gpu
    for node_type in gpu:
        custom = set(node_type["resources"]) - {"CPU", "GPU", "memory"}
        assert len(custom) == 1 and next(iter(custom)).startswith("gpu_node_")


START_ENV = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")


def _start(command: str) -> tuple[dict[str, str], list[str]]:
    """A `ray start` line's environment assignments and its own arguments (shell words)."""
    words = shlex.split(command)
    at = words.index("ray")
    env = dict(START_ENV.match(w).groups() for w in words[:at])  # type: ignore[union-attr]
    return env, words[at:]


def _starts(key: str) -> list[tuple[dict[str, str], list[str]]]:
    return [_start(c) for c in DOC[key] if c.split()[:2] != ["ray", "stop"]]


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_node_starts_ray_with_token_auth_the_fast_path_and_haproxy_on_loopback(
    key: str,
) -> None:
    (start,) = _starts(key)
    env, _ = start
    assert env["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_TOKEN" not in env  # the token is a file, never in this file
    assert {k: env.get(k) for k in FAST_SERVE_ENV} == FAST_SERVE_ENV
    assert Path(env[HAPROXY_BINARY_ENV]).name == "serve-router-haproxy"
    assert env.get(ADMIN_HOST_ENV, "127.0.0.1") == "127.0.0.1"
    # Ray reads its token from ~/.ray/auth_token; every node gets the launcher's copy.
    assert DOC["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_the_dashboard_is_on_loopback_and_the_admin_token_on_the_head_only() -> None:
    ((head_env, head_args),) = _starts("head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head_args
    assert not any(a.startswith("--dashboard-host") and "127.0.0.1" not in a for a in head_args)
    assert head_env[ADMIN_TOKEN_ENV].startswith("$(cat ")  # read from the head's file
    ((worker_env, _),) = _starts("worker_start_ray_commands")
    assert ADMIN_TOKEN_ENV not in worker_env


def test_the_serve_config_keeps_the_ingress_on_the_head() -> None:
    """The ingress replicas serve the admin API, whose token only the head has."""
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (app,) = config.applications
    (ingress,) = [d for d in app.deployments if d.name == "Ingress"]
    assert ingress.ray_actor_options.resources["node:__internal_head__"] > 0
    assert ingress.ray_actor_options.num_cpus == REPLICA_CPUS
