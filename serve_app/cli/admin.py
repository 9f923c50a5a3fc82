"""`serve-router keys ...` and `serve-router status`: thin clients of a running router's admin
API (`--url`, the admin token from $LLM_ROUTER_ADMIN_TOKEN). The API's errors are shown as one
line (`<status> <code>: <message>`) and exit status 1; nothing here prints the admin token,
and a key's secret only once, when it is made."""

from __future__ import annotations

import argparse
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from serve_app.access.keys import PERIOD_S
from serve_app.api.auth import ADMIN_TOKEN_ENV
from serve_app.cli.output import say, table

URL_ENV = "SERVE_ROUTER_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 30.0  # a key's creation waits for every replica to know it (5 s by default)


Command = Callable[["AdminClient", argparse.Namespace], str]


class AdminError(Exception):
    """One line for the user: the API's error, or why the router could not be reached."""


class AdminClient:
    def __init__(self, url: str, token: str) -> None:
        self._url = url.rstrip("/")
        self._token = token

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self._url}{path}",
            data=None if body is None else orjson.dumps(body),
            method=method,
            headers={"authorization": f"Bearer {self._token}", "content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise AdminError(_api_error(exc.code, exc.read())) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach the router at {self._url}: {reason}") from None


def _api_error(status: int, body: bytes) -> str:
    """`<status> <code>: <message>` from the API's error shape (OpenAI's), else the status."""
    try:
        error = orjson.loads(body)["error"]
        return f"{status} {error.get('code') or error.get('type')}: {error['message']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"{status}: {body[:200].decode(errors='replace')}"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"the router (default: ${URL_ENV}, else {DEFAULT_URL}); "
        f"the admin token is read from ${ADMIN_TOKEN_ENV}",
    )


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = commands.add_parser(
        "create", help="make a client key (its secret is shown once)", description=KEYS_CREATE
    )
    create.add_argument("name", help="a name for the key (letters, digits, . _ : @ -)")
    create.add_argument("--models", nargs="+", metavar="MODEL", help="models it may use (all)")
    create.add_argument(
        "--rpm", type=int, dest="rpm_limit", metavar="N", help="requests per minute"
    )
    create.add_argument("--tpm", type=int, dest="tpm_limit", metavar="N", help="tokens per minute")
    create.add_argument(
        "--budget", type=int, dest="token_budget", metavar="TOKENS", help="tokens per period"
    )
    create.add_argument(
        "--budget-period", choices=sorted(PERIOD_S), help="(default: the key's life)"
    )
    create.add_argument("--expires-in", type=float, metavar="SECONDS", help="(default: never)")
    create.add_argument(
        "--priority", type=int, metavar="N", help="flow control: higher waits less (0)"
    )
    create.add_argument(
        "--weight", type=float, metavar="W", help="flow control: fair share weight (1)"
    )
    create.add_argument(
        "--set-priority", action="store_true", help="its clients may send x-priority"
    )
    create.add_argument(
        "--max-priority",
        type=int,
        metavar="N",
        help="the highest x-priority it may send (its priority)",
    )
    create.add_argument(
        "--default-max-tokens",
        type=int,
        metavar="TOKENS",
        help="counted against --tpm and --budget for a request naming no max_tokens",
    )
    listed = commands.add_parser("list", help="every key with its limits")
    show = commands.add_parser("show", help="one key, with its usage per model")
    revoke = commands.add_parser("revoke", help="refuse a key from now on")
    for command in (show, revoke):
        command.add_argument("key_id", help="the key's id (as `keys list` shows)")
    for command in (create, listed, show, revoke):
        add_connection_arguments(command)


KEYS_CREATE = (
    "Make a client key. Its secret is printed once, on stdout, and never again (the router "
    "keeps only a hash): give it to the client as its API key."
)
LIMITS = ("rpm_limit", "tpm_limit", "token_budget", "budget_period")
KEY_COLUMNS = ("id", "name", "models", "rpm", "tpm", "budget", "period", "priority", "expires")


