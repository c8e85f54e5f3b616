"""A frontier run's outputs: the terminal table, JSON, CSV and the plot (quality loss against decode speed, marker
area for memory, the Pareto-optimal variants filled and labelled, the two-objective frontier drawn as a line).
Every file is written to a temporary name beside its destination and renamed into place."""
from __future__ import annotations

import csv
import io
import json
import os
import uuid
from pathlib import Path

from edgeinfer.errors import InvalidArgument
from edgeinfer.frontier.pareto import staircase

CSV_FIELDS = ("label", "weight", "weight_type", "prune", "kv_type", "n_threads", "reference", "pareto", "file_bytes",
              "peak_rss_bytes", "n_ctx", "prefill_tok_s", "prefill_tok_s_sd", "decode_tok_s", "decode_tok_s_sd",
              "ttft_s", "kl", "kl_err", "top1", "top1_err", "ppl", "ppl_err", "energy_j_per_token", "energy_source",
              "cost_per_1k_tokens", "error", "path")
PLOT_SUFFIXES = (".png", ".svg")
INSTALL_PLOT = "pip install 'edgeinfer[frontier]'"


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Write data to path through a temporary file beside it and a rename (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2) + "\n"


def to_csv(result: dict) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result["variants"]:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    return out.getvalue()


def num(value, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, fmt)


def table(result: dict):
    """The variants as a rich Table (Pareto-optimal ones starred, the reference marked)."""
    from rich.table import Table

    estimated = any(r.get("energy_source") == "estimated" for r in result["variants"])
    t = Table(title=f"frontier of {Path(result['source']).name} (quality against {result['reference']}; "
                    f"speeds indicative)", title_justify="left")
    columns = ["variant", "size MB", "peak RSS MB", "prefill tok/s", "decode tok/s", "TTFT s", "KL", "top-1 %",
               "PPL", "J/token" + (" (est.)" if estimated else "")]
    if result.get("price_kwh") is not None:
        columns.append("cost/1K tok")
    columns.append("Pareto")
    for i, name in enumerate(columns):
        t.add_column(name, justify="left" if i == 0 else "right")
    for r in result["variants"]:
        cells = [r["label"] + (" (ref)" if r.get("reference") else ""), num(r["file_bytes"], ".1f", 1e6),
                 num(r.get("peak_rss_bytes"), ".0f", 1e6), num(r.get("prefill_tok_s"), ".1f"),
                 num(r.get("decode_tok_s"), ".1f"), num(r.get("ttft_s"), ".2f"), num(r.get("kl"), ".3g"),
                 num(r.get("top1"), ".1f", 0.01), num(r.get("ppl"), ".4g"), num(r.get("energy_j_per_token"), ".3g")]
        if result.get("price_kwh") is not None:
            cells.append(num(r.get("cost_per_1k_tokens"), ".3g"))
        cells.append("*" if r.get("pareto") else ("error" if r.get("error") else ""))
        t.add_row(*cells)
    return t


def notes(result: dict) -> list[str]:
    """Lines under the table: errors, what was not measured, an interruption, how energy was found."""
    lines = [f"{r['label']}: {r['error']}" for r in result["variants"] if r.get("error")]
    if result.get("not_measured"):
        lines.append(f"not measured: {', '.join(result['not_measured'])}")
    if result.get("interrupted"):
        lines.append("interrupted: the figures above are those measured before Ctrl-C")
    sources = {r["energy_source"] for r in result["variants"] if r.get("energy_source")}
    if "estimated" in sources:
        lines.append(f"energy estimated: CPU time x {result['settings']['watts']:g} W per busy core (no RAPL "
                     f"counters or discharging battery readable here)")
    return lines


def check_plot_path(path: str | os.PathLike) -> None:
    """Refuse, before any work, a plot path of another format, or when matplotlib is missing."""
    if Path(path).suffix.lower() not in PLOT_SUFFIXES:
        raise InvalidArgument(f"--plot {path}: the plot is written as .png or .svg")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidArgument(f"--plot needs matplotlib: {INSTALL_PLOT}") from None


LABEL_OFFSETS = [(8, 8), (24, -40), (-24, 24), (-24, -40), (24, 40), (24, -64), (-24, 48), (-24, -64)]  # points


