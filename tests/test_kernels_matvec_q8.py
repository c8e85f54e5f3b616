"""int8-activation kernels (activations_q8, matvec_q8) against their numpy references, on random blocks and on the
tensors of the three catalogue models (slow); the portable instruction path runs in a subprocess.

Tolerances: against the reference (dequantized W @ dequantized int8 x, float64) the error per row is float32 rounding,
<= 1e-4 * sum |w| |x|. Against the float-activation kernels the difference is x's int8 rounding, at most half a step
per element: 0.5 / 127 * max |x| over the block; we allow 1e-2 * sum over blocks of sum |w| * max |x|.
"""
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from kernels_cpu import formats as F
from kernels_cpu import simd
from kernels_cpu.activations_q8 import quantize_activations, quantize_activations_rows, quantized_activations
from kernels_cpu.matvec import matvec
from kernels_cpu.matmul_q8 import matmul_q8
from kernels_cpu.matvec_q8 import GROUP, REPACKED, TYPE_IDS, matvec_q8, repacked_row_bytes
from kernels_cpu.repack import repack
from kernels_cpu.matvec_q8_reference import (dequantize_activations_reference, matvec_q8_error_scale,
                                             matvec_q8_reference, quantize_activations_reference)
from kernels_cpu.quant_reference import dequantize_reference, random_raw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # subprocesses import this checkout
RAW_TYPES = [F.Q4_0, F.Q4_1, F.Q5_0, F.Q5_1, F.Q8_0, F.Q2_K, F.Q3_K, F.Q4_K, F.Q5_K, F.Q6_K, F.F32, F.F16, F.BF16]
REPACKABLE = [F.Q4_0, F.Q4_1, F.Q5_0, F.Q5_1, F.Q8_0, F.Q4_K, F.Q5_K, F.Q6_K]
K_QUANTS = (F.Q2_K, F.Q3_K, F.Q4_K, F.Q5_K, F.Q6_K)


