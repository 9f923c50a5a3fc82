"""`make e2e`: vLLM (CPU build) in its own environment, a tiny local model, then the e2e tests.

The tests start two vLLM servers on 127.0.0.1 and the router on Serve in front of them, and
stop what they started by pid. Re-runnable at once: the environment is reused while its stamp
matches requirements-vllm.txt, the model while its files are there. If vLLM cannot be
installed, this fails with pip's error: a green run always means the real server was tested.
Only `E2E_ALLOW_SKIP=1` (for a machine that cannot reach the package registries; CI never sets
it) turns that into a skip, and the summary line says SKIPPED.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.venv import ensure_venv, run_quietly
from tests.e2e.vllm_server import MODEL_DIR, ROOT, VLLM_PYTHON, stop_leftovers

VENV = VLLM_PYTHON.parent.parent
REQUIREMENTS = ROOT / "tests" / "e2e" / "requirements-vllm.txt"
# Unused on CPU or broken with it (torchvision's ops fail to register against this torch).
UNWANTED = ["torchvision", "torchaudio", "torchcodec", "triton"]
ALLOW_SKIP_ENV = "E2E_ALLOW_SKIP"


def install() -> str | None:
    """The vLLM environment; None when ready, else why it could not be made."""
    return ensure_venv(VENV, REQUIREMENTS, UNWANTED)


def make_model() -> str | None:
    if (MODEL_DIR / "a3" / "adapter_config.json").exists():
        return None
    script = ROOT / "tests" / "e2e" / "tiny_model.py"
    return run_quietly([str(VLLM_PYTHON), str(script), str(MODEL_DIR)])


def main() -> int:
    timings: dict[str, float] = {}
    started = time.monotonic()
    failed = install()
    timings["install_s"] = time.monotonic() - started
    if failed is not None:
        if os.environ.get(ALLOW_SKIP_ENV) == "1":
            print(f"{failed}\ne2e: SKIPPED ({ALLOW_SKIP_ENV}=1): vLLM could not be installed")
            return 0
        print(f"{failed}\ne2e: FAILED: vLLM could not be installed", file=sys.stderr)
        return 1
    step = time.monotonic()
    if (failed := make_model()) is not None:
        print(f"e2e: the tiny model could not be made: {failed}", file=sys.stderr)
        return 1
    timings["model_s"] = time.monotonic() - step
    step = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-m", "e2e", "-p", "no:cacheprovider"]
    stop_leftovers()
    status = subprocess.call([*command, "tests/e2e"], cwd=ROOT)
    if killed := stop_leftovers():  # pytest was cut short (a timeout ends the process at once)
        print(f"e2e: stopped vLLM servers the tests left running: pids {killed}")
    timings["tests_s"] = time.monotonic() - step
    timings["total_s"] = time.monotonic() - started
    summary = ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
    print(f"e2e: {'passed' if status == 0 else 'FAILED'} ({summary})")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
