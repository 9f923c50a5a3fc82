"""`serve-router run` starts a Ray of its own, whatever this machine's `ray start` recorded: Ray
joins the cluster named in <temp dir>/ray/ray_current_cluster when ray.init has no address, and
a `ray start` killed without `ray stop` leaves that file naming a dead one."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from serve_app.demo.upstream import FakeUpstream
from tests.conftest import free_port
from tests.local_router import run_command
from tests.test_local_run import Run, alive, chat, runs  # noqa: F401 (runs: a fixture used here)


def test_run_starts_its_own_ray_past_a_recorded_cluster(
    runs: Callable[..., Run],  # noqa: F811
    upstream_factory: Callable[[str], FakeUpstream],
    tmp_path: Path,
) -> None:
    temp = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))  # short: Ray's socket paths
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        port = free_port()
        run = runs(run_command(port, upstream_factory("own-ray"), tmp_path), RAY_TMPDIR=str(temp))
        run.wait_ready()
        assert chat(port) == 200
        tree = run.tree()
        assert any(p.name() == "gcs_server" for p in tree), "the run started its own Ray"
        run.ctrl_c()
        run.wait(30)
        assert alive(tree) == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)
