"""`serve-router`: one command for what the router's users do from a shell."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

from serve_app.cli import admin, provision, run
from serve_app.cli.files import add_document_arguments
from serve_app.cli.output import say
from serve_app.core.config import ConfigError

EPILOG = """examples:
  serve-router run                       the demo upstream and the router on 127.0.0.1:8000
  serve-router run --config models.json --no-demo --host 0.0.0.0
  serve-router check --config models.json
  serve-router keys create team-a --models demo/echo --rpm 600
  serve-router status

The keys and status commands talk to a running router's admin API: set LLM_ROUTER_ADMIN_TOKEN
(the token the router was started with) and, for another router than 127.0.0.1:8000, --url."""


def _version() -> str:
    try:
        return version("serve-router")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def check(args: argparse.Namespace) -> int:
    """What `run` checks before it starts anything: the files and the settings."""
    from serve_app.app import check_settings

    try:
        checked = check_settings(run.app_args(args))
    except ConfigError as exc:
        say(str(exc))
        return 2
    groups = checked.config.model_types
    models = sum(len(g.models) for g in groups.values())
    profiles = "no profiles" if checked.profiles is None else f"profiles {checked.profiles[1]}"
    print(
        f"ok: {checked.source}: {len(groups)} model types, {models} models; {profiles} "
        f"(active: {checked.active_profile})"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="serve-router",
        description="An LLM inference router on Ray Serve: OpenAI, Ollama and Anthropic "
        "clients in, pools of vLLM, Ollama and OpenAI-compatible servers out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"serve-router {_version()}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=description)

    run.add_arguments(command("run", "start the router here until Ctrl-C", run.DESCRIPTION))
    add_document_arguments(
        command(
            "check",
            "validate the models config and profiles without starting anything",
            "Validate the models config and profiles as `run` does before it starts: prints "
            "what it read and exits 0, or prints the first problem on one line and exits 2.",
        )
    )
    provision.add_arguments(
        command("provision", "pull the profiles' models", provision.DESCRIPTION)
    )
    admin.add_keys_arguments(
        command(
            "keys",
            "create, list, show or revoke client keys",
            "Client keys of a running router (its admin API).",
        )
    )
    admin.add_status_arguments(
        command(
            "status",
            "each model's providers: state, in flight, load, requests/s",
            "A table of every model's providers on a running router: tier, state (and why), "
            "requests in flight, the upstream's own load (running, waiting, KV cache use), "
            "requests/s and 5xx/s over --interval.",
        )
    )
    return top


RUNS = {
    "run": run.run,
    "check": check,
    "provision": provision.run,
    "keys": admin.run_keys,
    "status": admin.run_status,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return RUNS[args.command](args)
