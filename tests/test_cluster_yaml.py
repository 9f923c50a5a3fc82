"""ray_cluster.yaml declares a head and GPU workers whose custom resources providers can name."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_workers_carry_a_named_resource() -> None:
    doc = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    gpu = [t for name, t in types.items() if t["resources"].get("GPU")]
    assert gpu
    for node_type in gpu:
        custom = set(node_type["resources"]) - {"CPU", "GPU", "memory"}
        assert len(custom) == 1 and next(iter(custom)).startswith("gpu_node_")
