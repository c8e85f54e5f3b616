"""`edgeinfer bench`: prompt-processing and generation speed in the manner of llama-bench.

pp N: evaluate N prompt tokens on an empty context (tokens/s). tg N: generate N tokens one decode step at a time
from an empty context (tokens/s); with a batch of B > 1, B sequences generate N tokens each, one decode step for all
of them at a time (aggregate tokens/s over the B sequences). At depth d (llama-bench's -d, "tg128 @ d4096"), d
tokens are prefilled into the cache first, not timed (once; each repetition truncates back to them), and the test
runs at positions d and on. Each KV-cache type asked for loads the model once with that cache.
Beside each tg row: the bytes one decode step reads and the read rate that makes (decode is bound by it): the
weights (once per step whatever B is) plus, for each of the B sequences, the KV cache of the positions the step
attends to (K and V of every layer at the cache type; a sliding-window layer only its window), averaged over the
test's steps at positions d .. d+N-1. On the CPU, the memory read rate at each thread count (the wall decode is bound
by: kernels_cpu.memory_read) is measured in the same run, before and after that thread count's tests (on a shared
machine it moves by tens of percent within minutes), and each tg row says what fraction of it the step reads. Each
test runs after one warm-up and is repeated; mean and standard deviation are reported. With `compare_llama_cpp`,
llama.cpp (through llama-cpp-python) runs the same tests on the same file in the same run (in a child process), so
the ratio column compares like with like.
Time to first token and peak RSS are measured in fresh subprocesses, since both are properties of a whole process.
The model runs on the device asked for (auto, cpu, cuda: edgeinfer.backends.devices); the result names it and why,
and each row its device (llama.cpp's rows run on the CPU: no layers are offloaded).
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
from edgeinfer.kv_cache import DEFAULT_KV_TYPE, KVCache


class BenchError(EdgeInferError):
    """A benchmark could not run (e.g. the llama.cpp comparison failed)."""


@dataclass
class BenchRow:
    backend: str  # "edgeinfer" or "llama.cpp"
    test: str  # "pp512", "tg128", "tg128 @ d4096"
    n_threads: int
    samples: list[float] = field(default_factory=list)  # tokens/s per repetition (all B sequences together)
    batch: int = 1  # sequences decoded together (tg)
    depth: int = 0  # tokens in the cache before the test
    kv_type: str = DEFAULT_KV_TYPE
    device: str = "cpu"  # where the test ran: "cpu" or "cuda"

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0

    @property
    def sd(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0


def _random_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    # llama-bench uses random token ids too; ids below 1000 avoid special tokens in every vocabulary here (a tiny
    # test vocabulary: its upper half)
    return np.random.default_rng(seed).integers(min(1000, n_vocab // 2), min(n_vocab, 30000), size=n).tolist()


def row_name(kind: str, n: int, depth: int = 0) -> str:
    """llama-bench's test names: "pp512", "tg128", and "tg128 @ d4096" at a depth."""
    return f"{kind}{n}" + (f" @ d{depth}" if depth else "")


DEPTH_SEED = 1  # the depth tokens: one stream, so a larger depth extends a smaller one's cache


def fill_depth(model, depth: int, tokens: list[int]) -> None:
    """Make sequence 0 hold the first `depth` of `tokens` (the depth stream), prefilling only what it lacks."""
    engine = model.engine
    held, cached = 0, engine.cache.tokens(0)
    while held < min(depth, len(cached)) and cached[held] == tokens[held]:
        held += 1
    engine.truncate(held)
    if depth > held:
        engine.prefill(tokens[held:depth])


