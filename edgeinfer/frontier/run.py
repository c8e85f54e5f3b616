"""A whole frontier run: make the weight variants, measure each (weight variant, KV type) in its own child process,
assemble one row per variant, mark the Pareto frontier. A Ctrl-C stops the run where it is and keeps every figure
measured so far (the result says it was interrupted and which variants were not measured).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeinfer.frontier.energy import cost_per_1k_tokens
from edgeinfer.frontier.measure import GroupResult, MeasureSettings, measure_group
from edgeinfer.frontier.pareto import DEFAULT_OBJECTIVES, mark_pareto
from edgeinfer.frontier.variants import (DEFAULT_KV_TYPES, DEFAULT_TYPES, Variant, VariantCache, WeightVariant,
                                         resolve_source, variant_grid, weight_variants)

SCHEMA = 1  # of the JSON a run writes (`variant_for_machine` reads it)


@dataclass
class FrontierSpec:
    """What to measure: the source, the grid (types x prune ratios x KV types x thread counts), the measurement
    settings, the electricity price for the cost column, and a name for the text (its file, or "default")."""

    source: str
    types: tuple[str, ...] = DEFAULT_TYPES
    prunes: tuple[float, ...] = (0.0,)
    kv_types: tuple[str, ...] = DEFAULT_KV_TYPES
    threads: tuple[int, ...] = (1,)
    settings: MeasureSettings = field(default_factory=MeasureSettings)
    price_kwh: float | None = None
    text_name: str = "default"


class Progress:
    """What a run reports as it goes (the CLI draws a rich progress bar from it); these do nothing."""

    def begin(self, total: int) -> None: ...

    def step(self, variant: str, text: str) -> None: ...

    def advance(self) -> None: ...


def reference_weight(weights: list[WeightVariant], sizes: dict[WeightVariant, int]) -> WeightVariant:
    """The highest-precision weight variant, the quality reference: the largest file among the least pruned."""
    least = min(w.prune for w in weights)
    return max((w for w in weights if w.prune == least), key=lambda w: (sizes[w], w.label))


def run_frontier(spec: FrontierSpec, progress: Progress | None = None, cache: VariantCache | None = None) -> dict:
    """Measure every variant of spec's grid; the result as a JSON-ready dict (see `SCHEMA`), "interrupted" True
    when a KeyboardInterrupt stopped it (the rows measured until then are kept)."""
    progress = progress or Progress()
    source = resolve_source(spec.source)
    grid = variant_grid(spec.types, spec.prunes, spec.kv_types, spec.threads)
    weights = weight_variants(grid)
    groups = list(dict.fromkeys((v.weight, v.kv_type) for v in grid))
    progress.begin(len(weights) + len(groups))
    cache = cache or VariantCache(source)
    result = {"schema": SCHEMA, "source": str(source), "source_digest": cache.digest, "text": spec.text_name,
              "settings": {k: v for k, v in asdict(spec.settings).items() if k != "text"},
              "grid": {"types": list(spec.types), "prunes": list(spec.prunes), "kv_types": list(spec.kv_types),
                       "threads": list(spec.threads)},
              "price_kwh": spec.price_kwh, "objectives": [list(o) for o in DEFAULT_OBJECTIVES],
              "reference": None, "interrupted": False, "variants": [], "not_measured": [v.label for v in grid]}
    try:
        paths = {}
        for w in weights:
            progress.step(w.label, "cached" if cache.cached(w) else f"converting {source.name} to {w.label}")
            paths[w] = cache.make(w, on_tensor=lambda i, n, name, w=w: progress.step(
                w.label, f"converting: tensor {i + 1}/{n} {name}"))
            progress.advance()
        sizes = {w: os.path.getsize(p) for w, p in paths.items()}
        ref = reference_weight(weights, sizes)
        result["reference"] = ref.label
        for weight, kv_type in groups:
            threads = [v.n_threads for v in grid if v.weight == weight and v.kv_type == kv_type]
            name = f"{weight.label}/{kv_type}"
            try:
                group = measure_group(str(paths[weight]), kv_type, threads, spec.settings, str(paths[ref]),
                                      on_step=lambda text, name=name: progress.step(name, text))
            except KeyboardInterrupt as e:
                _add_rows(result, weight, kv_type, threads, paths[weight], getattr(e, "partial", GroupResult()),
                          ref, spec.price_kwh, interrupted=True)
                raise
            _add_rows(result, weight, kv_type, threads, paths[weight], group, ref, spec.price_kwh)
            progress.advance()
    except KeyboardInterrupt:
        result["interrupted"] = True
    finally:
        cache.cleanup()  # only a temporary directory (the home cannot be written): its variants last one run
    mark_pareto(result["variants"])
    return result


def _add_rows(result: dict, weight: WeightVariant, kv_type: str, threads: list[int], path: Path,
              group: GroupResult, ref: WeightVariant, price_kwh: float | None, interrupted: bool = False) -> None:
    """One row per thread count of the group: the shared figures and that thread count's own."""
    for n_threads in threads:
        variant = Variant(weight, kv_type, n_threads)
        own = group.per_threads.get(n_threads, {})
        if not own and not group.shared and not group.error:
            continue  # interrupted before anything of it was measured: stays in not_measured
        row = {"label": variant.label, "weight": weight.label, "weight_type": weight.type_name,
               "prune": weight.prune, "kv_type": kv_type, "n_threads": n_threads, "path": str(path),
               "file_bytes": os.path.getsize(path), "reference": weight == ref}
        for key in ("peak_rss_bytes", "n_ctx", "kv_cache_bytes", "prefill_tok_s", "prefill_tok_s_sd",
                    "decode_tok_s", "decode_tok_s_sd", "ttft_s", "kl", "kl_err", "top1", "top1_err", "ppl",
                    "ppl_err", "energy_j_per_token", "energy_source"):
            row[key] = own.get(key, group.shared.get(key))
        row["cost_per_1k_tokens"] = cost_per_1k_tokens(row["energy_j_per_token"], price_kwh)
        row["error"] = group.error or ("interrupted" if interrupted else None)
        result["variants"].append(row)
        result["not_measured"].remove(variant.label)
