"""Fuzz: mutations of the tiny valid GGUF through `edgeinfer.load` + `generate` + the chat template, in a worker
process with a memory limit and a per-case timeout.

Every case must end as a correct run or an error of ours (an EdgeInferError subclass): never another exception
(FAIL), a dead worker (CRASH) or a case past its time (HANG). A mutation only of padding bytes must give the
unmutated file's greedy output. CI runs FUZZ_CASES cases (seeded, deterministic); EDGEINFER_FUZZ_CASES=10000 runs
the long version, and EDGEINFER_FUZZ_REPORT=path.json writes the counts there.

Mutations: bit flips anywhere, truncation, the header's counts, string and array lengths, value and tensor types,
n_dims, dims and offsets set to extremes or random values, metadata values (counts, reals, ids) set to extremes,
string bytes, and files rewritten with hostile hyper-parameters, special ids and keys (`tiny_gguf`).
"""
from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

import kernels_cpu  # noqa: F401  (sets NUMBA_CACHE_DIR, which the worker shares)
from tiny_gguf import tiny_metadata, write_tiny_llama

FUZZ_CASES = int(os.environ.get("EDGEINFER_FUZZ_CASES", "300"))
SEED = 20260611
CASE_TIMEOUT_S = 20.0  # far above a case's ~0.1 s: past it the case is a HANG
COMPILE_TIMEOUT_S = 900.0  # a case with weight types new to the worker: it compiles (once) or loads their kernels
WORKER_START_TIMEOUT_S = 600.0
MEMORY_LIMIT_BYTES = 6 << 30  # address space of the worker (Numba and LLVM alone reserve about 1.5 GB)
PROMPT, MAX_TOKENS = "the cat", 4
CHAT = [{"role": "user", "content": "hi"}]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}")


# ---------------------------------------------------------------------------------------------- the worker process

WORKER = r"""
import json, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
import edgeinfer
from edgeinfer.errors import EdgeInferError
from edgeinfer.gguf_reader import GGUFFile
prompt, max_tokens, chat = json.loads(sys.argv[2])
seen_kernels = set()

def say(**message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()

def run(path):
    try:  # the decode step is compiled per (embedding type, matrix types): the first of each may take minutes
        with GGUFFile(path) as f:
            embedding = f.tensors["token_embd.weight"].ggml_type if "token_embd.weight" in f.tensors else -1
            kernels = (embedding, tuple(sorted({t.ggml_type for t in f.tensors.values() if len(t.shape) == 2})))
        if kernels not in seen_kernels:
            seen_kernels.add(kernels)
            say(phase="new_kernels", kernels=kernels)
    except EdgeInferError:
        pass  # load reports it
    try:
        with edgeinfer.load(path, n_ctx=64, n_threads=1) as model:
            text = model.generate(prompt, max_tokens=max_tokens, temperature=0.0)
            model.chat_tokens(chat)
        return dict(outcome="ok", text=text)
    except EdgeInferError as e:
        return dict(outcome="error", error=type(e).__name__, message=str(e)[:300])
    except BaseException as e:
        return dict(outcome="fail", error=type(e).__name__, message=traceback.format_exc()[-3000:])

say(phase="ready")
for line in sys.stdin:
    say(phase="done", **run(json.loads(line)["path"]))
"""