def time_edgeinfer(model, kind: str, n: int, n_threads: int, reps: int, batch: int = 1,
                    depth: int = 0) -> BenchRow:
    """One test on sequence 0 (and batch - 1 more sequences for tg) after the `depth` tokens sequence 0 holds."""
    engine = model.engine
    if engine.n_past < depth:
        raise ValueError(f"sequence 0 holds {engine.n_past} tokens, fewer than the depth {depth}")
    engine.n_threads = n_threads
    tokens = _random_tokens(max(n, batch), model.n_vocab)
    row = BenchRow("edgeinfer", row_name(kind, n, depth), n_threads, batch=batch, depth=depth,
                   kv_type=model.kv_type, device=model.device.name)
    seqs = [0] + [engine.cache.allocate() for _ in range(batch - 1)]
    for seq in seqs[1:]:
        engine.cache.copy_prefix(0, seq, depth)
    for rep in range(reps + 1):  # the first run is a warm-up
        for seq in seqs:
            engine.cache.truncate(seq, depth)
        start = time.perf_counter()
        if kind == "pp":
            engine.prefill(tokens)
        else:
            step = tokens[:batch]
            for _ in range(n):
                logits = engine.decode_batch(step, seqs)
                step = [int(t) for t in np.argmax(logits, axis=1)]
        elapsed = time.perf_counter() - start
        if rep:
            row.samples.append(n * (batch if kind == "tg" else 1) / elapsed)
    for seq in seqs[1:]:
        engine.cache.free(seq)
    engine.truncate(depth)
    return row


def cache_bytes_per_step(cfg, kv_type: str, first_position: int, n_steps: int) -> float:
    """KV-cache bytes one sequence's decode step reads, averaged over steps at positions first_position ..
    first_position + n_steps - 1: the step at position p attends to p + 1 positions (a sliding-window layer to at
    most its window), K and V of each layer at the cache type."""
    per_layer_position = KVCache.nbytes_for(cfg, 1, 1, kv_type) / cfg.n_layers
    attended = np.arange(first_position, first_position + n_steps) + 1
    total = 0
    for layer in range(cfg.n_layers):
        window = cfg.layer_window(layer)
        total += int(np.minimum(attended, window).sum()) if window else int(attended.sum())
    return total * per_layer_position / max(1, n_steps)


WALL_BYTES = 256 << 20  # the read probe's buffer: 8x a large last-level cache (32 MB), read in ~5 ms
WALL_MEMORY_SHARE = 8  # at most this fraction (1 / 8) of the memory available, on a small device
WALL_READS = 3  # the best of this many reads, after a first


class MemoryWall:
    """The machine's memory read rate per thread count, each measured before and after that count's tests."""

    def __init__(self, n_bytes: int = WALL_BYTES):
        self.n_bytes = n_bytes
        self._buffer = None
        self.readings: dict[int, list[float]] = {}  # threads -> GB/s readings

    def measure(self, n_threads: int) -> None:
        import psutil

        from kernels_cpu.memory_read import read_buffer, read_rate
        if self._buffer is None:
            self.n_bytes = min(self.n_bytes, psutil.virtual_memory().available // WALL_MEMORY_SHARE)
            self._buffer = read_buffer(self.n_bytes)
        self.readings.setdefault(n_threads, []).append(read_rate(self._buffer, n_threads, WALL_READS))

    def gb_per_s(self, n_threads: int) -> float | None:
        readings = self.readings.get(n_threads)
        return statistics.fmean(readings) if readings else None

    def as_dict(self) -> dict:
        return {str(t): {"gb_per_s": self.gb_per_s(t), "readings": r, "buffer_bytes": self._buffer.nbytes}
                for t, r in self.readings.items()}


def read_figures(row: BenchRow, cfg, weight_bytes: int) -> dict:
    """For a tg row: bytes one decode step reads ({"weights", "kv_cache"}: all B sequences' caches) and the rate.
    n (the tg length) is taken from the test name."""
    n = int(row.test.split()[0][2:])
    kv = row.batch * cache_bytes_per_step(cfg, row.kv_type, row.depth, n)
    steps_per_second = row.mean / row.batch
    return {"read_bytes_per_step": {"weights": weight_bytes, "kv_cache": int(round(kv))},
            "read_gb_per_s": (weight_bytes + kv) * steps_per_second / 1e9}


GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids, llama-cpp-python's type_k / type_v


def _time_llama_cpp(path: str, kind: str, n: int, n_threads: int, reps: int, n_ctx: int, depth: int = 0,
                    kv_type: str = DEFAULT_KV_TYPE) -> BenchRow:
    from llama_cpp import Llama

    # a quantized V cache needs llama.cpp's flash attention
    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, n_batch=512,
                type_k=GGML_TYPES[kv_type], type_v=GGML_TYPES[kv_type], flash_attn=kv_type == "q8_0",
                verbose=False)
    tokens = _random_tokens(n, llm.n_vocab())
    if depth:
        llm.eval(_random_tokens(depth, llm.n_vocab(), DEPTH_SEED))
    row = BenchRow("llama.cpp", row_name(kind, n, depth), n_threads, depth=depth, kv_type=kv_type)
    for rep in range(reps + 1):
        llm.n_tokens = depth  # the next eval drops the cached positions from n_tokens on
        start = time.perf_counter()
        if kind == "pp":
            llm.eval(tokens)
        else:
            for i in range(n):  # the tokens only set the positions' work: the prompt's, as in llama-bench
                llm.eval([tokens[i]])
        elapsed = time.perf_counter() - start
        if rep:
            row.samples.append(n / elapsed)
    llm.close()
    return row


