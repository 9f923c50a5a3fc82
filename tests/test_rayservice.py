"""deployments/rayservice.yaml against what KubeRay requires of a RayService (no package on the
registry ships its CRD schema, so the fields its `ray.io/v1` schema marks required are checked
here), its serve config against Ray Serve's own schema and this app's arguments, its pod
templates and NetworkPolicy against the Kubernetes API schema (kubernetes-validate), and its
doors: Ray's token authentication, the dashboard open to the operator only, HAProxy's admin
frontends on loopback, the admin token on the head only."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import tomllib
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.api.auth import ADMIN_TOKEN_ENV
from serve_app.app import AppArgs
from serve_app.core.serve_env import FAST_SERVE_ENV, HAPROXY_BINARY_ENV, REPLICA_CPUS
from serve_app.local.haproxy import ADMIN_HOST_ENV

ROOT = Path(__file__).resolve().parent.parent
DOCS = {
    d["kind"]: d for d in yaml.safe_load_all((ROOT / "deployments" / "rayservice.yaml").read_text())
}
DOC = DOCS["RayService"]
POLICY = DOCS["NetworkPolicy"]
CLUSTER = DOC["spec"]["rayClusterConfig"]
HEAD = CLUSTER["headGroupSpec"]
GROUPS = [HEAD, *CLUSTER["workerGroupSpecs"]]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
HAPROXY_WRAPPER = "serve-router-haproxy"
DASHBOARD_PORT = 8265
HEAD_RESOURCE = "node:__internal_head__"  # Ray's own, on the head node only


def _env(group: dict) -> list[dict[str, dict]]:
    """Each container's environment, by name."""
    return [{e["name"]: e for e in c["env"]} for c in group["template"]["spec"]["containers"]]


def _serve_config() -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load(DOC["spec"]["serveConfigV2"]))


def test_it_has_what_the_rayservice_crd_requires() -> None:
    assert (DOC["apiVersion"], DOC["kind"]) == ("ray.io/v1", "RayService")
    assert DOC["metadata"]["name"]
    assert isinstance(DOC["spec"]["serveConfigV2"], str)  # a YAML document in a string
    assert "template" in CLUSTER["headGroupSpec"]
    for group in CLUSTER["workerGroupSpecs"]:
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    for group in GROUPS:  # map[string]string in the CRD
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values())


def test_the_serve_config_is_valid_for_serve_and_for_this_app() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(DOC["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "serve_app.app:build_app" and app.route_prefix == "/"
    args = AppArgs.model_validate(app.args)
    mounted = {
        m["mountPath"]
        for c in CLUSTER["headGroupSpec"]["template"]["spec"]["containers"]
        for m in c.get("volumeMounts", [])
    }
    for path in (args.models_config, args.profiles_config, args.registry_path):
        assert path and any(path.startswith(f"{m}/") for m in mounted), path
    for name in ("models-config.json", "llm_models.json"):  # the config map is made from these
        assert (ROOT / "configs" / name).exists()
    serve_ports = [
        p["containerPort"]
        for c in CLUSTER["headGroupSpec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
        if p.get("name") == "serve"
    ]
    assert serve_ports == [config.http_options.port]


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.get("groupName", "head"))
def test_every_node_starts_ray_with_the_fast_path_and_haproxy_admin_on_loopback(
    group: dict,
) -> None:
    assert HAPROXY_WRAPPER in SCRIPTS  # the console script the images install
    for env in _env(group):
        assert {k: env[k].get("value") for k in FAST_SERVE_ENV} == FAST_SERVE_ENV
        assert Path(env[HAPROXY_BINARY_ENV]["value"]).name == HAPROXY_WRAPPER
        assert env.get(ADMIN_HOST_ENV, {}).get("value", "127.0.0.1") == "127.0.0.1"


def test_only_the_head_has_the_admin_token_and_the_ingress_runs_there() -> None:
    for env in _env(HEAD):
        assert env[ADMIN_TOKEN_ENV]["valueFrom"]["secretKeyRef"]["key"]
        assert "value" not in env[ADMIN_TOKEN_ENV]  # never inline
    for group in CLUSTER["workerGroupSpecs"]:
        assert all(ADMIN_TOKEN_ENV not in env for env in _env(group)), group["groupName"]
    # The ingress replicas serve the admin API: they run where the token is.
    (app,) = _serve_config().applications
    (ingress,) = [d for d in app.deployments if d.name == "Ingress"]
    options = ingress.ray_actor_options
    assert options.resources[HEAD_RESOURCE] > 0
    assert options.num_cpus == REPLICA_CPUS  # the override keeps the code's own reservation


def test_ray_token_authentication_is_on_with_the_operators_secret() -> None:
    assert CLUSTER["authOptions"]["mode"] == "token"
    for group in GROUPS:
        for env in _env(group):
            assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token"
            assert "value" not in env.get("RAY_AUTH_TOKEN", {})  # never inline


def test_the_network_policy_opens_the_router_port_to_all_and_the_dashboard_to_the_operator() -> (
    None
):
    kubernetes_validate.validate(POLICY, "1.33", strict=True)
    spec = POLICY["spec"]
    assert "Ingress" in spec["policyTypes"]
    selected = spec["podSelector"]["matchLabels"]
    for group in GROUPS:  # every pod of the cluster is under it
        assert selected.items() <= group["template"]["metadata"]["labels"].items()
    serve_port = _serve_config().http_options.port
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if "from" not in rule:  # anyone: the router's port only
            assert ports == {serve_port}, rule
            continue
        assert all("ipBlock" not in peer for peer in rule["from"]), rule
        if DASHBOARD_PORT in ports:  # the job API runs code: the operator only
            (peer,) = rule["from"]
            labels = peer["podSelector"]["matchLabels"]
            assert labels == {"app.kubernetes.io/component": "kuberay-operator"}, rule
        else:  # everything else: the cluster's own pods
            assert not ports and [p["podSelector"]["matchLabels"] for p in rule["from"]] == [
                selected
            ], rule


def test_gpu_workers_carry_the_custom_resources_of_ray_cluster_yaml() -> None:
    launcher = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    custom = {
        name
        for node in launcher["available_node_types"].values()
        for name in node["resources"]
        if name.startswith("gpu_node_")
    }
    carried = set()
    for group in CLUSTER["workerGroupSpecs"]:
        params = group["rayStartParams"]
        # `ray start --resources` takes JSON; KubeRay passes the value as written.
        resources = json.loads(json.loads(params["resources"]))
        carried |= set(resources)
        assert params["num-gpus"] == "1"
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert carried == custom


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.get("groupName", "head"))
def test_pod_templates_are_valid_kubernetes(group: dict) -> None:
    resource = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": group.get("groupName", "head")},
        "template": group["template"],
    }
    kubernetes_validate.validate(resource, "1.33", strict=True)
