"""What the commands print: one-line messages on stderr, plain-text tables (pure)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def say(message: str) -> None:
    """One line on stderr, named for the command (errors, and what a stop is doing)."""
    print(f"serve-router: {message}", file=sys.stderr, flush=True)


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart; None shows as `-`."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