def _llama_cpp_rows(path: str, prompt_tokens: int, gen_tokens: int, threads, reps: int, n_ctx: int, depths=(0,),
                    kv_types=(DEFAULT_KV_TYPE,)) -> list[BenchRow]:
    """llama.cpp's rows, timed in a child process: llama.cpp's OpenMP runtime and Numba's must not share a process
    (together they crash), and a separate process keeps either from warming the other's caches."""
    args = json.dumps([path, prompt_tokens, gen_tokens, list(threads), reps, n_ctx, list(depths), list(kv_types)])
    proc = subprocess.run([sys.executable, "-c", "import sys; from edgeinfer.bench import _llama_cpp_child; "
                           "_llama_cpp_child(sys.argv[1])", args], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROWS ")]
    if proc.returncode or not lines:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise BenchError(f"llama.cpp (llama-cpp-python) failed: {last}")
    return [BenchRow(**row) for row in json.loads(lines[-1][5:])]


def _llama_cpp_child(args: str) -> None:
    path, prompt_tokens, gen_tokens, threads, reps, n_ctx, depths, kv_types = json.loads(args)
    rows = []
    for kv_type in kv_types:
        for depth in depths:
            for n_threads in threads:
                for kind, n in (("pp", prompt_tokens), ("tg", gen_tokens)):
                    if n:
                        rows.append(_time_llama_cpp(path, kind, n, n_threads, reps, n_ctx, depth, kv_type))
    print("ROWS " + json.dumps([asdict(r) for r in rows]), flush=True)


_CHILD_GENERATE = """
import sys, resource
{body}
print("PEAK_RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
"""

_EDGEINFER_BODY = """
from edgeinfer.api import load
m = load(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), device=sys.argv[5])
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


def process_figures(path: str, backend: str, n_ctx: int, n_threads: int, n_gen: int, device: str = "cpu") -> dict:
    """Seconds from process start to the first generated token, and the peak RSS, of a fresh process that
    loads the model (edgeinfer: on `device`) and generates n_gen tokens."""
    body = _EDGEINFER_BODY if backend == "edgeinfer" else _LLAMA_CPP_BODY
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_GENERATE.format(body=body), path, str(n_ctx),
                             str(n_threads), str(n_gen), device], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
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


def bench_context(prompt_tokens: int, gen_tokens: int, n_ctx: int | None = None, depths=(0,)) -> int:
    """The context length (positions) a run of pp`prompt_tokens` and tg`gen_tokens` at each of `depths` uses:
    `n_ctx` if given, else the largest depth plus the larger test plus 16. BenchError, naming the option, when there
    is nothing to run or a test does not fit (cheap: call it before loading anything)."""
    if prompt_tokens < 0 or gen_tokens < 0:
        raise BenchError(f"-p and -n must be >= 0, got -p {prompt_tokens} -n {gen_tokens}")
    if prompt_tokens == 0 and gen_tokens == 0:
        raise BenchError("-p 0 and -n 0: nothing to measure")
    if not depths or any(d < 0 for d in depths):
        raise BenchError(f"-d values must be >= 0, got {','.join(map(str, depths))}")
    if n_ctx is None:
        return max(depths) + max(prompt_tokens, gen_tokens) + 16
    # a test at depth d starts with d positions cached: pp N fills d + N positions, tg N (N decode steps) d + N
    depth = max(depths)
    for flag, n in (("-p", prompt_tokens), ("-n", gen_tokens)):
        if n and depth + n > n_ctx:
            at = f" at -d {depth} ({depth + n} positions)" if depth else ""
            raise BenchError(f"{flag} {n}{at} is larger than the context of {n_ctx} positions (--ctx)")
    return n_ctx


def run_bench(model_path: str, *, prompt_tokens: int = 512, gen_tokens: int = 128, threads=(1, 2), reps: int = 3,
              n_ctx: int | None = None, batches=(1,), depths=(0,), kv_types=(None,), compare_llama_cpp: bool = False,
              process: bool = True, device: str = "auto") -> dict:
    """All rows of a benchmark run, as a JSON-serialisable dict. n_ctx: context positions (see `bench_context`);
    batches: the tg test for each number of sequences decoded together; depths: each test after that many cached
    tokens; kv_types: the KV-cache types to load the model with (None: the default); device: "auto", "cpu" or
    "cuda" (the result's "device" says which ran and why)."""
    from edgeinfer.api import load

    if reps < 1:
        raise BenchError(f"-r must be >= 1, got {reps}")
    path = str(model_path)
    n_ctx = bench_context(prompt_tokens, gen_tokens, n_ctx, depths)
    rows: list[dict] = []
    if any(b < 1 for b in batches):
        raise BenchError(f"--batch values must be >= 1, got {','.join(map(str, batches))}")
    kv_bytes_per_position, loaded_types = {}, []
    wall = MemoryWall()
    for kv_type in dict.fromkeys(DEFAULT_KV_TYPE if t is None else t for t in kv_types):
        with load(path, n_ctx=n_ctx, n_seq=max(batches), kv_type=kv_type, device=device) as model:
            chosen = {"name": model.device.name, "reason": model.device.reason}
            if model.device.name != "cpu":  # host threads do not change a GPU's speed: one row each, not one a count
                threads = (1,)
            loaded_types.append(model.kv_type)
            weight_bytes = model.engine.runner.weight_bytes_per_step()
            kv_bytes_per_position[model.kv_type] = KVCache.nbytes_for(model.config, 1, 1, model.kv_type)
            rows += _edgeinfer_rows(model, prompt_tokens, gen_tokens, threads, reps, batches, depths, weight_bytes,
                                    wall if model.device.name == "cpu" and gen_tokens else None)
    for row in rows:  # each thread count's readings, from every depth and cache type, are its wall
        if "read_gb_per_s" in row and wall.gb_per_s(row["n_threads"]):
            row["wall_fraction"] = row["read_gb_per_s"] / wall.gb_per_s(row["n_threads"])
    if compare_llama_cpp:
        rows += [dict(asdict(r), mean=r.mean, sd=r.sd) for r in
                 _llama_cpp_rows(path, prompt_tokens, gen_tokens, threads, reps, n_ctx, depths, loaded_types)]
    result = {
        "model": os.path.basename(path),
        "model_size_bytes": os.path.getsize(path),
        "device": chosen,
        "n_ctx": n_ctx,
        "weight_bytes_per_step": weight_bytes,
        "kv_bytes_per_position": kv_bytes_per_position,  # one sequence, all layers, K and V
        "rows": rows,
    }
    if wall.readings:
        result["memory_wall"] = wall.as_dict()  # threads -> the read rate measured in this run
    if process:
        result["process"] = {"edgeinfer": process_figures(path, "edgeinfer", 2048, max(threads), 128,
                                                          chosen["name"])}
        if compare_llama_cpp:
            result["process"]["llama.cpp"] = process_figures(path, "llama.cpp", 2048, max(threads), 128)
    return result


def _edgeinfer_rows(model, prompt_tokens, gen_tokens, threads, reps, batches, depths, weight_bytes,
                    wall: MemoryWall | None = None) -> list[dict]:
    """Every test on one loaded model, depth by depth (each filled once, with the most threads asked for); with a
    wall, the memory read rate is measured before and after each thread count's tests."""
    rows = []
    depth_tokens = _random_tokens(max(depths), model.n_vocab, DEPTH_SEED)
    for depth in depths:
        model.engine.n_threads = max(threads)
        fill_depth(model, depth, depth_tokens)
        for n_threads in threads:
            if wall is not None:
                wall.measure(n_threads)
            timed = [time_edgeinfer(model, "pp", prompt_tokens, n_threads, reps, depth=depth)] if prompt_tokens else []
            timed += [time_edgeinfer(model, "tg", gen_tokens, n_threads, reps, batch, depth)
                      for batch in (batches if gen_tokens else ())]
            if wall is not None:
                wall.measure(n_threads)
            for r in timed:
                row = dict(asdict(r), mean=r.mean, sd=r.sd)
                if r.test.startswith("tg"):
                    row.update(read_figures(r, model.config, weight_bytes))
                rows.append(row)
    return rows


READ_HEADER = "read/step MB: weights + KV"


def format_bench(result: dict) -> str:
    """The result as a llama-bench-style table, with the ratio to llama.cpp where it ran. For tg rows: the MB a
    decode step reads, weights + KV cache, and the GB/s that makes."""
    theirs = {(r["test"], r["n_threads"], r.get("kv_type")): r["mean"] for r in result["rows"]
              if r["backend"] == "llama.cpp"}
    step_bytes = result.get("weight_bytes_per_step")
    per_position = ", ".join(f"{t} {b / 1024:.0f} KB" for t, b in result.get("kv_bytes_per_position", {}).items())
    test_width = max([6] + [len(r["test"]) for r in result["rows"]])
    walls = result.get("memory_wall", {})
    lines = [f"model: {result['model']} ({result['model_size_bytes'] / 1e6:.0f} MB)"
             + (f"; a decode step reads {step_bytes / 1e6:.0f} MB of weights" if step_bytes else "")
             + (f" and the KV cache of each attended position ({per_position})" if per_position else ""),
             *([f"device: {result['device']['name']} ({result['device']['reason'].partition(': ')[2]})"]
               if "device" in result else []),
             *([f"memory read wall, measured in this run ({next(iter(walls.values()))['buffer_bytes'] >> 20} MiB read "
                f"by the threads): "
                + ", ".join(f"{t} thread{'s' if t != '1' else ''} {w['gb_per_s']:.1f} GB/s" for t, w in walls.items())]
               if walls else []),
             f"| {'backend':9} | {'test':{test_width}} | kv   | batch | threads | {'tokens/s':>16} | vs llama.cpp "
             f"| {READ_HEADER} | GB/s  | wall |",
             f"|-----------|-{'-' * test_width}-|------|-------|---------|------------------|--------------"
             f"|-{'-' * len(READ_HEADER)}-|-------|------|"]
    for r in result["rows"]:
        ratio = read = rate = of_wall = ""
        batch, kv_type = r.get("batch", 1), r.get("kv_type", "")
        key = (r["test"], r["n_threads"], kv_type)
        if r["backend"] == "edgeinfer" and batch == 1 and key in theirs:
            ratio = f"{r['mean'] / theirs[key]:.2f}x"
        if "read_bytes_per_step" in r:
            parts = r["read_bytes_per_step"]
            read = f"{parts['weights'] / 1e6:.0f} + {parts['kv_cache'] / 1e6:.1f}"
            rate = f"{r['read_gb_per_s']:.1f}"
        if "wall_fraction" in r:
            of_wall = f"{100 * r['wall_fraction']:.0f}%"
        lines.append(f"| {r['backend']:9} | {r['test']:{test_width}} | {kv_type:4} | {batch:5} | {r['n_threads']:7} | "
                     f"{r['mean']:8.1f} ± {r['sd']:5.1f} | {ratio:>12} | {read:>{len(READ_HEADER)}} | {rate:>5} "
                     f"| {of_wall:>4} |")
    for backend, fig in result.get("process", {}).items():
        if "error" in fig:
            lines.append(f"{backend}: process figures failed: {fig['error']}")
        else:
            lines.append(f"{backend}: process start to first token {fig['time_to_first_token_s']:.2f} s, "
                         f"peak RSS generating 128 tokens at n_ctx 2048: {fig['peak_rss_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)
