"""`make bench-peers`: the router side by side with what its users would pick instead, on the
same demo upstreams and the same load generators; writes bench/peers.json and prints a table.

Routers, one at a time, each started fresh on 127.0.0.1 in front of two demo upstream
processes (round-robin, or the router's nearest equivalent):
- direct: the load generator spreads its clients over the two upstreams itself (the limit);
- serve-router with `make run`'s settings (`serve-router run --no-demo`);
- LiteLLM proxy, 1 and 2 workers (`simple-shuffle`, its default);
- vLLM's Rust router `vllm-router` (`round_robin`).
The peers are installed in environments of their own (.venv-peers/<name>, reused while their
stamp matches bench/requirements/<name>.txt); one that cannot be installed or started is
reported so in the table, with pip's or its own last line.

Cases: unary at 1 and 32 concurrent clients and streams (50 events, no pacing) at 1 against a
pair of fast upstreams; paced streams (200 events 25 ms apart, a model's decode) at 200 and
500 at once against a pair of paced upstreams. For each, the router process tree's CPU time
per request (psutil: the router and everything it started, e.g. Ray's processes and HAProxy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import orjson
import psutil

from bench import loadgen, streamgen
from bench.local_ray import demo_upstream, free_port, wait_http
from bench.venv import ensure_venv

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("peers.json")
PEERS_VENVS = ROOT / ".venv-peers"
REQUIREMENTS = Path(__file__).with_name("requirements")
MODEL = "bench/echo"
FAST_CASES = ("unary_c1", "unary_c32", "stream_c1")
PACED_CASES = ("paced_200", "paced_500")
TARGET = (
    "target: serve-router's added latency within 2.5x of vllm-router's, >= 0.5x its unary c=32 "
    "requests/s and >= 0.9x its 500-stream events/s; ahead of LiteLLM by >= 3x on every case"
)


@dataclass
class Started:
    """A router in front of `upstreams`: where to send, and the process tree to account."""

    url: str
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Router:
    name: str
    # upstream URLs, port, scratch folder -> command line (None: no router, the direct path)
    command: Callable[[list[str], int, Path], list[str]] | None = None
    env: dict[str, str] = field(default_factory=dict)
    # the process's own route that answers 200 once it routes
    ready_path: str = "/v1/models"
    peer: str | None = None  # its environment (.venv-peers/<peer>), None: the project's
    start_timeout_s: float = 120.0


def _serve_router(upstreams: list[str], port: int, scratch: Path) -> list[str]:
    providers = [
        {"id": f"upstream-{i}", "api_host": url, "api_type": "openai", "input_size": 8192}
        for i, url in enumerate(upstreams)
    ]
    config = {
        "bench_models": {MODEL: {"providers": providers}},
        "active_models": {"bench_models": [MODEL]},
        "routing": {"bench_models": {"strategy": "round_robin"}},
    }
    path = scratch / "models-config.json"
    path.write_bytes(orjson.dumps(config))
    run = [sys.executable, "-m", "serve_app.cli", "run"]
    return [*run, "--config", str(path), "--no-demo", "--port", str(port)]


def _litellm(workers: int) -> Callable[[list[str], int, Path], list[str]]:
    def command(upstreams: list[str], port: int, scratch: Path) -> list[str]:
        deployments = [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"{url}/v1",
                    "api_key": "unused",
                },
            }
            for url in upstreams
        ]
        config = {
            "model_list": deployments,
            "router_settings": {"routing_strategy": "simple-shuffle"},
            "litellm_settings": {"telemetry": False},
        }
        path = scratch / "litellm.yaml"  # JSON is YAML
        path.write_bytes(orjson.dumps(config))
        litellm = PEERS_VENVS / "litellm" / "bin" / "litellm"
        listen = ["--host", "127.0.0.1", "--port", str(port)]
        return [str(litellm), "--config", str(path), *listen, "--num_workers", str(workers)]

    return command


def vllm_router_command(
    policy: str, extra: Sequence[str] = ()
) -> Callable[[list[str], int, Path], list[str]]:
    """Its command line under `policy`, with the policy's own `extra` flags."""

    def command(upstreams: list[str], port: int, scratch: Path) -> list[str]:
        binary = PEERS_VENVS / "vllm-router" / "bin" / "vllm-router"
        # Its Prometheus exporter listens on every interface unless told otherwise.
        metrics = ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        return [
            str(binary),
            *["--worker-urls", *upstreams, "--policy", policy],
            *["--host", "127.0.0.1", "--port", str(port), *metrics],
            *["--log-level", "warning", "--log-dir", str(scratch)],
            *extra,
        ]

    return command


