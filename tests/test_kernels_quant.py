"""ggml block-format kernels (kernels_cpu.dequant / matvec / matmul) against gguf-py's numpy dequantization."""
import functools

import gguf
import numpy as np
import pytest
from conftest import model_path
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kernels_cpu import _fp16
from kernels_cpu.dequant import dequantize
from kernels_cpu.formats import BLOCK_SIZES, SUPPORTED_TYPES, row_bytes, type_name
from kernels_cpu.matmul import matmul
from kernels_cpu.matvec import matvec
from kernels_cpu.quant_reference import (dequantize_reference, matmul_reference, matvec_reference, quantized_raw,
                                         random_raw)

FORMATS = sorted(SUPPORTED_TYPES)
GGUF_QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16"]
N_ROWS, N_COLS, N_TOKENS = 67, 512, 7  # odd rows, > 1 tile of 64; 2 K-quant blocks; tokens 4 + 3 (micro-kernel tail)


def readonly(a: np.ndarray) -> np.ndarray:
    a = a.view()
    a.flags.writeable = False
    return a


def assert_dequant_close(actual: np.ndarray, expected: np.ndarray):
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * scale)


def assert_products_close(actual: np.ndarray, expected: np.ndarray, bound: np.ndarray):
    """|actual - expected| <= 1e-5 * sum(|w| * |x|) per output; expected and bound in float64."""
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    excess = np.abs(actual.astype(np.float64) - expected) - 1e-5 * bound - 1e-30
    assert excess.max() <= 0, f"worst error exceeds tolerance by {excess.max():.3g}"


def check_all_kernels(ggml_type: int, raw: np.ndarray, n_cols: int, rng: np.random.Generator, n_tokens=N_TOKENS):
    """dequantize / matvec / matmul on raw blocks against the numpy reference."""
    reference = dequantize_reference(ggml_type, raw, n_cols)
    assert_dequant_close(dequantize(ggml_type, raw, n_cols), reference)
    abs_w = np.abs(reference).astype(np.float64)

    x = rng.standard_normal(n_cols).astype(np.float32)
    assert_products_close(matvec(ggml_type, raw, x), matvec_reference(ggml_type, raw, x), abs_w @ np.abs(x))

    xs = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    assert_products_close(matmul(ggml_type, raw, xs), matmul_reference(ggml_type, raw, xs), np.abs(xs) @ abs_w.T)


# ---------------------------------------------------------------- formats table and input checks


def test_block_sizes_match_ggml():
    for ggml_type, sizes in BLOCK_SIZES.items():
        assert GGMLQuantizationType(ggml_type).name == type_name(ggml_type)
        assert GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)] == sizes
    assert row_bytes(GGMLQuantizationType.Q4_K, 512) == 288
    assert row_bytes(GGMLQuantizationType.F16, 3) == 6


def test_unsupported_type_is_named():
    raw = np.zeros((2, 66), np.uint8)
    for call in (lambda: dequantize(16, raw, 256), lambda: matvec(16, raw, np.zeros(256, np.float32)),
                 lambda: matmul(16, raw, np.zeros((2, 256), np.float32))):
        with pytest.raises(ValueError, match="IQ2_XXS"):
            call()


def test_shape_errors_are_clear():
    q4_0 = GGMLQuantizationType.Q4_0
    raw = np.zeros((3, 36), np.uint8)  # 3 rows of 64 elements
    with pytest.raises(ValueError, match="rows of 96 elements take 54 bytes, raw rows have 36"):
        dequantize(q4_0, raw, 96)
    with pytest.raises(ValueError, match="not a positive multiple of 32"):
        dequantize(q4_0, raw, 70)
    with pytest.raises(ValueError, match="rows of 32 elements take 18 bytes"):
        matvec(q4_0, raw, np.zeros(32, np.float32))
    with pytest.raises(ValueError, match="x must be a 1-D"):
        matvec(q4_0, raw, np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match="x must be a 2-D"):
        matmul(q4_0, raw, np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="uint8 array"):
        dequantize(q4_0, raw.astype(np.int8), 64)
    with pytest.raises(ValueError, match=r"out must be a float32 array of shape \(3,\)"):
        matvec(q4_0, raw, np.zeros(64, np.float32), out=np.zeros(4, np.float32))


