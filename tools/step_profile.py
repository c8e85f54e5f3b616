"""Where a forward step's time goes, role by role, inside the compiled step.

    python -m tools.step_profile smollm2-135m-instruct --rows 8 --depth 32 --threads 2

The CPU forward is one compiled call (kernels_cpu.forward), so a Python profiler sees one line and timing calls from
outside sees the sum. This tool compiles copies of the model's specialized forward module
(kernels_cpu.specialize) in which one role is a no-op: the copy's source is the module's, followed by a new
definition of that role's function, which wins when Numba resolves the globals (as the specialized dispatches do).
Each copy runs the same batch, rows at `depth` cached tokens; the time a role saves when it does nothing is its share
of the step. The copies take turns round by round, so a machine whose speed drifts (a shared VM) moves all of them
alike; each round's figure is the minimum of `calls` calls, and the table gives the median over rounds, with the LM
head and without it (a step whose rows need no logits). The results of the copies are wrong by design: this
measures time only. A first run compiles every copy (about 15 s each on 2 cores).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

# role -> a no-op definition of the functions the forward calls for it (same names and parameters); "matrices" are
# the projections, the LM head included where the step wants logits ("norms" takes the Q/K norms too)
ROLES = {
    "attention": "def team_jobs(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, partials, "
                 "starts, n_kv, n_parts, chunks_per_part, job0, job1, hint, work):\n    return\n\n\n@njit(cache=True)\n"
                 "def team_merge(partials, n_slots, out, i0, i1, total_m, total_l):\n    return\n",
    "matrices": "def _linear(sync, phase, threads, weights, packed, m, n, q8, out):\n    return 0\n",
    "norms": "def rms_norm_rows(x, weight, eps, out):\n    return\n",
    "activation": "def gated_row(gate, up, out, gelu):\n    return\n",
    "kv_store": "def store_key(values, scales, layer, seq, position, x):\n    return\n\n\n@njit(cache=True)\n"
                "def store_row(values, scales, layer, seq, position, x):\n    return\n",
    "rope": "def rope_qk_rotate(q, k, cos, sin, style):\n    return\n",
}


def copies(forward_module, roles: list[str]) -> dict[str, object]:
    """{"full": the forward, role: the forward without that role}, the copies written beside the Numba cache."""
    source = Path(forward_module.__file__).read_text()
    where = Path(os.environ["NUMBA_CACHE_DIR"]) / "step_profile"
    where.mkdir(parents=True, exist_ok=True)
    forwards = {"full": forward_module.forward}
    for role in roles:
        text = f"{source}\n\n# ---- tools.step_profile: {role} does nothing\n@njit(cache=True)\n{ROLES[role]}"
        path = where / f"{Path(forward_module.__file__).stem}_without_{role}.py"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"step_profile_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        forwards[role] = module.forward
    return forwards


def profile(model: str, rows: int = 1, depth: int = 32, threads: int = 2, rounds: int = 7, calls: int = 10,
            roles: list[str] | None = None, kv_type: str = "f16") -> dict:
    """{"with_head": {name: ms}, "without_head": {name: ms}}: the median over rounds of each copy's minimum step
    time (name "full", or a role: the step without it)."""
    import numba

    import edgeinfer
    from kernels_cpu.forward import make_scratch

    roles = list(ROLES) if roles is None else roles
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}: choose from {', '.join(ROLES)}")
    with edgeinfer.load(model, n_ctx=depth + 64, n_seq=rows, kv_type=kv_type, n_threads=threads) as m:
        engine, tables = m.engine, m.engine.runner.tables
        rng = np.random.default_rng(0)
        for seq in range(rows):  # each row's sequence holds `depth` tokens
            if seq:
                engine.cache.allocate()
            if depth:
                engine.prefill(rng.integers(100, 1000, depth), seq=seq)
        forwards = copies(sys.modules[m.engine.runner._compiled.__module__], roles)
        numba.set_num_threads(threads)
        scratch = make_scratch(tables.hyper, rows)
        scratch.threads[0] = threads
        logits = np.empty((rows, m.n_vocab), np.float32)
        tokens = rng.integers(100, 1000, rows).astype(np.int64)
        positions, seqs = np.full(rows, depth, np.int64), np.arange(rows, dtype=np.int64)
        arguments = {head: tables.arguments(tokens, positions, seqs, np.arange(rows if head else 0, dtype=np.int64),
                                            engine.cache.k, engine.cache.v, scratch, logits[:rows if head else 0])
                     for head in (True, False)}
        times = {(name, head): [] for name in forwards for head in (True, False)}
        for name, forward in forwards.items():  # compiled or loaded, outside the timing
            forward(*arguments[True])
        for _ in range(rounds):
            for name, forward in forwards.items():
                for head in (True, False):
                    best = float("inf")
                    for _ in range(calls):
                        start = time.perf_counter()
                        forward(*arguments[head])
                        best = min(best, time.perf_counter() - start)
                    times[name, head].append(best)
    return {("with_head" if head else "without_head"): {name: 1e3 * float(np.median(times[name, head]))
                                                         for name in forwards} for head in (True, False)}


def format_profile(result: dict) -> str:
    full_head, full = result["with_head"]["full"], result["without_head"]["full"]
    lines = ["| step | with the LM head | without |", "|---|---|---|",
             f"| full | {full_head:.3f} ms | {full:.3f} ms |"]
    for name in result["with_head"]:
        if name != "full":
            a, b = result["with_head"][name], result["without_head"][name]
            lines.append(f"| without {name} | {a:.3f} ms (saves {full_head - a:.3f}) | "
                         f"{b:.3f} ms (saves {full - b:.3f}) |")
    lines.append(f"LM head (full minus full without it): {full_head - full:.3f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.step_profile", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="catalogue name or GGUF path")
    parser.add_argument("--rows", type=int, default=1, help="rows in the batch (sequences decoded together)")
    parser.add_argument("--depth", type=int, default=32, help="tokens each row's sequence holds before the step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="calls per copy per round (the minimum is kept)")
    parser.add_argument("--roles", default=",".join(ROLES), help=f"comma-separated, of: {', '.join(ROLES)}")
    parser.add_argument("--kv-type", default="f16")
    args = parser.parse_args(argv)
    if min(args.rows, args.threads, args.rounds, args.calls) < 1 or args.depth < 0:
        parser.error("--rows, --threads, --rounds and --calls must be >= 1, --depth >= 0")
    try:
        result = profile(args.model, args.rows, args.depth, args.threads, args.rounds, args.calls,
                         [r for r in args.roles.split(",") if r], args.kv_type)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.model}: {args.rows} rows after {args.depth} cached tokens, {args.threads} threads, {args.kv_type} "
          f"cache; median over {args.rounds} rounds of each copy's fastest of {args.calls} calls")
    print(format_profile(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
