"""The Pareto frontier of measured variants: those no other variant beats on every objective at once.

A variant dominates another when it is at least as good on every objective and strictly better on one. The default
objectives are the ones a deployment trades against each other: quality loss (KL divergence against the reference,
lower is better), decode speed (tokens/s, higher) and memory (peak RSS, lower). A variant missing one of the figures
(its measurement failed or was interrupted) is neither on the frontier nor allowed to push others off it.
"""
from __future__ import annotations

from collections.abc import Sequence

# (row field, +1 when larger is better, -1 when smaller is better)
DEFAULT_OBJECTIVES = (("kl", -1), ("decode_tok_s", +1), ("peak_rss_bytes", -1))


def dominates(a: dict, b: dict, objectives: Sequence[tuple[str, int]] = DEFAULT_OBJECTIVES) -> bool:
    """Whether row a is at least as good as row b on every objective and better on at least one."""
    better = False
    for key, sign in objectives:
        da, db = sign * a[key], sign * b[key]
        if da < db:
            return False
        better = better or da > db
    return better


def complete(row: dict, objectives: Sequence[tuple[str, int]] = DEFAULT_OBJECTIVES) -> bool:
    """Whether the row has every objective's figure."""
    return all(row.get(key) is not None for key, _ in objectives)


def pareto_flags(rows: Sequence[dict], objectives: Sequence[tuple[str, int]] = DEFAULT_OBJECTIVES) -> list[bool]:
    """For each row, whether it is on the frontier: complete and dominated by no complete row. Equal rows are all
    on it (neither dominates the other). O(n^2): a frontier run measures tens of variants."""
    candidates = [r for r in rows if complete(r, objectives)]
    return [complete(r, objectives) and not any(dominates(o, r, objectives) for o in candidates) for r in rows]


def mark_pareto(rows: list[dict], objectives: Sequence[tuple[str, int]] = DEFAULT_OBJECTIVES) -> list[dict]:
    """Set each row's "pareto" field (in place) and return the rows."""
    for row, flag in zip(rows, pareto_flags(rows, objectives)):
        row["pareto"] = flag
    return rows


def staircase(rows: Sequence[dict], x: str = "decode_tok_s", y: str = "kl") -> list[dict]:
    """The two-objective frontier of (x larger is better, y smaller is better), sorted by x: what the plot draws as
    a line. Rows missing x or y are left out."""
    points = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    flags = pareto_flags(points, ((x, +1), (y, -1)))
    return sorted((r for r, f in zip(points, flags) if f), key=lambda r: r[x])
