"""Run by tests/test_provision_cluster.py in its own process: a three-node Ray cluster on one
machine (a head and two fake-GPU workers with custom resources), provisioning against fake Ollama
upstreams, printing the report and the node ids as JSON."""

from __future__ import annotations

import asyncio
import json

import ray
from ray.cluster_utils import Cluster

from serve_app.core.config import parse_config
from serve_app.demo.upstream import FakeUpstream
from serve_app.provision.manager import LLMModelManager
from serve_app.provision.profiles import parse_profiles


def _provider(pid: str, url: str, model: str, resource: str) -> dict:
    return {
        "id": pid,
        "api_host": url,
        "api_type": "ollama",
        "input_size": 4096,
        "model_path": model,
        "ray_resource": resource,
    }


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {
        name: cluster.add_node(num_cpus=1, num_gpus=1, resources={name: 1})
        for name in ("gpu_node_a", "gpu_node_b")
    }
    ray.init(address=cluster.address, logging_level="error", log_to_driver=False)
    cluster.wait_for_nodes()
    ups = {name: FakeUpstream(f"up-{name}") for name in nodes}
    for up in ups.values():
        up.start_in_thread()
    config = parse_config(
        {
            "gpu": {
                "m/a": {
                    "providers": [_provider("pa", ups["gpu_node_a"].url, "a:1b", "gpu_node_a")]
                },
                "m/b": {
                    "providers": [_provider("pb", ups["gpu_node_b"].url, "b:1b", "gpu_node_b")]
                },
            },
            "active_models": {"gpu": ["m/a", "m/b"]},
        }
    )
    roles = parse_profiles({"profiles": {"default": {"models": {"ra": "a:1b", "rb": "b:1b"}}}})
    manager = LLMModelManager(roles.roles("default"), config)
    report = asyncio.run(manager.ensure_models_installed())
    print(
        json.dumps(
            {
                "report": report,
                "nodes": {name: node.node_id for name, node in nodes.items()},
                "head": cluster.head_node.node_id,
                "pulls": {name: up.count("/api/pull") for name, up in ups.items()},
            }
        )
    )
    for up in ups.values():
        up.stop_thread()
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
