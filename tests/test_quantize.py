"""The quantize kernels: bit-identical to gguf-py (F16, BF16, legacy blocks) or to the numpy re-derivation of ggml's
reference search (K-quants), and the inverse of our dequantizer within each format's error."""
import numpy as np
import pytest

from kernels_cpu import formats as F
from kernels_cpu.dequant import dequantize
from kernels_cpu.quantize import QUANTIZABLE_TYPES, nearest_int, quantize
from kernels_cpu.quantize_reference import GGUF_QUANTIZED, quantize_reference

rng = np.random.default_rng(0)
K_QUANTS = (F.Q4_K, F.Q5_K, F.Q6_K)


def weights(kind: str, n_rows: int, n_cols: int) -> np.ndarray:
    """Test matrices shaped like real weights, and a few that stress the searches."""
    if kind == "normal":
        x = rng.standard_normal((n_rows, n_cols)) * 0.02
    elif kind == "heavy":  # outliers, as in real attention / FFN weights
        x = rng.standard_t(2, (n_rows, n_cols)) * 0.02
    elif kind == "offset":  # all of one sign: exercises the mins of Q4_1 / Q5_1 / K-quants
        x = np.abs(rng.standard_normal((n_rows, n_cols))) + 0.5
    elif kind == "sparse":  # mostly zeros with a few values (what pruning leaves)
        x = rng.standard_normal((n_rows, n_cols)) * (rng.random((n_rows, n_cols)) < 0.15) + 1e-6
    elif kind == "levels":  # values that already sit on a grid: ties in every rounding
        x = rng.integers(-8, 8, (n_rows, n_cols)) * 0.25
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


KINDS = ("normal", "heavy", "offset", "sparse", "levels")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ggml_type", GGUF_QUANTIZED, ids=F.type_name)
def test_bit_identical_to_gguf_py(ggml_type, kind):
    x = weights(kind, 48, 512)
    np.testing.assert_array_equal(quantize(ggml_type, x), quantize_reference(ggml_type, x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ggml_type", K_QUANTS, ids=F.type_name)
def test_k_quants_bit_identical_to_reference_search(ggml_type, kind):
    x = weights(kind, 40, 768)
    np.testing.assert_array_equal(quantize(ggml_type, x), quantize_reference(ggml_type, x))


@pytest.mark.parametrize("ggml_type", sorted(QUANTIZABLE_TYPES - {F.F32}), ids=F.type_name)
def test_all_zero_and_constant_blocks(ggml_type):
    """Degenerate blocks dequantize exactly. (For all-zero blocks ggml's C writes d = -0.0 where gguf-py writes
    +0.0 for Q4_0 / Q5_0; we follow C, so these are compared after dequantization, not byte by byte.)"""
    x = np.zeros((4, 256), dtype=np.float32)
    x[1] = 0.25
    x[2] = -0.5
    x[3, :128] = 1.0
    y = dequantize(ggml_type, quantize(ggml_type, x), 256)
    expected = dequantize(ggml_type, quantize_reference(ggml_type, x), 256)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(y[0], 0)


# relative RMS error of normal weights after quantize -> dequantize: about what each format's bits allow
RMS_BOUND = {F.F16: 5e-4, F.BF16: 3e-3, F.Q8_0: 0.007, F.Q6_K: 0.022, F.Q5_0: 0.05, F.Q5_1: 0.045, F.Q5_K: 0.045,
             F.Q4_0: 0.1, F.Q4_1: 0.09, F.Q4_K: 0.08}
# largest error of one weight as a fraction of its block's absmax: half a step (a whole one where a symmetric format
# clamps the far end: Q4_0, Q5_0) plus the rounding of the half-precision scales (2**-10); measured for the K-quants,
# whose sub-block scales are themselves quantized, with a 20% margin
MAX_ERR_BOUND = {F.F16: 2 ** -11, F.BF16: 2 ** -8, F.Q8_0: 0.5 / 127 + 2 ** -10, F.Q4_0: 1 / 8 + 2 ** -10,
                 F.Q4_1: 1 / 15 + 2 ** -10, F.Q5_0: 1 / 16 + 2 ** -10, F.Q5_1: 1 / 31 + 2 ** -10,
                 F.Q4_K: 0.068 * 1.2, F.Q5_K: 0.047 * 1.2, F.Q6_K: 0.0162 * 1.2}


@pytest.mark.parametrize("kind", ("normal", "heavy"))
@pytest.mark.parametrize("ggml_type", sorted(RMS_BOUND), ids=F.type_name)
def test_inverse_of_dequantize_within_format_error(ggml_type, kind):
    x = weights(kind, 64, 1024)
    y = dequantize(ggml_type, quantize(ggml_type, x), 1024)
    if kind == "normal":
        assert np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)) < RMS_BOUND[ggml_type]
    elements = 32 if ggml_type in (F.F16, F.BF16) else F.BLOCK_SIZES[ggml_type][0]
    block_absmax = np.abs(x).reshape(64, -1, elements).max(axis=2, keepdims=True)
    assert np.all(np.abs(y - x).reshape(64, -1, elements) <= block_absmax * MAX_ERR_BOUND[ggml_type])


def test_quantize_shapes_and_errors():
    x = weights("normal", 3, 64)
    assert quantize(F.Q8_0, x).shape == (3, 68)
    assert quantize(F.F32, x).view(np.float32).tolist() == x.tolist()
    assert quantize(F.Q4_K, np.zeros((0, 256), np.float32)).shape == (0, 144)
    with pytest.raises(ValueError, match="not a positive multiple of 256"):
        quantize(F.Q4_K, x)
    with pytest.raises(ValueError, match="no quantizer for Q3_K"):
        quantize(F.Q3_K, weights("normal", 1, 256))
    with pytest.raises(ValueError, match="2-D"):
        quantize(F.Q8_0, x[0])


def test_half_conversion_matches_numpy_over_all_exponents():
    bits = rng.integers(0, 2 ** 32, size=400_000, dtype=np.uint64).astype(np.uint32)
    specials = np.array([0x00000000, 0x80000000, 0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001, 0x387FFFFF,
                         0x38800000, 0x7F800000, 0xFF800000, 0x3F800000 + 0x1000, 0x3F800000 + 0x3000],
                        dtype=np.uint32)
    values = np.concatenate([bits, specials]).view(np.float32)
    values = values[~np.isnan(values)].reshape(1, -1)[:, : (values.size // 32) * 32]
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).view(np.uint8)
    np.testing.assert_array_equal(quantize(F.F16, values), expected)


def test_nearest_int_rounds_half_to_even():
    for value, expected in [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (3.49, 3), (-4194303.0, -4194303)]:
        assert nearest_int(np.float32(value)) == expected
