"""Choosing a variant: constraints (memory, speed, quality loss) -> the best measured variant that meets them, why
each other variant lost, and the command that runs the winner; with none meeting them, which constraint binds.

`variant_for_machine` is the same choice made by the budget manager from a stored frontier (the JSON `edgeinfer
frontier --json` writes) for this machine's free memory and power state.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from edgeinfer.errors import BudgetError, InvalidArgument

# constraint name -> (row field, "max" or "min", CLI option, how the figure prints)
CONSTRAINTS = {
    "max_memory": ("peak_rss_bytes", "max", "--max-memory", lambda v: f"{v / 1e6:.0f} MB"),
    "min_tok_s": ("decode_tok_s", "min", "--min-tok-s", lambda v: f"{v:.1f} tok/s"),
    "max_kl": ("kl", "max", "--max-kl", lambda v: f"{v:.4g}"),
}
FIELD_NAMES = {"peak_rss_bytes": "peak RSS", "decode_tok_s": "decode", "kl": "KL",
               "energy_j_per_token": "energy/token"}
# what "best" means among the variants that meet the constraints: (row field, sign) keys, compared in order
PREFERENCES = {
    "quality": (("kl", -1), ("decode_tok_s", +1), ("peak_rss_bytes", -1)),
    "speed": (("decode_tok_s", +1), ("kl", -1), ("peak_rss_bytes", -1)),
    "memory": (("peak_rss_bytes", -1), ("kl", -1), ("decode_tok_s", +1)),
    "energy": (("energy_j_per_token", -1), ("kl", -1), ("decode_tok_s", +1)),
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 10**3, "m": 10**6, "g": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str, option: str = "--max-memory") -> int:
    """Bytes of a size such as "600MB", "1.5GB", "512MiB" or "123456" (KB/MB/GB are powers of 1000, KiB/MiB/GiB of
    1024). InvalidArgument naming the option for anything else."""
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise InvalidArgument(f"{option}: {text!r} is not a size (e.g. 600MB, 1.5GB, 512MiB)")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise InvalidArgument(f"{option}: {text!r} must be a positive size")
    return int(value)


@dataclass
class Constraints:
    """Limits a variant must meet; None: no limit. max_memory in bytes (peak RSS), min_tok_s decode tokens/s,
    max_kl nats (KL divergence against the reference variant)."""

    max_memory: int | None = None
    min_tok_s: float | None = None
    max_kl: float | None = None

    def given(self) -> dict[str, float]:
        return {name: value for name, value in vars(self).items() if value is not None}

    def violations(self, row: dict) -> list[str]:
        """Why the row fails each constraint it fails, e.g. "peak RSS 720 MB > --max-memory 600 MB"; a missing
        figure fails its constraint ("KL not measured")."""
        out = []
        for name, limit in self.given().items():
            key, kind, option, show = CONSTRAINTS[name]
            value = row.get(key)
            if value is None:
                out.append(f"{FIELD_NAMES[key]} not measured")
            elif (value > limit) if kind == "max" else (value < limit):
                out.append(f"{FIELD_NAMES[key]} {show(value)} {'>' if kind == 'max' else '<'} {option} {show(limit)}")
        return out


@dataclass
class Choice:
    """The outcome of `choose`: the winner (None when no variant meets the constraints), for every other variant
    why it lost, and for no winner the constraints that bind (each with the relaxation that would admit one)."""

    best: dict | None
    lost: list[tuple[dict, str]] = field(default_factory=list)
    binding: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"best": self.best["label"] if self.best else None, "commands": self.commands,
                "binding": self.binding, "lost": [{"label": row["label"], "why": why} for row, why in self.lost]}


def _sort_key(row: dict, prefer: str) -> tuple:
    # missing figures sort last; the label makes the order total, so equal figures choose the same row every run
    return tuple((0, -sign * row[k]) if row.get(k) is not None else (1, 0) for k, sign in PREFERENCES[prefer]) \
        + (row["label"],)


def choose(rows: list[dict], constraints: Constraints, prefer: str = "quality") -> Choice:
    """The best of `rows` (measured variants) meeting `constraints`, best by `prefer` (a PREFERENCES key: quality
    first, then speed, then memory, by default)."""
    if prefer not in PREFERENCES:
        raise InvalidArgument(f"prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    failing = {row["label"]: constraints.violations(row) for row in rows}
    meeting = sorted((r for r in rows if not failing[r["label"]]), key=lambda r: _sort_key(r, prefer))
    if not meeting:
        return Choice(None, [(r, "; ".join(failing[r["label"]])) for r in rows], binding_constraints(rows, constraints))
    best = meeting[0]
    lost = [(r, "; ".join(failing[r["label"]]) if failing[r["label"]] else _lost_on_preference(r, best, prefer))
            for r in rows if r is not best]
    return Choice(best, lost, [], commands_for(best))


def _lost_on_preference(row: dict, best: dict, prefer: str) -> str:
    """Why a row that meets the constraints lost to the best: the first preference key it is worse on."""
    for key, sign in PREFERENCES[prefer]:
        a, b = row.get(key), best.get(key)
        if a is None:
            return f"meets the constraints, but its {FIELD_NAMES[key]} was not measured"
        if b is not None and a != b:
            return (f"meets the constraints, but {FIELD_NAMES[key]} {_show(key, a)} is "
                    f"{'worse' if sign * (a - b) < 0 else 'better'} than {best['label']}'s {_show(key, b)}")
    return f"meets the constraints, ties with {best['label']} (the first in order wins)"


def _show(key: str, value: float) -> str:
    shown = {"peak_rss_bytes": lambda v: f"{v / 1e6:.0f} MB", "decode_tok_s": lambda v: f"{v:.1f} tok/s",
             "kl": lambda v: f"{v:.4g}", "energy_j_per_token": lambda v: f"{v:.3f} J"}
    return shown[key](value)


def binding_constraints(rows: list[dict], constraints: Constraints) -> list[str]:
    """With no row meeting every constraint: the constraints that bind. A constraint binds where some row fails
    only it; then relaxing it to that row's figure admits the row (the smallest such relaxation is named). Where
    every row fails two or more, each constraint is named with how many rows it excludes."""
    given = constraints.given()
    if not rows:
        return ["no variant was measured"]
    out = []
    for name, limit in given.items():
        key, kind, option, show = CONSTRAINTS[name]
        alone = [r for r in rows if r.get(key) is not None
                 and constraints.violations(r) and len(constraints.violations(r)) == 1
                 and Constraints(**{name: limit}).violations(r)]
        if alone:
            pick = min(alone, key=lambda r: r[key]) if kind == "max" else max(alone, key=lambda r: r[key])
            out.append(f"{option} {show(limit)} binds: {option} {show(pick[key])} would admit {pick['label']}")
    if out:
        return out
    for name, limit in given.items():
        key, kind, option, show = CONSTRAINTS[name]
        excluded = sum(1 for r in rows if Constraints(**{name: limit}).violations(r))
        out.append(f"{option} {show(limit)} excludes {excluded} of {len(rows)} variants")
    return out + ["no single constraint binds alone: every variant fails two or more"]


def commands_for(row: dict) -> list[str]:
    """The `edgeinfer run` and `edgeinfer serve` commands that use the row's variant as it was measured."""
    model = shlex.quote(str(row["path"]))
    options = f"--kv-type {row['kv_type']} --threads {row['n_threads']}"
    return [f"edgeinfer run {model} \"PROMPT\" {options}", f"edgeinfer serve {model} {options}"]