class Worker:
    """A child process that loads and runs one case file at a time; restarted after a crash or a hang."""

    def __init__(self, home: Path, warm_up: Path):
        env = dict(os.environ, EDGEINFER_HOME=str(home), NUMBA_CACHE_DIR=os.environ["NUMBA_CACHE_DIR"])
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        self.log = open(home / "worker.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(MEMORY_LIMIT_BYTES), json.dumps([PROMPT, MAX_TOKENS, CHAT])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env)
        self._buffer = b""
        # the first load of a process reads the compiled kernels from Numba's cache: not part of any case's time
        if self._read(WORKER_START_TIMEOUT_S) != {"phase": "ready"} or self.run(warm_up, WORKER_START_TIMEOUT_S) \
                .get("outcome") != "ok":
            raise RuntimeError(f"the fuzz worker did not start (see {home / 'worker.log'})")
        self.warm_up_text = self.last_text

    def run(self, path: Path, timeout: float = CASE_TIMEOUT_S) -> dict:
        """The case's result: ok (with text) / error (class) / fail (traceback) / crash / hang."""
        self.proc.stdin.write((json.dumps({"path": str(path)}) + "\n").encode())
        self.proc.stdin.flush()
        deadline, new_kernels = time.monotonic() + timeout, False
        while True:
            message = self._read(deadline - time.monotonic())
            if message is None:
                return {"outcome": "hang" if self.proc.poll() is None else "crash", "new_kernels": new_kernels,
                        "message": f"exit status {self.proc.poll()}"}
            if message["phase"] == "new_kernels":
                deadline, new_kernels = time.monotonic() + max(timeout, COMPILE_TIMEOUT_S), True
                continue
            self.last_text = message.get("text")
            return dict(message, new_kernels=new_kernels)

    def _read(self, timeout: float) -> dict | None:
        """The next JSON line from the worker, or None if it died or said nothing within `timeout` seconds."""
        end = time.monotonic() + max(timeout, 0)
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(end - time.monotonic(), 0))
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16) if ready else b""
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------------------------- where to mutate

@dataclass(frozen=True)
class Slot:
    """A field of the file: byte offset, struct format and what it is ("length", "count", "type", "n_dims", "dim",
    "offset", "scalar", "text")."""

    offset: int
    fmt: str
    kind: str
    size: int = 0  # bytes of a "text" slot


def file_slots(path: Path) -> tuple[list[Slot], list[tuple[int, int]]]:
    """Every mutable field of a GGUF file (read with gguf-py's reader) and its padding (byte ranges nothing reads)."""
    reader = gguf.GGUFReader(path)
    slots = [Slot(8, "<Q", "count"), Slot(16, "<Q", "count")]
    used = [(0, 24)]
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        offsets = np.cumsum([field.offset] + [p.nbytes for p in field.parts]).tolist()
        parts = list(zip(offsets, field.parts))
        used.append((offsets[0], offsets[-1]))
        slots += [Slot(parts[0][0], "<Q", "length"), Slot(parts[2][0], "<I", "type")]
        rest = parts[3:]
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            slots += [Slot(rest[0][0], "<I", "type"), Slot(rest[1][0], "<Q", "count")]
            rest = rest[2:]
        for offset, part in rest:
            if part.dtype == np.uint8 and field.types[-1] == gguf.GGUFValueType.STRING:
                slots.append(Slot(offset, "", "text", part.nbytes))
            elif part.nbytes == 8 and field.types[-1] == gguf.GGUFValueType.STRING:
                slots.append(Slot(offset, "<Q", "length"))
            else:
                slots.append(Slot(offset, "<" + part.dtype.char, "scalar"))
    for t in reader.tensors:
        offsets = np.cumsum([t.field.offset] + [p.nbytes for p in t.field.parts]).tolist()
        used += [(offsets[0], offsets[-1]), (int(t.data_offset), int(t.data_offset) + int(t.n_bytes))]
        slots += [Slot(offsets[0], "<Q", "length"), Slot(offsets[2], "<I", "n_dims"), Slot(offsets[4], "<I", "type"),
                  Slot(offsets[5], "<Q", "offset")]
        slots += [Slot(offsets[3] + 8 * i, "<Q", "dim") for i in range(len(t.shape))]
    used.sort()
    padding, end = [], 0
    for start, stop in used:
        if start > end:
            padding.append((end, start))
        end = max(end, stop)
    size = path.stat().st_size
    return slots, padding + ([(end, size)] if end < size else [])


# ---------------------------------------------------------------------------------------------- mutations

