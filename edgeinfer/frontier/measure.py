"""Measuring one weight variant under one KV-cache type, in a child process of its own.

A child per (weight variant, KV type) makes the peak RSS that variant's own (nothing of the parent's or another
variant's pages), and an interrupted or crashed measurement costs only that child. In the child, in this order:
load (with the context `n_ctx` whose RSS is reported) and warm up; for each thread count, prefill and decode
tokens/s with `edgeinfer bench`'s own timing (`bench.time_edgeinfer`, so the figures agree with `edgeinfer bench`),
the energy of the decode test, and the time to first token of a `ttft_tokens`-token prompt through the API; then the
peak RSS, with every page of the KV cache of n_ctx positions touched first (a cache is allocated zeroed and only
the written positions would be resident otherwise); then, with the model closed, perplexity and KL divergence
against the reference variant with `tools.perplexity.perplexity` (what `edgeinfer perplexity --kl-base` runs; the
reference runs with an f32 KV cache there). A thread count changes only speed and energy: the forward's results do
not depend on it, so the quality and RSS figures are measured once and shared.

The child reads its settings as JSON on stdin and writes one line per step ("STEP text") and per figure set
("FIG {json}"; "n_threads" in it for per-thread figures) on stdout, so the parent keeps every figure that came
before an interruption or failure.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class MeasureSettings:
    """What every child measures: context for the RSS figure, bench test sizes and repetitions, the time-to-first-
    token prompt, the text and perplexity chunking, and the energy estimate's watts per busy core."""

    n_ctx: int = 2048
    prompt_tokens: int = 512
    gen_tokens: int = 128
    reps: int = 3
    ttft_tokens: int = 512
    text: str = ""
    ppl_ctx: int = 512
    chunks: int | None = None
    watts: float = 10.0


@dataclass
class GroupResult:
    """What one child reported: figures shared by every thread count, figures per thread count, and the error
    (the last line of its stderr) if it did not finish."""

    shared: dict = field(default_factory=dict)
    per_threads: dict[int, dict] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------- the parent's side