# ---------------------------------------------------------------- the budget manager's use of a stored frontier


POWER_PREFERENCES = {"performance": "quality", "balanced": "quality", "saver": "energy"}


def read_frontier(frontier: dict | str | os.PathLike) -> dict:
    """A stored frontier: the dict itself, or the JSON file `edgeinfer frontier --json FILE` wrote."""
    if isinstance(frontier, dict):
        return frontier
    try:
        data = json.loads(Path(frontier).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InvalidArgument(f"frontier {frontier}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        raise InvalidArgument(f"frontier {frontier}: not a frontier file (no 'variants' list)")
    return data


def variant_for_machine(frontier: dict | str | os.PathLike, available_bytes: int | None, power_state: str,
                        max_threads: int | None = None) -> tuple[dict, str]:
    """(row, why) of the stored frontier's variant for a machine with `available_bytes` of usable memory (None:
    unknown, no limit) in power state "performance", "balanced" or "saver" (budget.resolve_power's modes), running
    at most `max_threads` compute threads (None: no limit).

    Fits: peak RSS <= available_bytes, n_threads <= max_threads, its variant file still present. Among those,
    performance and balanced take the best quality (lowest KL), then the fastest decode (balanced: the least energy
    per token); saver takes the least energy per token, then the best quality. BudgetError when none fits."""
    if power_state not in POWER_PREFERENCES:
        raise InvalidArgument(f"power_state must be one of {', '.join(POWER_PREFERENCES)}, got {power_state!r}")
    rows = [r for r in read_frontier(frontier)["variants"] if r.get("kl") is not None and r.get("peak_rss_bytes")]
    present = [r for r in rows if Path(r["path"]).is_file()]
    fits = [r for r in present if (available_bytes is None or r["peak_rss_bytes"] <= available_bytes)
            and (max_threads is None or r["n_threads"] <= max_threads)]
    if not fits:
        smallest = min(present, key=lambda r: r["peak_rss_bytes"], default=None)
        if smallest is None:
            raise BudgetError("the stored frontier has no measured variant whose file is still present")
        raise BudgetError(f"no stored variant fits: the smallest, {smallest['label']}, peaks at "
                          f"{smallest['peak_rss_bytes'] / 1e6:.0f} MB, this machine has "
                          f"{(available_bytes or 0) / 1e6:.0f} MB usable"
                          + (f" and runs {max_threads} threads" if max_threads is not None else ""))
    prefer = POWER_PREFERENCES[power_state]
    if power_state == "balanced":
        key = lambda r: (r["kl"], r.get("energy_j_per_token") or 0.0, -(r.get("decode_tok_s") or 0.0), r["label"])  # noqa: E731
    else:
        key = lambda r: _sort_key(r, prefer)  # noqa: E731
    best = min(fits, key=key)
    memory = "any size" if available_bytes is None else f"{available_bytes / 1e6:.0f} MB usable"
    why = (f"{power_state}: {'least energy per token' if prefer == 'energy' else 'best quality'} of the "
           f"{len(fits)} of {len(rows)} stored variants that fit ({memory}); peaks at "
           f"{best['peak_rss_bytes'] / 1e6:.0f} MB, KL {best['kl']:.4g}")
    return best, why


def stored_variant_for_this_machine(frontier: dict | str | os.PathLike, power: str = "auto") -> tuple[dict, str]:
    """variant_for_machine with this machine's usable memory, power state and compute threads (what `plan
    --frontier` and `load(..., frontier=)` use): (row, why); BudgetError when no stored variant fits."""
    import numba

    from edgeinfer.budget import read_system_state, resolve_power, usable_memory

    state = read_system_state()
    mode, _ = resolve_power(power, state)
    available, _ = usable_memory(state)
    return variant_for_machine(frontier, available, mode, max_threads=numba.config.NUMBA_NUM_THREADS)


def frontier_variant_of(source, frontier, power, kv_type, n_threads):
    """What `load(source, frontier=)` and `plan --frontier` run: (path, kv_type, n_threads, why) of the stored
    frontier's variant for this machine (kv_type / n_threads: the caller's when given); InvalidArgument if the
    frontier was measured on another model than `source`."""
    data = read_frontier(frontier)
    measured = Path(data.get("source", "")).resolve()
    if measured != Path(source).resolve():
        raise InvalidArgument(f"frontier: it was measured on {measured.name}, not on {Path(source).name}")
    row, why = stored_variant_for_this_machine(data, power)
    return (row["path"], kv_type or row["kv_type"], n_threads or row["n_threads"],
            f"frontier variant {row['label']}: {why}")
