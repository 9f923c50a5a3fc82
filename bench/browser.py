"""Debian's chromium, headless, as the console's tests and bench.console_cost drive it with
Playwright (never a browser Playwright downloads)."""

from __future__ import annotations

from typing import Any

CHROMIUM = "/usr/bin/chromium"
# As root on a machine with no outside network: no sandbox, no GPU, nothing in the background.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def launch(playwright: Any, profile_dir: str) -> Any:
    """A browser context on a fresh profile folder (`--user-data-dir`)."""
    return playwright.chromium.launch_persistent_context(
        profile_dir,
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS,
        headless=True,
        viewport={"width": 1280, "height": 900},
    )
