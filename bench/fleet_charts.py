"""The charts of `make bench-fleet` (bench/fleet.json) into docs/: TTFT p99 against load per
router, the prefix-cache hit rate and the spread of requests over the servers. A phase whose
simulator fell behind its clock is left out (a gap in its line, no bar)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

LOAD_SERIES = {"mooncake": "Mooncake trace, x its rate", "zipf": "Zipf chat, requests/s"}


def _routers(report: dict) -> list[str]:
    return sorted({r for w in report["workloads"].values() for r in w["routers"]})


def _value(report: dict, phase: str, router: str, key: str) -> float | None:
    result = report["workloads"][phase]["routers"].get(router, {})
    return result.get(key) if result.get("valid") else None


def _series(report: dict, prefix: str) -> list[tuple[float, str]]:
    """The load steps of a workload family, as (load, phase name) in load order."""
    steps = []
    for name in report["workloads"]:
        if name.startswith(f"{prefix}-"):
            steps.append((float(name.split("-", 1)[1].rstrip("x")), name))
    return sorted(steps)


def ttft_chart(report: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, len(LOAD_SERIES), figsize=(11, 4.6))
    colors = plt.get_cmap("tab10")
    routers = _routers(report)
    for ax, (prefix, label) in zip(axes, LOAD_SERIES.items(), strict=True):
        steps = _series(report, prefix)
        for i, router in enumerate(routers):  # one color per router in both panels
            points = [(load, _value(report, name, router, "ttft_p99_ms")) for load, name in steps]
            points = [(x, y / 1000) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=colors(i), label=router)
        ax.set_xlabel(label)
        ax.set_ylabel("TTFT p99 (s, simulated clock)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors(i), marker="o") for i in range(len(routers))]
    fig.legend(handles, routers, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"TTFT p99 against load, {report['servers']} simulated H100s")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def bar_chart(report: dict, key: str, ylabel: str, title: str, out: Path) -> None:
    phases = list(report["workloads"])
    routers = _routers(report)
    width = 0.8 / max(1, len(routers))
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for i, router in enumerate(routers):
        values = [report["workloads"][p]["routers"].get(router, {}).get(key) or 0 for p in phases]
        ax.bar([x + i * width for x in range(len(phases))], values, width, label=router)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(phases))], phases, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw(report: dict, docs: Path) -> None:
    ttft_chart(report, docs / "fleet-ttft-p99.png")
    bar_chart(
        report,
        "hit_rate",
        "prefix-cache hit rate (servers' counters)",
        "Prefix-cache hit rate per workload",
        docs / "fleet-hit-rate.png",
    )
    bar_chart(
        report,
        "per_server_max_over_mean",
        "requests per server, max / mean",
        "Load spread (1.0 = even)",
        docs / "fleet-spread.png",
    )
