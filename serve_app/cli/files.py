"""Which models config and profiles a command reads (paths and the environment only).

The same order as the router's own (an argument, else the environment variable, else the file
under `configs/` in the working directory), then, for commands run anywhere else, the demo's
documents shipped inside the package, so `serve-router run` from an empty directory serves
the demo as `make run` does in a checkout.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NamedTuple

from serve_app.core.config import CONFIG_ENV, DEFAULT_CONFIG_PATH
from serve_app.provision.profiles import DEFAULT_PROFILES_PATH, PROFILES_PATH_ENV

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo" / "config"
DEMO_CONFIG = DEMO_DIR / "models-config.json"
DEMO_PROFILES = DEMO_DIR / "llm_models.json"


class Documents(NamedTuple):
    config: str
    profiles: str | None  # None: the router's own default (configs/llm_models.json if present)


def documents(config: str | None, profiles: str | None) -> Documents:
    named = config or os.environ.get(CONFIG_ENV)
    if named is None and Path(DEFAULT_CONFIG_PATH).exists():
        named = DEFAULT_CONFIG_PATH
    if named is not None:
        return Documents(named, profiles)
    profiles = profiles or os.environ.get(PROFILES_PATH_ENV)
    if profiles is None and not Path(DEFAULT_PROFILES_PATH).exists():
        profiles = str(DEMO_PROFILES)
    return Documents(str(DEMO_CONFIG), profiles)


def add_document_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --profiles, with the defaults `documents` applies."""
    parser.add_argument(
        "--config",
        "--models-config",
        dest="config",
        metavar="FILE",
        help=f"radlab llm-router models config (default: ${CONFIG_ENV}, else "
        f"{DEFAULT_CONFIG_PATH} if present, else the demo's)",
    )
    parser.add_argument(
        "--profiles",
        metavar="FILE",
        help=f"monGARS llm_models.json profiles (default: ${PROFILES_PATH_ENV}, else "
        f"{DEFAULT_PROFILES_PATH} if present; the demo's with the demo's config)",
    )