def run_keys(args: argparse.Namespace) -> int:
    return _with_admin(args, KEYS[args.keys_command])


def _create(admin: AdminClient, args: argparse.Namespace) -> str:
    body: dict[str, Any] = {"name": args.name}
    for field in (*LIMITS, "models", "priority", "weight", "max_priority", "default_max_tokens"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.set_priority:
        body["set_priority"] = True
    if args.expires_in is not None:
        body["expires_at"] = time.time() + args.expires_in
    made = admin.call("POST", "/api/v1/keys", body)
    return (
        f"{made['key']}\n(key {made['id']}, named {made['name']}: the secret above is shown once)"
    )


def _list(admin: AdminClient, args: argparse.Namespace) -> str:
    return table(KEY_COLUMNS, [_key_row(k) for k in admin.call("GET", "/api/v1/keys")["data"]])


def _key_row(key: dict[str, Any]) -> list[object]:
    expires = key.get("expires_at")
    return [
        key["id"],
        key["name"],
        ",".join(key["models"]) if key.get("models") else "all",
        *(key.get(field) for field in LIMITS),
        key.get("priority"),
        None if expires is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(expires)),
    ]


def _show(admin: AdminClient, args: argparse.Namespace) -> str:
    key = admin.call("GET", f"/api/v1/keys/{args.key_id}")
    return orjson.dumps(key, option=orjson.OPT_INDENT_2).decode()


def _revoke(admin: AdminClient, args: argparse.Namespace) -> str:
    admin.call("DELETE", f"/api/v1/keys/{args.key_id}")
    return f"key {args.key_id} revoked: every replica refuses it"


KEYS: dict[str, Command] = {
    "create": _create,
    "list": _list,
    "show": _show,
    "revoke": _revoke,
}

STATUS_COLUMNS = (
    "model",
    "provider",
    "tier",
    "state",
    "in_flight",
    "running",
    "waiting",
    "kv_use",
    "req/s",
    "5xx/s",
)


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between the two readings the rates come from (1)",
    )
    parser.add_argument("--json", action="store_true", help="the rows as JSON, rates included")


def run_status(args: argparse.Namespace) -> int:
    def status(admin: AdminClient, args: argparse.Namespace) -> str:
        before = admin.call("GET", "/api/v1/status")["data"]
        started = time.monotonic()
        time.sleep(max(args.interval, 0.0))
        after = admin.call("GET", "/api/v1/status")["data"]
        rows = with_rates(before, after, time.monotonic() - started)
        if args.json:
            return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode()
        return table(STATUS_COLUMNS, [_status_row(r) for r in rows])

    return _with_admin(args, status)


def with_rates(
    before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], seconds: float
) -> list[dict[str, Any]]:
    """The second reading's rows with requests/s and 5xx/s between the two readings."""
    earlier = {(r["model"], r["provider"]): r for r in before}
    rows = []
    for row in after:
        first = earlier.get((row["model"], row["provider"]), row)
        rates = {
            f"{name}_per_s": max(row[name] - first[name], 0) / seconds if seconds > 0 else 0.0
            for name in ("requests", "errors")
        }
        rows.append(row | rates)
    return rows


def _status_row(row: dict[str, Any]) -> list[object]:
    state = row["state"] if not row.get("reason") else f"{row['state']} ({row['reason']})"
    kv = row.get("kv_usage")
    return [
        row["model"],
        row["provider"],
        row["tier"],
        state,
        row["in_flight"],
        _number(row.get("running")),
        _number(row.get("waiting")),
        None if kv is None else f"{kv:.0%}",
        f"{row['requests_per_s']:.1f}",
        f"{row['errors_per_s']:.1f}",
    ]


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _with_admin(args: argparse.Namespace, command: Command) -> int:
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        say(f"set {ADMIN_TOKEN_ENV} to the router's admin token")
        return 2
    try:
        print(command(AdminClient(args.url, token), args))
    except AdminError as exc:
        say(str(exc))
        return 1
    return 0
