"""Virtual environments of their own for the programs measured beside the router (the real vLLM
of `make e2e` and `make bench-affinity`, the peers of `make bench-peers`): never the project's.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

STAMP = ".installed-stamp"


def run_quietly(command: list[str]) -> str | None:
    """None when it succeeded, else the end of what it printed."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return f"`{' '.join(command)}` exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}"


def ensure_venv(venv: Path, requirements: Path, unwanted: Sequence[str] = ()) -> str | None:
    """`venv` with `requirements` installed (then `unwanted` removed); reused while its stamp
    holds the same requirements. None when ready, else why it could not be made (pip's end)."""
    wanted = requirements.read_text()
    stamp = venv / STAMP
    if stamp.exists() and stamp.read_text() == wanted:
        return None
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [*pip, "--upgrade", "pip"],
        [*pip, "-r", str(requirements)],
    ]
    if unwanted:
        steps.append([python, "-m", "pip", "uninstall", "-y", "-q", *unwanted])
    for step in steps:
        if (failed := run_quietly(step)) is not None:
            return failed
    stamp.write_text(wanted)
    return None