_U64_EXTREMES = [0, 1, 2, 3, 255, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
_FLOAT_EXTREMES = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e38, -1.0, 1e-45, 3e38, 1e-30]

# semantic rewrites: (key, values) written with write_tiny_llama (None removes the key)
_REWRITES = [(key, [0, 1, 2 ** 31, 2 ** 32 - 1, -1, 2 ** 63 - 1, None, 3.5, "x"]) for key in tiny_metadata()
             if key.startswith("llama.") and isinstance(tiny_metadata()[key], int)]
_REWRITES += [(key, [0.0, -1.0, float("nan"), float("inf"), 1e-40, None, 0]) for key in
              ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon")]
_REWRITES += [(f"tokenizer.ggml.{role}_token_id", [304, 2 ** 32 - 1, -1, 0, True, "1"]) for role in
              ("bos", "eos", "eot", "padding", "unknown", "fim_pre", "eom")]
_REWRITES += [("llama.rope.scaling.type", ["yarn", "linear", "none", 3]), ("llama.rope.scaling.factor", [8.0, 1.0]),
              ("llama.attn_logit_softcapping", [50.0]), ("llama.expert_count", [8, 0]),
              ("llama.attention.sliding_window", [4096, 0]), ("llama.vocab_size", [303, 305, 0]),
              ("tokenizer.ggml.model", ["gpt2", "bert", None]), ("tokenizer.ggml.add_bos_token", [False, 2]),
              ("tokenizer.chat_template", [
                  "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                  "{{ 'a' * 10**9 }}", "{% if %}", "{{ raise_exception('x') }}", "{{ messages[5] }}", None]),
              ("general.architecture", ["gemma3", "qwen2", "mamba", 7])]


def mutate(clean: bytes, slots: list[Slot], padding: list[tuple[int, int]], rng: np.random.Generator,
           path: Path) -> tuple[str, bool]:
    """Write one mutation of `clean` to `path`; returns its description and whether it touched only padding."""
    data = bytearray(clean)
    kind = rng.choice(["bitflip", "bitflip", "padding", "truncate", "field", "field", "field", "text", "rewrite",
                       "rewrite"])
    if kind == "rewrite":
        changes = {}
        for _ in range(int(rng.integers(1, 3))):
            key, values = _REWRITES[int(rng.integers(len(_REWRITES)))]
            changes[key] = values[int(rng.integers(len(values)))]
        drop = tuple(k for k, v in changes.items() if v is None)
        write_tiny_llama(path, {**_CHAT, **{k: v for k, v in changes.items() if v is not None}}, drop=drop)
        return f"rewrite {changes}", False
    if kind == "truncate":
        length = int(rng.integers(len(data)))
        path.write_bytes(bytes(data[:length]))
        return f"truncate to {length}", False
    if kind in ("bitflip", "padding"):
        flips = []
        for _ in range(int(rng.integers(1, 9))):
            if kind == "padding":
                start, stop = padding[int(rng.integers(len(padding)))]
                at = int(rng.integers(start, stop))
            else:
                at = int(rng.integers(len(data)))
            bit = int(rng.integers(8))
            data[at] ^= 1 << bit
            flips.append((at, bit))
        path.write_bytes(bytes(data))
        return f"{kind} flips {flips}", kind == "padding"
    pool = [s for s in slots if (s.kind == "text") == (kind == "text")]
    slot = pool[int(rng.integers(len(pool)))]
    if slot.kind == "text":
        at = slot.offset + int(rng.integers(max(slot.size, 1)))
        data[at] = int(rng.choice([0, 0x80, 0xFF, 0x0A, ord("{"), int(rng.integers(256))]))
        path.write_bytes(bytes(data))
        return f"text byte {at} = {data[at]}", False
    value = _field_value(slot, struct.unpack_from(slot.fmt, data, slot.offset)[0], rng)
    struct.pack_into(slot.fmt, data, slot.offset, value)
    path.write_bytes(bytes(data))
    return f"{slot.kind} at {slot.offset} ({slot.fmt}) = {value!r}", False


def _field_value(slot: Slot, old, rng: np.random.Generator):
    """An extreme, nearby or random value for the field, of its struct format."""
    code = slot.fmt[1]
    if code in "fd":
        return float(rng.choice(_FLOAT_EXTREMES + [float(old) * 2, float(rng.standard_normal()) * 1e6]))
    bits = struct.calcsize(slot.fmt) * 8
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if code in "bhiq" else (0, (1 << bits) - 1)
    candidates = [v for v in _U64_EXTREMES + [-1, lo, hi, old - 1, old + 1, old * 2, old // 2] if lo <= v <= hi]
    if slot.kind == "type":
        candidates += list(range(0, 40))
    if rng.random() < 0.3:
        return int(rng.integers(lo, hi, endpoint=True, dtype=np.int64 if lo < 0 else np.uint64))
    return int(candidates[int(rng.integers(len(candidates)))])


_CHAT = {"tokenizer.chat_template": CHAT_TEMPLATE}


# ---------------------------------------------------------------------------------------------- the run

def run_fuzz(n_cases: int, workdir: Path, seed: int = SEED) -> dict:
    """Run n_cases mutations; returns counts by outcome and error class, the failures and the time taken."""
    clean_path = write_tiny_llama(workdir / "clean.gguf", _CHAT)
    clean = clean_path.read_bytes()
    slots, padding = file_slots(clean_path)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    started = time.monotonic()
    worker = Worker(home, clean_path)
    baseline_text = worker.warm_up_text
    outcomes, errors, failures, new_kernels, padding_same = Counter(), Counter(), [], 0, 0
    try:
        rng = np.random.default_rng(seed)
        case_path = workdir / "case.gguf"
        for case in range(n_cases):
            description, padding_only = mutate(clean, slots, padding, rng, case_path)
            case_started = time.monotonic()
            result = worker.run(case_path)
            result.update(case=case, mutation=description, seconds=round(time.monotonic() - case_started, 2))
            outcomes[result["outcome"]] += 1
            new_kernels += result["new_kernels"]
            if result["outcome"] == "error":
                errors[result["error"]] += 1
            wrong = padding_only and (result["outcome"], result.get("text")) != ("ok", baseline_text)
            padding_same += padding_only and not wrong  # nothing reads padding: the clean file's run is the answer
            if wrong:
                result["message"] = f"padding-only mutation changed the run: {result.get('text')!r} " + \
                    result.get("message", "")
            if result["outcome"] in ("fail", "crash", "hang") or wrong:
                failures.append(result)
                (workdir / f"failure_{case}.gguf").write_bytes(case_path.read_bytes())
            if result["outcome"] in ("crash", "hang"):
                worker.stop()
                worker = Worker(home, clean_path)
    finally:
        worker.stop()
    return {"cases": n_cases, "seed": seed, "outcomes": dict(outcomes), "errors": dict(errors.most_common()),
            "cases_with_new_kernels": new_kernels, "padding_only_cases_with_the_clean_output": padding_same,
            "seconds": round(time.monotonic() - started, 1),
            "failures": failures, "baseline_text": baseline_text}


@pytest.mark.slow
def test_fuzzed_files_end_in_a_clean_error_or_a_correct_run(tmp_path):
    report = run_fuzz(FUZZ_CASES, tmp_path)
    if os.environ.get("EDGEINFER_FUZZ_REPORT"):
        Path(os.environ["EDGEINFER_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1))
    summary = {k: v for k, v in report.items() if k != "failures"}
    print(json.dumps(summary))
    assert not report["failures"], json.dumps(report["failures"][:5], indent=1)
    # both ends were exercised: files that still run and files refused with a reason
    assert report["outcomes"].get("ok", 0) > 0 and report["outcomes"].get("error", 0) > FUZZ_CASES // 4
    assert report["padding_only_cases_with_the_clean_output"] > 0