def test_out_argument_is_filled_and_returned():
    rng = np.random.default_rng(1)
    q8_0 = GGMLQuantizationType.Q8_0
    raw = readonly(random_raw(q8_0, 5, 64, rng))
    out = np.full(5, np.nan, np.float32)
    assert matvec(q8_0, raw, np.ones(64, np.float32), out=out) is out
    assert not np.isnan(out).any()
    out2 = np.full((2, 5), np.nan, np.float32)
    assert matmul(q8_0, raw, np.ones((2, 64), np.float32), out=out2) is out2
    np.testing.assert_allclose(out2[0], out, rtol=1e-6)


# ---------------------------------------------------------------- half -> float


def test_half_conversions_match_numpy():
    """Both half -> float paths (hardware where the target has it, and the portable one), all 65536 bit patterns."""
    bits = np.arange(65536, dtype=np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    finite = ~np.isnan(expected)
    in_kernel = dequantize(GGMLQuantizationType.F16, bits.view(np.uint8).reshape(1, -1), 65536)[0]
    portable = np.array([_fp16.half_bits_to_f32_portable(b) for b in bits.tolist()], dtype=np.float32)
    for out in (in_kernel, portable):
        np.testing.assert_array_equal(out[finite].view(np.uint32), expected[finite].view(np.uint32))
        assert np.isnan(out[~finite]).all()


# ---------------------------------------------------------------- random blocks, every format


@pytest.mark.parametrize("ggml_type", FORMATS, ids=type_name)
def test_random_blocks(ggml_type):
    rng = np.random.default_rng(ggml_type)
    raw = readonly(random_raw(ggml_type, N_ROWS, N_COLS, rng))
    check_all_kernels(ggml_type, raw, N_COLS, rng)


@pytest.mark.parametrize("name", GGUF_QUANTIZABLE)
def test_blocks_quantized_by_gguf(name):
    ggml_type = int(GGMLQuantizationType[name])
    rng = np.random.default_rng(7)
    values = rng.standard_normal((9, 256)).astype(np.float32) * np.linspace(0.01, 3, 9, dtype=np.float32)[:, None]
    raw = readonly(quantized_raw(ggml_type, values))
    check_all_kernels(ggml_type, raw, 256, rng)


def test_single_row_and_single_token():
    rng = np.random.default_rng(3)
    q4_k = GGMLQuantizationType.Q4_K
    check_all_kernels(q4_k, readonly(random_raw(q4_k, 1, 256, rng)), 256, rng, n_tokens=1)


# ---------------------------------------------------------------- real model tensors

# (catalogue model, tensor type): every type in each model. Gemma 3 270M has the same types as Qwen2.5 (Q5_0, Q4_K,
# Q6_K, Q8_0, F32) but gguf.GGUFReader spends ~22 s of CPU parsing its 262k-token vocabulary, so it is left out.
REAL_TENSORS = [
    ("smollm2-135m-instruct", "Q4_1"), ("smollm2-135m-instruct", "Q8_0"), ("smollm2-135m-instruct", "F32"),
    ("qwen2.5-coder-0.5b-instruct", "Q5_0"), ("qwen2.5-coder-0.5b-instruct", "Q4_K"),
    ("qwen2.5-coder-0.5b-instruct", "Q6_K"), ("qwen2.5-coder-0.5b-instruct", "Q8_0"),
    ("qwen2.5-coder-0.5b-instruct", "F32"),
]
MAX_ROWS = 384  # slice of the huge embedding / output tensors


@functools.lru_cache(maxsize=None)
def open_model(model: str) -> gguf.GGUFReader:
    return gguf.GGUFReader(model_path(model))  # slow (seconds: it parses every vocabulary string), so once per model


@pytest.mark.slow
@pytest.mark.parametrize("model,type_name_", REAL_TENSORS, ids=[f"{m}-{t}" for m, t in REAL_TENSORS])
def test_real_tensor(model, type_name_):
    reader = open_model(model)
    wanted = GGMLQuantizationType[type_name_]
    candidates = [t for t in reader.tensors if t.tensor_type == wanted]
    assert candidates, f"{model} has no {type_name_} tensor"
    tensor = max(candidates, key=lambda t: t.n_elements) if wanted == GGMLQuantizationType.F32 else candidates[0]
    n_cols = int(tensor.shape[0])  # GGUF shapes list the row length first
    raw = tensor.data.reshape(-1, tensor.data.shape[-1]) if tensor.data.ndim > 1 else tensor.data.reshape(1, -1)
    raw = raw.view(np.uint8).reshape(raw.shape[0], -1)
    if raw.shape[0] > MAX_ROWS:
        raw = np.concatenate([raw[:MAX_ROWS // 2], raw[-MAX_ROWS // 2:]])
    check_all_kernels(int(wanted), readonly(raw), n_cols, np.random.default_rng(11))
