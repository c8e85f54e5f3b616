"""`edgeinfer bench`: prompt-processing and generation speed in the manner of llama-bench.

pp N: evaluate N prompt tokens on an empty context (tokens/s). tg N: generate N tokens one decode step at a time
from an empty context (tokens/s); with a batch of B > 1, B sequences generate N tokens each, one decode step for all
of them at a time (aggregate tokens/s over the B sequences). Beside each tg row: the weight bytes one decode step
reads and the read rate that makes (decode is bound by it: B sequences read the weights once per step). Each test runs after one warm-up and is repeated; mean and standard deviation
are reported. With `compare_llama_cpp`, llama.cpp (through llama-cpp-python) runs the same tests on the same file
in the same run (in a child process), so the ratio column compares like with like.
Time to first token and peak RSS are measured in fresh subprocesses, since both are properties of a whole process.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeinfer.errors import EdgeInferError


class BenchError(EdgeInferError):
    """A benchmark could not run (e.g. the llama.cpp comparison failed)."""


@dataclass
class BenchRow:
    backend: str  # "edgeinfer" or "llama.cpp"
    test: str  # "pp512", "tg128"
    n_threads: int
    samples: list[float] = field(default_factory=list)  # tokens/s per repetition (all B sequences together)
    batch: int = 1  # sequences decoded together (tg)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0

    @property
    def sd(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0


def _random_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    # llama-bench uses random token ids too; ids below 1000 avoid special tokens in every vocabulary here
    return np.random.default_rng(seed).integers(1000, min(n_vocab, 30000), size=n).tolist()


def _time_edgeinfer(model, test: str, n: int, n_threads: int, reps: int, batch: int = 1) -> BenchRow:
    engine = model.engine
    engine.n_threads = n_threads
    tokens = _random_tokens(max(n, batch), model.n_vocab)
    row = BenchRow("edgeinfer", test, n_threads, batch=batch)
    seqs = [0] + [engine.cache.allocate() for _ in range(batch - 1)]
    for rep in range(reps + 1):  # the first run is a warm-up
        for seq in seqs:
            engine.cache.truncate(seq, 0)
        start = time.perf_counter()
        if test.startswith("pp"):
            engine.prefill(tokens)
        else:
            step = tokens[:batch]
            for _ in range(n):
                logits = engine.decode_batch(step, seqs)
                step = [int(t) for t in np.argmax(logits, axis=1)]
        elapsed = time.perf_counter() - start
        if rep:
            row.samples.append(n * (batch if test.startswith("tg") else 1) / elapsed)
    for seq in seqs:
        engine.cache.free(seq)
    return row


def _time_llama_cpp(path: str, test: str, n: int, n_threads: int, reps: int, n_ctx: int) -> BenchRow:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, n_batch=512,
                verbose=False)
    tokens = _random_tokens(n, llm.n_vocab())
    row = BenchRow("llama.cpp", test, n_threads)
    for rep in range(reps + 1):
        llm.reset()  # the next eval drops the cached positions from n_tokens (now 0) on
        start = time.perf_counter()
        if test.startswith("pp"):
            llm.eval(tokens)
        else:
            token = tokens[0]
            for _ in range(n):
                llm.eval([token])
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        elapsed = time.perf_counter() - start
        if rep:
            row.samples.append(n / elapsed)
    llm.close()
    return row


def _llama_cpp_rows(path: str, prompt_tokens: int, gen_tokens: int, threads, reps: int, n_ctx: int) -> list[BenchRow]:
    """llama.cpp's rows, timed in a child process: llama.cpp's OpenMP runtime and Numba's must not share a process
    (together they crash), and a separate process keeps either from warming the other's caches."""
    args = json.dumps([path, prompt_tokens, gen_tokens, list(threads), reps, n_ctx])
    proc = subprocess.run([sys.executable, "-c", "import sys; from edgeinfer.bench import _llama_cpp_child; "
                           "_llama_cpp_child(sys.argv[1])", args], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROWS ")]
    if proc.returncode or not lines:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise BenchError(f"llama.cpp (llama-cpp-python) failed: {last}")
    return [BenchRow(**row) for row in json.loads(lines[-1][5:])]


def _llama_cpp_child(args: str) -> None:
    path, prompt_tokens, gen_tokens, threads, reps, n_ctx = json.loads(args)
    rows = []
    for n_threads in threads:
        if prompt_tokens:
            rows.append(_time_llama_cpp(path, f"pp{prompt_tokens}", prompt_tokens, n_threads, reps, n_ctx))
        if gen_tokens:
            rows.append(_time_llama_cpp(path, f"tg{gen_tokens}", gen_tokens, n_threads, reps, n_ctx))
    print("ROWS " + json.dumps([asdict(r) for r in rows]), flush=True)


_CHILD_GENERATE = """
import sys, resource
{body}
print("PEAK_RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
"""

_EDGEINFER_BODY = """
import edgeinfer
m = edgeinfer.load(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]))
for i, piece in enumerate(m.stream("Once upon a time", max_tokens=int(sys.argv[4]), temperature=0)):
    if i == 0:
        print("FIRST_TOKEN", flush=True)
"""

_LLAMA_CPP_BODY = """
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), verbose=False)
for i, out in enumerate(llm("Once upon a time", max_tokens=int(sys.argv[4]), temperature=0, stream=True)):
    if i == 0:
        print("FIRST_TOKEN", flush=True)
"""


def process_figures(path: str, backend: str, n_ctx: int, n_threads: int, n_gen: int) -> dict:
    """Seconds from process start to the first generated token, and the peak RSS, of a fresh process that
    loads the model and generates n_gen tokens."""
    body = _EDGEINFER_BODY if backend == "edgeinfer" else _LLAMA_CPP_BODY
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_GENERATE.format(body=body), path, str(n_ctx),
                             str(n_threads), str(n_gen)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first, peak = None, None
    for line in proc.stdout:
        if line.startswith("FIRST_TOKEN") and first is None:
            first = time.perf_counter() - start
        elif line.startswith("PEAK_RSS"):
            peak = int(line.split()[1])
    stderr = proc.stderr.read()
    if proc.wait() or first is None or peak is None:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"
        return {"error": last}
    return {"time_to_first_token_s": first, "peak_rss_bytes": peak}


def bench_context(prompt_tokens: int, gen_tokens: int, n_ctx: int | None = None) -> int:
    """The context length (positions) a run of pp`prompt_tokens` and tg`gen_tokens` uses: `n_ctx` if given, else
    the larger test plus 16. BenchError, naming the option, when there is nothing to run or a test does not fit
    (cheap: call it before loading anything)."""
    if prompt_tokens < 0 or gen_tokens < 0:
        raise BenchError(f"-p and -n must be >= 0, got -p {prompt_tokens} -n {gen_tokens}")
    if prompt_tokens == 0 and gen_tokens == 0:
        raise BenchError("-p 0 and -n 0: nothing to measure")
    if n_ctx is None:
        return max(prompt_tokens, gen_tokens) + 16
    # each test starts on an empty context: pp N fills N positions, tg N (N decode steps) fills N
    for flag, n in (("-p", prompt_tokens), ("-n", gen_tokens)):
        if n > n_ctx:
            raise BenchError(f"{flag} {n} is larger than the context of {n_ctx} positions (--ctx)")
    return n_ctx


def run_bench(model_path: str, *, prompt_tokens: int = 512, gen_tokens: int = 128, threads=(1, 2), reps: int = 3,
              n_ctx: int | None = None, batches=(1,), compare_llama_cpp: bool = False, process: bool = True) -> dict:
    """All rows of a benchmark run, as a JSON-serialisable dict. n_ctx: context positions (see `bench_context`);
    batches: the tg test for each number of sequences decoded together."""
    import edgeinfer

    if reps < 1:
        raise BenchError(f"-r must be >= 1, got {reps}")
    path = str(model_path)
    n_ctx = bench_context(prompt_tokens, gen_tokens, n_ctx)
    rows: list[BenchRow] = []
    if any(b < 1 for b in batches):
        raise BenchError(f"--batch values must be >= 1, got {','.join(map(str, batches))}")
    with edgeinfer.load(path, n_ctx=n_ctx, n_seq=max(batches)) as model:
        weight_bytes = model.engine.tables.weight_bytes_per_step()
        for n_threads in threads:
            if prompt_tokens:
                rows.append(_time_edgeinfer(model, f"pp{prompt_tokens}", prompt_tokens, n_threads, reps))
            for batch in batches if gen_tokens else ():
                rows.append(_time_edgeinfer(model, f"tg{gen_tokens}", gen_tokens, n_threads, reps, batch))
    if compare_llama_cpp:
        rows += _llama_cpp_rows(path, prompt_tokens, gen_tokens, threads, reps, n_ctx)
    result = {
        "model": os.path.basename(path),
        "model_size_bytes": os.path.getsize(path),
        "weight_bytes_per_step": weight_bytes,
        "rows": [dict(asdict(r), mean=r.mean, sd=r.sd) for r in rows],
    }
    if process:
        result["process"] = {"edgeinfer": process_figures(path, "edgeinfer", 2048, max(threads), 128)}
        if compare_llama_cpp:
            result["process"]["llama.cpp"] = process_figures(path, "llama.cpp", 2048, max(threads), 128)
    return result


def format_bench(result: dict) -> str:
    """The result as a llama-bench-style table, with the ratio to llama.cpp where it ran."""
    theirs = {(r["test"], r["n_threads"]): r["mean"] for r in result["rows"] if r["backend"] == "llama.cpp"}
    step_bytes = result.get("weight_bytes_per_step")
    lines = [f"model: {result['model']} ({result['model_size_bytes'] / 1e6:.0f} MB)"
             + (f"; a decode step reads {step_bytes / 1e6:.0f} MB of weights" if step_bytes else ""),
             f"| {'backend':9} | {'test':6} | batch | threads | {'tokens/s':>16} | vs llama.cpp | weights GB/s |",
             "|-----------|--------|-------|---------|------------------|--------------|--------------|"]
    for r in result["rows"]:
        ratio = rate = ""
        batch = r.get("batch", 1)
        if r["backend"] == "edgeinfer" and batch == 1 and (r["test"], r["n_threads"]) in theirs:
            ratio = f"{r['mean'] / theirs[(r['test'], r['n_threads'])]:.2f}x"
        if r["backend"] == "edgeinfer" and r["test"].startswith("tg") and step_bytes:
            rate = f"{step_bytes * r['mean'] / batch / 1e9:.1f}"  # steps/s = tokens/s / B
        lines.append(f"| {r['backend']:9} | {r['test']:6} | {batch:5} | {r['n_threads']:7} | "
                     f"{r['mean']:8.1f} ± {r['sd']:5.1f} | {ratio:>12} | {rate:>12} |")
    for backend, fig in result.get("process", {}).items():
        if "error" in fig:
            lines.append(f"{backend}: process figures failed: {fig['error']}")
        else:
            lines.append(f"{backend}: process start to first token {fig['time_to_first_token_s']:.2f} s, "
                         f"peak RSS generating 128 tokens at n_ctx 2048: {fig['peak_rss_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)
