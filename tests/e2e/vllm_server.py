"""One real vLLM OpenAI server (CPU build) on 127.0.0.1, started and stopped by pid.

Its environment keeps it on loopback and inside the repo's `.e2e/` folder: VLLM_HOST_IP for its
internal queues, TMPDIR and VLLM_RPC_BASE_PATH for its socket files, its caches, no hub, no
usage stats, runtime LoRA loading on, 1 GiB of KV cache, its engine on one core.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".e2e"  # git-ignored: the model, each server's folder and log
MODEL_DIR = WORK / "model"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SERVED_MODEL = "tiny"
MAX_MODEL_LEN = 256
READY_S = 300.0
PID_FILE = "pid"  # the server's pid (its process group), removed when it is stopped


def stop_leftovers() -> list[int]:
    """Kill the process groups of servers a run that was cut short left behind (their pid files
    are still there); the pids killed."""
    killed = []
    for pid_file in (WORK / "servers").glob(f"*/{PID_FILE}"):
        pid = int(pid_file.read_text())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if b"vllm.entrypoints" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
        pid_file.unlink()
    return killed


class VllmServer:
    def __init__(
        self,
        name: str,
        port: int,
        core: int | str,
        extra: Sequence[str] = (),
        model: Path = MODEL_DIR / "base",
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`core`: the CPU its engine's OpenMP threads are bound to ("nobind": one thread the
        kernel places, for more servers than cores). A busy engine's threads
        spin on their core and starve whatever else is pinned there: with both engines on core
        0, a restarted server's engine never finished starting while the other served (and a
        start-up helper of vLLM's, pinned to core 0, stalled the same way), so the tests do not
        load the other server while one starts. `extra`: more server arguments (a later
        one wins). `env`: more environment (VLLM_ENABLE_RESPONSES_API_STORE)."""
        self.name = name
        self.extra = list(extra)
        self.env = dict(env or {})
        self.model = model
        self.port = port
        self.core = core
        self.url = f"http://127.0.0.1:{port}"
        self.folder = WORK / "servers" / name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (a new process group: vLLM starts engine processes of its own)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "VLLM_HOST_IP": "127.0.0.1",
            "TMPDIR": str(self.folder),
            "VLLM_RPC_BASE_PATH": str(self.folder),
            "VLLM_CACHE_ROOT": str(self.folder / "cache"),
            "XDG_CACHE_HOME": str(self.folder / "xdg"),
            "HF_HOME": str(self.folder / "hf"),
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(self.core),
            **({"OMP_NUM_THREADS": "1"} if self.core == "nobind" else {}),
            **self.env,
        }
        command = [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            SERVED_MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--max-loras",
            "2",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--dtype",
            "float32",
            "--enable-prefix-caching",
            *self.extra,
        ]
        with open(self.folder / "log", "ab") as log:
            self.proc = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        (self.folder / PID_FILE).write_text(str(self.proc.pid))

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = READY_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            if self.proc is None or self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"vLLM {self.name} did not start; its log ends:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.folder / "log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9 of the server and its engine processes."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP of the server and its engine: it accepts connections and never answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(5)
        (self.folder / PID_FILE).unlink(missing_ok=True)

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