def _label_without_overlap(fig, ax, rows: list[dict], y, size) -> None:
    """Label each Pareto-optimal point (variant, peak RSS) at the first of LABEL_OFFSETS where its text overlaps no
    label placed before it and no other point's marker (variants close in speed and KL, e.g. one weight type with
    two KV types, would otherwise print over each other, or a label would sit on its neighbour); the last offset
    tried is kept if none is free. A label moved off its point gets a leader line to it."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    pixels_per_point = fig.dpi / 72

    def marker_box(r):
        cx, cy = ax.transData.transform((r["decode_tok_s"], y(r)))
        radius = size(r) ** 0.5 / 2 * pixels_per_point  # scatter's s is the marker's area in points^2
        return Bbox.from_extents(cx - radius, cy - radius, cx + radius, cy + radius)

    markers = [(r, marker_box(r)) for r in rows]
    placed = []
    for r in (r for r in rows if r.get("pareto")):
        rss = f"\n{r['peak_rss_bytes'] / 1e6:.0f} MB" if r.get("peak_rss_bytes") else ""
        others = placed + [box for other, box in markers if other is not r]
        for dx, dy in LABEL_OFFSETS:
            leader = None if (dx, dy) == LABEL_OFFSETS[0] else dict(arrowstyle="-", color="grey", lw=0.7)
            label = ax.annotate(r["label"] + rss, (r["decode_tok_s"], y(r)), textcoords="offset points",
                                xytext=(dx, dy), fontsize=8, ha="left" if dx > 0 else "right", arrowprops=leader)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in others) or (dx, dy) == LABEL_OFFSETS[-1]:
                placed.append(box)
                break
            label.remove()


def plot(result: dict, path: str | os.PathLike) -> None:
    """Quality loss (KL against the reference) against decode speed; marker area proportional to peak RSS; the
    Pareto-optimal variants filled and labelled, the others hollow; the speed-quality frontier as a step line."""
    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    rows = [r for r in result["variants"] if r.get("kl") is not None and r.get("decode_tok_s") is not None]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    biggest = max((r.get("peak_rss_bytes") or 0 for r in rows), default=0) or 1
    floor = min((r["kl"] for r in rows if r["kl"] > 0), default=1e-6) / 2
    y = lambda r: max(r["kl"], floor)  # noqa: E731  (a log axis cannot show 0: zero KL sits on the floor)
    colours = {kv: plt.cm.tab10(i) for i, kv in enumerate(dict.fromkeys(r["kv_type"] for r in rows))}
    size = lambda r: 60 + 900 * (r.get("peak_rss_bytes") or 0) / biggest  # noqa: E731  (marker area, points^2)
    for r in rows:
        colour = colours[r["kv_type"]]
        ax.scatter(r["decode_tok_s"], y(r), s=size(r), alpha=0.75 if r.get("pareto") else 0.35,
                   facecolors=colour if r.get("pareto") else "none", edgecolors=colour, linewidths=1.5)
    front = staircase(rows)
    if len(front) > 1:
        ax.step([r["decode_tok_s"] for r in front], [y(r) for r in front], where="pre", color="grey",
                linestyle="--", linewidth=1, label="speed-quality frontier")
    for kv, colour in colours.items():
        ax.scatter([], [], s=80, color=colour, label=f"KV cache {kv}")
    ax.scatter([], [], s=80, facecolors="none", edgecolors="black", label="dominated (hollow)")
    if rows and max(r["kl"] for r in rows) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("decode speed (tokens/s, indicative)")
    ax.set_ylabel(f"quality loss: KL divergence against {result.get('reference')} (nats)")
    ax.set_title(f"{Path(result['source']).name}: filled = Pareto-optimal (KL, speed, memory); "
                 f"marker area = peak RSS", fontsize=10)
    ax.margins(x=0.15, y=0.15)  # room for the labels of the outermost points
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _label_without_overlap(fig, ax, rows, y, size)
    out = io.BytesIO()
    fig.savefig(out, format=Path(path).suffix.lower()[1:])
    plt.close(fig)
    write_atomically(path, out.getvalue())
