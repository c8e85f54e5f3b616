"""ggml block formats: type ids, block geometry and input checks shared by the dequantize / matvec / matmul kernels.

Type ids are ggml's (the values of gguf.constants.GGMLQuantizationType); they are spelled out here so the kernels do
not import the GGUF package. A quantized 2-D weight is a uint8 array (n_rows, row_bytes) of raw ggml blocks.
"""
import numpy as np

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
BF16 = 30

QK = 32  # elements per block of the legacy formats (Q4_0 ... Q8_0)
QK_K = 256  # elements per super-block of the K-quants

# ggml_type -> (elements per block, bytes per block); the byte layouts are described in dequant.py
BLOCK_SIZES = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q8_0: (QK, 2 + 32),  # d, 32 x int8
    Q4_0: (QK, 2 + 16),  # d, 32 x 4 bits
    Q4_1: (QK, 2 + 2 + 16),  # d, m, 32 x 4 bits
    Q5_0: (QK, 2 + 4 + 16),  # d, 32 high bits, 32 x 4 low bits
    Q5_1: (QK, 2 + 2 + 4 + 16),  # d, m, 32 high bits, 32 x 4 low bits
    Q2_K: (QK_K, 16 + 64 + 2 + 2),  # scales, 256 x 2 bits, d, dmin
    Q3_K: (QK_K, 32 + 64 + 12 + 2),  # hmask, 256 x 2 low bits, 16 x 6-bit scales, d
    Q4_K: (QK_K, 2 + 2 + 12 + 128),  # d, dmin, 8 x (6-bit scale, 6-bit min), 256 x 4 bits
    Q5_K: (QK_K, 2 + 2 + 12 + 32 + 128),  # d, dmin, scales/mins, 256 high bits, 256 x 4 low bits
    Q6_K: (QK_K, 128 + 64 + 16 + 2),  # 256 x 4 low bits, 256 x 2 high bits, 16 x int8 scales, d
}
SUPPORTED_TYPES = frozenset(BLOCK_SIZES)

# names of all ggml types, supported or not (for error messages)
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}
TYPE_NAMES = {t: GGML_TYPE_NAMES[t] for t in sorted(BLOCK_SIZES)}  # the supported ones


def type_name(ggml_type: int) -> str:
    """Readable name of a ggml type id, e.g. 'Q4_K', or 'ggml type 99' for an id ggml does not define."""
    return GGML_TYPE_NAMES.get(int(ggml_type), f"ggml type {int(ggml_type)}")


def _check_type(ggml_type: int) -> int:
    ggml_type = int(ggml_type)
    if ggml_type not in BLOCK_SIZES:
        supported = ", ".join(TYPE_NAMES.values())
        raise ValueError(f"unsupported tensor type {type_name(ggml_type)} (id {ggml_type}); supported: {supported}")
    return ggml_type


def row_bytes(ggml_type: int, n_cols: int) -> int:
    """Bytes of one row of n_cols elements; n_cols must be a multiple of the type's block size."""
    elements, nbytes = BLOCK_SIZES[_check_type(ggml_type)]
    if n_cols <= 0 or n_cols % elements:
        raise ValueError(f"{type_name(ggml_type)}: row length {n_cols} is not a positive multiple of {elements}")
    return n_cols // elements * nbytes


def check_raw(ggml_type: int, raw: np.ndarray, n_cols: int) -> np.ndarray:
    """Validate raw ggml blocks of a 2-D weight and return them as a read-only view (one Numba specialization)."""
    ggml_type = _check_type(ggml_type)
    expected = row_bytes(ggml_type, n_cols)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
        what = f"{raw.dtype}{list(raw.shape)}" if isinstance(raw, np.ndarray) else type(raw).__name__
        raise ValueError(f"{type_name(ggml_type)}: raw blocks must be a uint8 array (n_rows, row_bytes), got {what}")
    if raw.shape[1] != expected:
        raise ValueError(
            f"{type_name(ggml_type)}: rows of {n_cols} elements take {expected} bytes, raw rows have {raw.shape[1]}"
        )
    if raw.flags.writeable:
        raw = raw.view()
        raw.flags.writeable = False
    return raw


def check_out(out: np.ndarray | None, shape: tuple) -> np.ndarray:
    """A float32 C-contiguous output array of the given shape: `out` itself if it fits, else a new one."""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape:
        raise ValueError(f"out must be a float32 array of shape {shape}, got {getattr(out, 'dtype', type(out))}"
                         f"{list(getattr(out, 'shape', ()))}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    return out


def check_x(x: np.ndarray, ndim: int) -> np.ndarray:
    """x as a read-only C-contiguous float32 array of `ndim` dimensions (one Numba specialization per kernel)."""
    if not isinstance(x, np.ndarray) or x.ndim != ndim:
        what = f"{x.ndim}-D" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"x must be a {ndim}-D float32 array, got {what}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.flags.writeable:
        x = x.view()
        x.flags.writeable = False
    return x
