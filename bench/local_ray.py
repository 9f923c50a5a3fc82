"""A local Ray with a registry of its own, for the benchmarks that run router code in-process
against real actors (bench.strategy_cost, bench.key_cost)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from serve_app.serve_env import apply_fast_serve_env

if TYPE_CHECKING:
    from serve_app.registry.actor import RegistryRef


@contextmanager
def local_registry(name: str) -> Iterator[RegistryRef]:
    # The fast settings before Ray and Serve are imported: they read them at import.
    apply_fast_serve_env(single_node=True)
    import ray

    from serve_app.registry.actor import RegistryRef

    ray.init(include_dashboard=False, logging_level="error", log_to_driver=False)
    try:
        yield RegistryRef(name=name, path=f"{tempfile.mkdtemp(prefix=f'{name}-')}/registry.json")
    finally:
        ray.shutdown()