LITELLM_ENV = {
    "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start
    "LITELLM_LOG": "ERROR",
}
ROUTERS = [
    Router("direct"),
    Router("serve-router", _serve_router, start_timeout_s=180.0),
    Router("vllm-router", vllm_router_command("round_robin"), peer="vllm-router"),
    Router("litellm-1w", _litellm(1), LITELLM_ENV, "/health/liveliness", peer="litellm"),
    Router("litellm-2w", _litellm(2), LITELLM_ENV, "/health/liveliness", peer="litellm"),
]


def last_line(text: str, otherwise: str) -> str:
    """What a tool said last (a failure's one-line reason), `otherwise` if it said nothing."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else otherwise


def install_peer(name: str) -> str | None:
    """None when the peer's environment is ready, else pip's last line."""
    failed = ensure_venv(PEERS_VENVS / name, REQUIREMENTS / f"{name}.txt")
    return None if failed is None else last_line(failed, failed)


def peer_version(name: str) -> str:
    return (REQUIREMENTS / f"{name}.txt").read_text().split("==")[-1].strip()


@contextmanager
def started(router: Router, upstreams: list[str]) -> Iterator[Started]:
    """The router running in front of `upstreams` until the block ends (SIGINT, as Ctrl-C,
    then SIGKILL to whatever of its tree is left)."""
    if router.command is None:
        yield Started(url="")
        return
    with tempfile.TemporaryDirectory(prefix=f"peers-{router.name}-") as folder:
        scratch = Path(folder)
        port = free_port()
        log = scratch / "output.log"
        env = {**os.environ, **router.env, "HOME": str(scratch)}
        with log.open("wb") as out:
            process = subprocess.Popen(
                router.command(upstreams, port, scratch),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_http(f"{url}{router.ready_path}", router.start_timeout_s, process)
            except RuntimeError as exc:
                said = last_line(log.read_text(errors="replace"), "no output")
                raise RuntimeError(f"{exc}: {said}") from None
            yield Started(url, process)
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT to the router's session (Ctrl-C), then SIGKILL to whatever of it is left,
    including what left the session (psutil checks each is still the process it was)."""
    tree = _tree(process)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(60)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for member in tree:
        with contextlib.suppress(psutil.Error):
            member.kill()
    psutil.wait_procs(tree, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def _tree(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_s(process: subprocess.Popen[bytes] | None) -> dict[tuple[int, float], float]:
    """CPU seconds used so far by the process and each one under it, by (pid, start time): a
    difference of two readings counts the processes alive at the second, none twice."""
    out: dict[tuple[int, float], float] = {}
    for member in [] if process is None else _tree(process):
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            out[(member.pid, member.create_time())] = times.user + times.system
    return out


def cpu_used_s(
    before: dict[tuple[int, float], float], after: dict[tuple[int, float], float]
) -> float:
    return sum(used - before.get(key, 0.0) for key, used in after.items())


def _body(text: str = "Say hello to the peers.", stream: bool = False) -> dict:
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    return {**body, "stream": True} if stream else body


def _fast_case(case: str, target: str | list[str], duration: float) -> dict:
    """Warmed up already (`_run_cases`): every request counts, so the CPU is per request."""
    kind, concurrency = case.split("_c")
    body = _body(stream=kind == "stream")
    return loadgen.measure(target, body, int(concurrency), duration, warmup=0.0)


def _paced_case(case: str, target: str | list[str], tokens: int) -> dict:
    # Long enough that every event carries a piece of the answer.
    body = _body("stream " * tokens, stream=True)
    return streamgen.measure(target, body, int(case.split("_")[1]), 1)


def _run_cases(
    router: Router, upstreams: list[str], cases: tuple[str, ...], one: Callable[..., dict]
) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with started(router, upstreams) as running:
        target = (
            f"{running.url}/v1/chat/completions"
            if running.url
            else [f"{u}/v1/chat/completions" for u in upstreams]
        )
        loadgen.measure(target, _body(), 4, 1.0)  # warm the path (first-call costs); not reported
        for case in cases:
            before = tree_cpu_s(running.process)
            figures = one(case, target)
            used = cpu_used_s(before, tree_cpu_s(running.process))
            # every request sent: the answered, the refused and the broken
            done = figures.get("requests", 0) + figures.get("errors", 0) + figures.get("streams", 0)
            if running.process is not None:  # the direct path has no router to account
                figures["cpu_ms_per_request"] = round(used * 1000 / max(1, done), 3)
            out[case] = figures
            print(f"  {router.name} {case}: {orjson.dumps(figures).decode()}", flush=True)
    return out


def _added(results: dict[str, dict]) -> None:
    """Each router's figures against the direct path of the same run."""
    direct = results.get("direct", {}).get("cases", {})
    for name, entry in results.items():
        cases = entry.get("cases", {})
        for case, figures in cases.items():
            base = direct.get(case)
            if not base or name == "direct":
                continue
            for key in ("p50_ms", "ttfb_p50_ms", "ttft_p50_ms", "itl_p99_ms"):
                if key in figures and key in base:
                    figures[f"added_{key}"] = round(figures[key] - base[key], 3)
            for key in ("rps", "events_per_s"):
                if key in figures and base.get(key):
                    figures[f"{key}_ratio"] = round(figures[key] / base[key], 3)


# The table: (label, case, figure, format).
ROWS = [
    ("unary c=1: added p50 ms", "unary_c1", "added_p50_ms", "{:.2f}"),
    ("unary c=1: CPU ms/request", "unary_c1", "cpu_ms_per_request", "{:.2f}"),
    ("unary c=32: requests/s", "unary_c32", "rps", "{:,.0f}"),
    ("unary c=32: p99 ms", "unary_c32", "p99_ms", "{:.1f}"),
    ("unary c=32: CPU ms/request", "unary_c32", "cpu_ms_per_request", "{:.2f}"),
    ("unary c=32: errors", "unary_c32", "errors", "{:d}"),
    ("stream c=1: added TTFB p50 ms", "stream_c1", "added_ttfb_p50_ms", "{:.2f}"),
    ("200 paced streams: added inter-token p99 ms", "paced_200", "added_itl_p99_ms", "{:.1f}"),
    ("200 paced streams: TTFT p50 ms", "paced_200", "ttft_p50_ms", "{:.1f}"),
    ("200 paced streams: events/s", "paced_200", "events_per_s", "{:,.0f}"),
    ("500 paced streams: added inter-token p99 ms", "paced_500", "added_itl_p99_ms", "{:.1f}"),
    ("500 paced streams: TTFT p50 ms", "paced_500", "ttft_p50_ms", "{:.1f}"),
    ("500 paced streams: events/s", "paced_500", "events_per_s", "{:,.0f}"),
    ("500 paced streams: lost", "paced_500", "lost", "{:d}"),
    ("500 paced streams: CPU ms/stream", "paced_500", "cpu_ms_per_request", "{:.1f}"),
]


def table(report: dict) -> str:
    """Markdown: a row per figure, a column per router (throughput also as a share of the
    direct path's); a peer that did not run says why."""
    results = report["routers"]
    names = list(results)
    lines = [
        "| case | " + " | ".join(results[n]["label"] for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, case, key, fmt in ROWS:
        cells = []
        for name in names:
            figures = results[name].get("cases", {}).get(case, {})
            value = figures.get(key)
            if name == "direct" and figures and key.startswith("added_"):
                value = 0.0  # the reference
            cell = "-" if value is None else fmt.format(value)
            if (ratio := figures.get(f"{key}_ratio")) is not None:
                cell += f" ({ratio:.2f}x)"  # of the direct path's
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name in names:
        for problem in results[name].get("problems", []):
            lines.append(f"\n{results[name]['label']}: {problem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per unary case")
    parser.add_argument("--tokens", type=int, default=200, help="events per paced stream")
    parser.add_argument("--pace-ms", type=float, default=25.0, help="between paced events")
    parser.add_argument(
        "--routers", default=",".join(r.name for r in ROUTERS), help="comma-separated subset"
    )
    parser.add_argument("--cases", default=",".join(FAST_CASES + PACED_CASES))
    parser.add_argument(
        "--table", action="store_true", help="only print the table of the last bench/peers.json"
    )
    args = parser.parse_args(argv)
    if args.table:
        print(table(orjson.loads(RESULTS.read_bytes())))
        return 0
    wanted = args.routers.split(",")
    cases = args.cases.split(",")
    fast = tuple(c for c in FAST_CASES if c in cases)
    paced = tuple(c for c in PACED_CASES if c in cases)

    routers = [r for r in ROUTERS if r.name in wanted]
    results: dict[str, dict] = {}
    for router in routers:
        version = peer_version(router.peer) if router.peer else None
        label = f"{router.name} {version}" if version else router.name
        results[router.name] = {"label": label, "problems": []}
        if router.peer and (problem := install_peer(router.peer)) is not None:
            results[router.name]["problems"].append(f"not installed: {problem}")
            print(f"{router.name}: not installed: {problem}", flush=True)

    phases = [
        (fast, ("--chunks", "50"), lambda c, t: _fast_case(c, t, args.duration)),
        (
            paced,
            ("--chunks", str(args.tokens), "--chunk-delay", str(args.pace_ms / 1000)),
            lambda c, t: _paced_case(c, t, args.tokens),
        ),
    ]
    for phase_cases, upstream_args, one in phases:
        if not phase_cases:
            continue
        with ExitStack() as stack:
            upstreams = [stack.enter_context(demo_upstream(*upstream_args)) for _ in range(2)]
            for router in routers:
                entry = results[router.name]
                if any(p.startswith("not installed") for p in entry["problems"]):
                    continue
                print(f"{router.name}: {', '.join(phase_cases)}", flush=True)
                try:
                    entry.setdefault("cases", {}).update(
                        _run_cases(router, upstreams, phase_cases, one)
                    )
                except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
                    said = getattr(exc, "stderr", None) or str(exc)  # a load generator's error
                    reason = last_line(said, "?")
                    entry["problems"].append(f"{'/'.join(phase_cases)} did not run: {reason}")
                    print(f"{router.name}: {entry['problems'][-1]}", flush=True)
                _write(results, args)  # what was measured so far survives a failure later
    print(f"\n{TARGET}\n\n{_write(results, args)['table']}")
    return 0


def _write(results: dict[str, dict], args: argparse.Namespace) -> dict:
    _added(results)
    report = {
        "date": date.today().isoformat(),
        "machine": {"cpus": os.cpu_count()},
        "target": TARGET,
        "upstreams": "two demo upstream processes behind every router",
        "unary_duration_s": args.duration,
        "paced": {"tokens": args.tokens, "pace_ms": args.pace_ms},
        "routers": results,
    }
    report["table"] = table(report)
    RESULTS.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report


if __name__ == "__main__":
    raise SystemExit(main())