def random_x(n, rng):
    """Activations with a spread of block magnitudes, one all-zero block and one exact tie (2.5 with d = 1)."""
    x = (rng.standard_normal(n) * rng.uniform(0.05, 4.0, n // 32).repeat(32)).astype(np.float32)
    if n >= 96:
        x[32:64] = 0.0
        x[64:96] = np.linspace(-127, 127, 32, dtype=np.float32)
        x[66] = 2.5
    return x


def check_against_references(ggml_type, raw, type_id, weights, x, threads=None):
    """Run matvec_q8 on (type_id, weights) and compare with the references for raw (ggml_type, raw)."""
    xq, xd, xs = quantized_activations(x)
    if threads:
        numba.set_num_threads(threads)
    try:
        y = matvec_q8(type_id, weights, xq, xd, xs)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    scale = matvec_q8_error_scale(ggml_type, raw, xq, xd)
    err = np.abs(y - matvec_q8_reference(ggml_type, raw, xq, xd))
    assert np.all(err <= 1e-4 * scale + 1e-30), f"max error / scale {np.max(err / scale)}"
    w = np.abs(dequantize_reference(ggml_type, raw, x.shape[0]).astype(np.float64))
    block_max = np.abs(x.astype(np.float64)).reshape(-1, 32).max(axis=1).repeat(32)
    bound = 1e-2 * (w @ block_max) + 1e-6 * np.abs(w) @ np.abs(x.astype(np.float64))
    assert np.all(np.abs(y - matvec(ggml_type, raw, x)) <= bound)
    return y


# ---------------------------------------------------------------- activations


def test_quantize_activations_matches_reference():
    rng = np.random.default_rng(0)
    x = random_x(2048, rng)
    xq, xd, xs = quantized_activations(x)
    rq, rd, rs = quantize_activations_reference(x)
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_array_equal(xd, rd)
    np.testing.assert_array_equal(xs, rs)
    assert xq[66] == 3 and xd[1] == 0 and np.all(xq[32:64] == 0)  # halves away from zero; zero block: d = 0
    assert np.all(np.abs(dequantize_activations_reference(xq, xd) - x) <= 0.5 * np.repeat(xd, 32) * (1 + 1e-6))


def test_quantize_activations_in_place_and_rows():
    rng = np.random.default_rng(1)
    x = random_x(7 * 576, rng).reshape(7, 576)
    xq, xd, xs = np.empty((7, 576), np.int8), np.empty((7, 18), np.float32), np.empty((7, 18), np.int32)
    quantize_activations_rows(x, xq, xd, xs)
    for t in range(7):
        q, d, s = np.empty(576, np.int8), np.empty(18, np.float32), np.empty(18, np.int32)
        quantize_activations(x[t], q, d, s)
        np.testing.assert_array_equal(xq[t], q)
        np.testing.assert_array_equal(xd[t], d)
        np.testing.assert_array_equal(xs[t], s)
    with pytest.raises(ValueError):
        quantized_activations(np.ones(100, np.float32))


# ---------------------------------------------------------------- random blocks


@pytest.mark.parametrize("ggml_type", RAW_TYPES, ids=F.type_name)
@pytest.mark.parametrize("n_rows", [1, 6, 37])
def test_raw_layout_random_blocks(ggml_type, n_rows):
    rng = np.random.default_rng(ggml_type * 100 + n_rows)
    n = 512 if ggml_type in K_QUANTS else 576
    raw = random_raw(ggml_type, n_rows, n, rng)
    check_against_references(ggml_type, raw, ggml_type, raw, random_x(n, rng))


@pytest.mark.parametrize("ggml_type", REPACKABLE, ids=F.type_name)
@pytest.mark.parametrize("n_rows,n", [(16, 256), (48, 768), (32, 2048)])
def test_repacked_layout_random_blocks(ggml_type, n_rows, n):
    rng = np.random.default_rng(ggml_type * 1000 + n)
    raw = random_raw(ggml_type, n_rows, n, rng)
    type_id, packed = repack(ggml_type, raw)
    assert type_id == REPACKED + ggml_type and type_id in TYPE_IDS
    assert packed.shape == (n_rows // GROUP, repacked_row_bytes(ggml_type, n)) and not packed.flags.writeable
    check_against_references(ggml_type, raw, type_id, packed, random_x(n, rng))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ggml_type", [F.Q4_1, F.Q8_0, F.Q5_0, F.Q4_K, F.Q6_K], ids=F.type_name)
def test_threads_give_the_same_result(ggml_type, threads):
    rng = np.random.default_rng(5)
    raw = random_raw(ggml_type, 64, 512, rng)
    x = random_x(512, rng)
    expected = check_against_references(ggml_type, raw, ggml_type, raw, x)
    np.testing.assert_array_equal(check_against_references(ggml_type, raw, ggml_type, raw, x, threads), expected)
    type_id, packed = repack(ggml_type, raw)
    check_against_references(ggml_type, raw, type_id, packed, x, threads)


def check_matmul_is_matvec_per_token(type_id, weights, x_rows):
    """matmul_q8 (prefill tiles) must give each token exactly matvec_q8's result (decode), so a prompt's logits
    do not depend on how it was split between prefill and decode."""
    y = matmul_q8(type_id, weights, x_rows)
    for t, x in enumerate(x_rows):
        xq, xd, xs = quantized_activations(x)
        assert np.array_equal(y[t], matvec_q8(type_id, weights, xq, xd, xs)), f"token {t}"


@pytest.mark.parametrize("ggml_type", RAW_TYPES)
# tiles of 4 (the last with 3 tokens or 4), then a tile of 2 for 1 or 2 left; of 8 (Q8_0 on AVX-512), then those
@pytest.mark.parametrize("n_tokens", [1, 2, 3, 6, 7, 8, 9, 13, 15, 21])
def test_matmul_tiles_random_blocks(ggml_type, n_tokens):
    rng = np.random.default_rng(ggml_type * 10 + n_tokens)
    n = 512
    raw = random_raw(ggml_type, 48, n, rng)
    x_rows = np.stack([random_x(n, rng) for _ in range(n_tokens)])
    check_matmul_is_matvec_per_token(ggml_type, raw, x_rows)
    type_id, packed = repack(ggml_type, raw)
    if type_id != ggml_type:
        check_matmul_is_matvec_per_token(type_id, packed, x_rows)


def test_repack_keeps_raw_where_it_has_no_layout():
    rng = np.random.default_rng(2)
    raw = random_raw(F.Q4_1, 20, 64, rng)  # 20 rows: not whole groups of 16
    assert repack(F.Q4_1, raw)[1] is raw
    raw = random_raw(F.Q3_K, 16, 256, rng)  # no repacked Q3_K
    assert repack(F.Q3_K, raw) == (F.Q3_K, raw)


def test_bad_inputs_raise():
    rng = np.random.default_rng(3)
    raw = random_raw(F.Q8_0, 16, 64, rng)
    xq, xd, xs = quantized_activations(random_x(64, rng))
    with pytest.raises(ValueError):
        matvec_q8(F.Q8_0, raw, xq[:32], xd, xs)  # length mismatch
    with pytest.raises(ValueError):
        matvec_q8(F.Q8_0, raw, xq, xd.astype(np.float64), xs)
    with pytest.raises(ValueError):
        matvec_q8(REPACKED + F.Q8_0, raw, xq, xd, xs)  # raw blocks given as repacked
    with pytest.raises(ValueError):
        matvec_q8(F.Q8_0, raw, xq, xd, xs, out=np.empty(3, np.float32))


# ---------------------------------------------------------------- other instruction paths


def other_paths():
    return [p for p in simd.available_paths() if p != simd.PATH and p in ("portable", "avx2")]


@pytest.mark.slow
@pytest.mark.parametrize("path", other_paths())
def test_other_instruction_paths(path):
    """The random-block tests in a subprocess with EDGEINFER_KERNELS=path (its own Numba cache: the first run compiles
    every kernel for that path, about a minute)."""
    env = dict(os.environ, EDGEINFER_KERNELS=path, PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", __file__, "-k",
               "random_blocks or threads or quantize"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_forced_path_is_used():
    code = "from kernels_cpu import simd; print(simd.PATH)"
    env = dict(os.environ, EDGEINFER_KERNELS="portable", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "portable", out.stderr[-2000:]


# ---------------------------------------------------------------- real models


def model_tensors(name):
    """One tensor per (type, shape) of a catalogue model, at most 2048 rows of it."""
    from conftest import model_path
    from edgeinfer.gguf_reader import GGUFFile

    seen = {}
    for tensor_name, t in GGUFFile(model_path(name)).tensors.items():
        if len(t.shape) == 2 and (t.ggml_type, t.shape) not in seen:
            seen[(t.ggml_type, t.shape)] = (tensor_name, t)
    return [(tensor_name, t.ggml_type, t.raw[:2048]) for tensor_name, t in seen.values()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_real_model_tensors(name):
    rng = np.random.default_rng(4)
    for tensor_name, ggml_type, raw in model_tensors(name):
        n = raw.shape[1] // F.BLOCK_SIZES[ggml_type][1] * F.BLOCK_SIZES[ggml_type][0]
        x = random_x(n, rng)
        check_against_references(ggml_type, raw, ggml_type, raw, x)
        type_id, packed = repack(ggml_type, raw)
        if type_id != ggml_type:
            check_against_references(ggml_type, raw, type_id, packed, x)
            check_matmul_is_matvec_per_token(type_id, packed, np.stack([x, random_x(n, rng), x[::-1].copy()]))
