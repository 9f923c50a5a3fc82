"""`serve-router provision` (monGARS's `python -m scripts.provision_models`, also under `ray job
submit`).

It connects to the running Ray cluster when there is one (`ray job submit` sets RAY_ADDRESS),
else starts a local one, reads the models config and the profiles, and provisions the roles as
Ray tasks on their providers' nodes. A human table by default, monGARS's JSON provisioning
report with `--json`; the exit status is 1 when any role failed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import orjson

from serve_app.cli.files import add_document_arguments, documents
from serve_app.cli.output import table
from serve_app.core.config import ConfigError, parse_config, read_raw
from serve_app.provision.profiles import (
    PROFILE_ENV,
    active_profile_name,
    parse_profiles,
    profiles_path,
    read_profiles,
)

FAILED = frozenset({"error", "unavailable"})
log = logging.getLogger("scripts.models.provision")


DESCRIPTION = "Ensure the active profile's models are on their providers (monGARS's profiles)."
COLUMNS = ("role", "provider", "provider_id", "action", "detail", "node", "duration_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--roles", nargs="+", help="roles to provision (default: all)")
    parser.add_argument("--force", action="store_true", help="re-check and re-pull, no cache")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    add_document_arguments(parser)
    parser.add_argument("--profile", help=f"profile (default: ${PROFILE_ENV} or 'default')")


def main(argv: list[str] | None = None) -> int:
    """`python -m scripts.provision_models`."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, format="%(message)s")
    log.setLevel(logging.INFO)
    try:
        found = documents(args.config, args.profiles)
        config = parse_config(*read_raw(found.config))
        document = read_profiles(found.profiles)
        if document is None:
            print(f"no profiles file: {profiles_path()} does not exist", file=sys.stderr)
            return 2
        roles = parse_profiles(*document).roles(args.profile or active_profile_name())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    import ray  # not before: `serve-router run` sets Ray's environment first

    from serve_app.cluster.registry.actor import RegistryRef
    from serve_app.provision.manager import LLMModelManager

    ray.init(logging_level="warning", include_dashboard=False)
    try:
        has_adapters = any(role.adapters for role in roles.values())
        registry = RegistryRef.resolve() if has_adapters else None
        manager = LLMModelManager(roles, config, registry)
        report = asyncio.run(manager.ensure_models_installed(args.roles, args.force))
    finally:
        ray.shutdown()
    statuses = report["statuses"]
    print(
        orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
        if args.json
        else table(COLUMNS, [[_cell(s, c) for c in COLUMNS] for s in statuses])
    )
    return 1 if any(s["action"] in FAILED for s in statuses) else 0


def _cell(status: dict[str, object], column: str) -> object:
    value = status.get(column)
    if column == "node" and isinstance(value, str):
        return value[:12]  # node ids are long; the prefix is enough to tell them apart
    return value
