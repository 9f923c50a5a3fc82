"""deployments/rayservice.yaml against what KubeRay requires of a RayService (no package on the
registry ships its CRD schema, so the fields its `ray.io/v1` schema marks required are checked
here), its serve config against Ray Serve's own schema and this app's arguments, and its pod
templates against the Kubernetes API schema (kubernetes-validate)."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.app import AppArgs

ROOT = Path(__file__).resolve().parent.parent
DOC = yaml.safe_load((ROOT / "deployments" / "rayservice.yaml").read_text())
CLUSTER = DOC["spec"]["rayClusterConfig"]
GROUPS = [CLUSTER["headGroupSpec"], *CLUSTER["workerGroupSpecs"]]
FAST_PATH = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}


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
def test_every_node_starts_ray_with_the_fast_path_and_the_admin_token(group: dict) -> None:
    for container in group["template"]["spec"]["containers"]:
        env = {e["name"]: e for e in container["env"]}
        assert {k: env[k].get("value") for k in FAST_PATH} == FAST_PATH
        assert env["LLM_ROUTER_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["key"]
        assert "value" not in env["LLM_ROUTER_ADMIN_TOKEN"]  # never inline


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
