"""`make e2e`: vLLM (CPU build) in its own environment, a tiny local model, then the e2e tests.

The tests start two vLLM servers on 127.0.0.1 and the router on Serve in front of them, and
stop what they started by pid. Re-runnable at once: the environment is reused while its stamp
matches requirements-vllm.txt, the model while its files are there. If vLLM cannot be
installed from the package registries, the e2e tests are skipped and this says so loudly.
"""

from __future__ import annotations

import subprocess
import sys
import time

from tests.e2e.vllm_server import MODEL_DIR, ROOT, VLLM_PYTHON, stop_leftovers

VENV = VLLM_PYTHON.parent.parent
STAMP = VENV / ".installed-stamp"
REQUIREMENTS = ROOT / "tests" / "e2e" / "requirements-vllm.txt"
# Unused on CPU or broken with it (torchvision's ops fail to register against this torch).
UNWANTED = ["torchvision", "torchaudio", "torchcodec", "triton"]


def _run(command: list[str]) -> str | None:
    """None when it succeeded, else the end of what it printed."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return f"`{' '.join(command)}` exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}"


def install() -> str | None:
    """The vLLM environment; None when ready, else why it could not be made."""
    wanted = REQUIREMENTS.read_text()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return None
    pip = [str(VLLM_PYTHON), "-m", "pip", "install", "-q"]
    for step in (
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [*pip, "--upgrade", "pip"],
        [*pip, "-r", str(REQUIREMENTS)],
        [str(VLLM_PYTHON), "-m", "pip", "uninstall", "-y", "-q", *UNWANTED],
    ):
        if (failed := _run(step)) is not None:
            return failed
    STAMP.write_text(wanted)
    return None


def make_model() -> str | None:
    if (MODEL_DIR / "a3" / "adapter_config.json").exists():
        return None
    script = ROOT / "tests" / "e2e" / "tiny_model.py"
    return _run([str(VLLM_PYTHON), str(script), str(MODEL_DIR)])


def main() -> int:
    timings: dict[str, float] = {}
    started = time.monotonic()
    failed = install()
    timings["install_s"] = time.monotonic() - started
    if failed is not None:
        banner = "!" * 78
        print(f"{banner}\nE2E SKIPPED: vLLM could not be installed.\n{failed}\n{banner}")
        return 0
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
