"""The provisioning CLI: `python -m scripts.provision_models`, also under `ray job submit`.

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

from serve_app.cluster.registry.actor import RegistryRef
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


def _table(statuses: list[dict[str, object]]) -> str:
    columns = ("role", "provider", "provider_id", "action", "detail", "node", "duration_s")
    rows = [[str(s.get(c) if s.get(c) is not None else "-") for c in columns] for s in statuses]
    for row in rows:
        row[5] = row[5][:12]  # node ids are long; the prefix is enough to tell them apart
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ensure the active profile's models are installed")
    parser.add_argument("--roles", nargs="+", help="roles to provision (default: all)")
    parser.add_argument("--force", action="store_true", help="re-check and re-pull, no cache")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument("--models-config", help="models config (default: as the router)")
    parser.add_argument("--profiles", help="llm_models.json (default: configs/llm_models.json)")
    parser.add_argument("--profile", help=f"profile (default: ${PROFILE_ENV} or 'default')")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="%(message)s")
    log.setLevel(logging.INFO)
    try:
        config = parse_config(*read_raw(args.models_config))
        document = read_profiles(args.profiles)
        if document is None:
            print(f"no profiles file: {profiles_path()} does not exist", file=sys.stderr)
            return 2
        roles = parse_profiles(*document).roles(args.profile or active_profile_name())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    import ray

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
        orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if args.json else _table(statuses)
    )
    return 1 if any(s["action"] in FAILED for s in statuses) else 0
