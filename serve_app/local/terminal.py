"""Ctrl-C for this process alone, and children that neither get it nor outlive the driver.

A terminal sends Ctrl-C's SIGINT to its whole foreground process group. Under `make run` that
group is make's: make gets it too and prints `*** [run] Interrupt` whatever the router then
does. So while the router runs, its own process group takes the terminal's foreground (as a
shell's job control does) and hands it back after.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator

_PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def own_ctrl_c() -> Iterator[None]:
    """Within: Ctrl-C in the controlling terminal reaches this process's group only."""
    try:
        tty = os.open("/dev/tty", os.O_RDWR)
    except OSError:  # no controlling terminal (CI, a service, a test)
        yield
        return
    try:
        foreground = os.tcgetpgrp(tty)
        if foreground != os.getpgrp() or os.getpgrp() == os.getpid():
            yield  # in the background, or already the group's leader (started by a shell)
            return
        os.setpgid(0, 0)
        _set_foreground(tty, os.getpgrp())
        try:
            yield
        finally:
            _set_foreground(tty, foreground)
    finally:
        os.close(tty)


def _set_foreground(tty: int, group: int) -> None:
    # A process outside the foreground group that sets it is stopped by SIGTTOU unless it
    # ignores that signal meanwhile.
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(tty, group)
    finally:
        signal.signal(signal.SIGTTOU, previous)


def detached_child() -> None:
    """`preexec_fn` for a helper process (the demo upstream): it gets SIGTERM when the driver
    dies, even by SIGKILL (Linux), so it never outlives the run. Start it with
    `process_group=0` too, so Ctrl-C reaches the driver, which stops it last."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