def measure_group(path: str, kv_type: str, threads: list[int], settings: MeasureSettings, reference: str | None,
                  on_step: Callable[[str], None] = lambda step: None) -> GroupResult:
    """Run the child for the variant file `path` with `kv_type` at each of `threads`; quality against the
    `reference` file (None: perplexity only). on_step(text) as each step starts. On KeyboardInterrupt the child is
    stopped and the interruption propagates, with the figures so far on the exception (`partial`)."""
    job = {"path": path, "kv_type": kv_type, "threads": list(threads), "reference": reference,
           "settings": asdict(settings)}
    on_step("preparing the CPU layout (made once per file)")
    prepare_cpu_layout(path)
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty stderr cannot fill it and stall the child
    proc = subprocess.Popen([sys.executable, "-c", "from edgeinfer.frontier.measure import child_main; child_main()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
                            start_new_session=True)  # its own session: the parent decides when a Ctrl-C stops it
    result = GroupResult()
    try:
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        for line in proc.stdout:
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "STEP":
                on_step(rest)
            elif kind == "FIG":
                figures = json.loads(rest)
                n = figures.pop("n_threads", None)
                (result.per_threads.setdefault(n, {}) if n is not None else result.shared).update(figures)
            elif kind == "ERROR":
                result.error = rest
        if proc.wait() and result.error is None:
            errors.seek(0)
            lines = [ln for ln in errors.read().strip().splitlines() if ln.strip()]
            result.error = lines[-1] if lines else f"the measuring process exited with status {proc.returncode}"
    except BaseException as e:
        proc.kill()
        proc.wait()
        e.partial = result
        raise
    finally:
        errors.close()
    return result


def prepare_cpu_layout(path: str) -> None:
    """Load the variant once in a throwaway process, so its repacked cache exists before any measuring child runs:
    otherwise the first child's peak RSS would hold the repacking's copies too (the first KV type of a weight type
    measured hundreds of MB more than the next). A failure here is left for the measuring child to report."""
    code = "import sys, edgeinfer; edgeinfer.load(sys.argv[1], n_ctx=16, n_threads=1).close()"
    subprocess.run([sys.executable, "-c", code, path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, start_new_session=True, check=False)


# ---------------------------------------------------------------- the child's side


def _say(kind: str, payload) -> None:
    print(kind, payload if isinstance(payload, str) else json.dumps(payload), flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (bytes).

    On Linux the high-water mark of this process's own memory (VmHWM): getrusage's ru_maxrss also keeps the peak
    of the parent it was forked from across the exec (the frontier's parent, which converted the variants, reached
    1.3 GB, and every child reported exactly that)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    except ImportError:  # Windows: psutil's peak working set
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", psutil.Process().memory_info().rss))


def touch_kv_cache(cache) -> int:
    """Write every page of the cache's host arrays (zeros over zeros: the contents stay valid), so the RSS counts
    the whole context's cache as a full one would. Returns the bytes touched (0 for a cache not in host memory)."""
    import numpy as np

    touched = 0
    for array in cache._stored_arrays():
        if isinstance(array, np.ndarray) and array.flags.writeable:
            array[...] = 0
            touched += array.nbytes
    return touched


def child_main() -> None:
    """The child process: read the job from stdin, measure, report on stdout (see the module docstring)."""
    from edgeinfer.errors import EdgeInferError

    job = json.loads(sys.stdin.read())
    settings = MeasureSettings(**job["settings"])
    try:
        _measure(job["path"], job["kv_type"], job["threads"], settings, job["reference"])
    except EdgeInferError as e:  # a clear message (context too small, text too short, ...): the parent shows it
        _say("ERROR", " ".join(str(e).split()))
        sys.exit(1)


def _measure(path: str, kv_type: str, threads: list[int], s: MeasureSettings, reference: str | None) -> None:
    import numpy as np

    import edgeinfer
    from edgeinfer.bench import time_edgeinfer
    from edgeinfer.frontier.energy import pick_meter

    _say("STEP", "loading")
    model = edgeinfer.load(path, n_ctx=s.n_ctx, n_threads=max(threads), kv_type=kv_type)
    try:
        model.engine.warm_up()
        meter = pick_meter(s.watts)
        rng = np.random.default_rng(0)
        for n_threads in threads:
            if s.prompt_tokens:
                _say("STEP", f"prefill {s.prompt_tokens} tokens, {n_threads} threads")
                pp = time_edgeinfer(model, "pp", s.prompt_tokens, n_threads, s.reps)
                _say("FIG", {"n_threads": n_threads, "prefill_tok_s": pp.mean, "prefill_tok_s_sd": pp.sd})
            if s.gen_tokens:
                _say("STEP", f"decode {s.gen_tokens} tokens, {n_threads} threads")
                start = meter.start()
                tg = time_edgeinfer(model, "tg", s.gen_tokens, n_threads, s.reps)
                joules = meter.joules(start)
                decoded = s.gen_tokens * (s.reps + 1)  # the timed repetitions and the warm-up all decode
                _say("FIG", {"n_threads": n_threads, "decode_tok_s": tg.mean, "decode_tok_s_sd": tg.sd,
                             "energy_j_per_token": joules / decoded, "energy_source": meter.source})
            if s.ttft_tokens:
                _say("STEP", f"first token of a {s.ttft_tokens}-token prompt, {n_threads} threads")
                model.engine.n_threads = n_threads
                prompt = rng.integers(min(1000, model.n_vocab // 2), min(model.n_vocab, 30000), size=s.ttft_tokens).tolist()
                started = time.perf_counter()
                model.generate(prompt, max_tokens=1, temperature=0)
                _say("FIG", {"n_threads": n_threads, "ttft_s": model.last_stats.time_to_first_token,
                             "ttft_wall_s": time.perf_counter() - started})
        _say("STEP", f"peak RSS at a context of {s.n_ctx}")
        kv_bytes = touch_kv_cache(model.engine.cache)
        _say("FIG", {"peak_rss_bytes": peak_rss_bytes(), "n_ctx": s.n_ctx, "kv_cache_bytes": kv_bytes})
    finally:
        model.close()
    if s.text:
        _quality(path, kv_type, max(threads), s, reference)


def _quality(path: str, kv_type: str, n_threads: int, s: MeasureSettings, reference: str | None) -> None:
    from tools.perplexity import perplexity

    _say("STEP", "perplexity" + (" and KL against the reference" if reference else ""))

    def on_chunk(i, n, ppl):
        _say("STEP", f"perplexity chunk {i + 1}/{n}")

    r = perplexity(path, s.text, n_ctx=s.ppl_ctx, kl_base=reference, n_chunks=s.chunks, n_threads=n_threads,
                   on_chunk=on_chunk, kv_type=kv_type)
    figures = {"ppl": r.ppl.mean, "ppl_err": r.ppl.err, "ppl_ctx": r.n_ctx, "ppl_chunks": r.n_chunks,
               "ppl_scored": r.n_scored}
    if r.kld is not None:
        figures.update(kl=r.kld.mean, kl_err=r.kld.err, top1=r.same_top.mean, top1_err=r.same_top.err,
                       reference_ppl=r.base_ppl.mean)
    _say("FIG", figures)


if __name__ == "__main__":  # pragma: no cover - the parent runs child_main through -c
    child_main()
