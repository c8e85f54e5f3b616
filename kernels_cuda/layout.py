"""The device weight layout: every ggml type decoded on the host, once, into one exact generic form.

A quantized matrix (n_rows, n_cols) becomes three contiguous arrays:
  q      int8    (n_rows, n_cols)           the integer values, offsets folded in (Q4_0: q - 8, Q6_K: q - 32, ...)
  scale  float32 (n_rows, n_cols / group)   one per group of `group` consecutive columns
  offset float32 (n_rows, n_cols / group)
with w = scale * q + offset exactly (float32 product, then sum, as kernels_cpu.dequant computes it): Q4_1/Q5_1 keep
their minimum m as the offset, the K-quants' d * sc and -(dmin * m) per sub-block become scale and offset. Groups are
the type's (sub-)blocks: 16 for Q2_K, Q3_K, Q6_K, 32 for the rest. Values and scales lie apart so a warp reading one
row's groups reads contiguous bytes (as llama.cpp's ggml-cuda separates them).
Float matrices stay float: F16 as float16, F32 and BF16 as float32 (both exact).

The cost: 1 byte per value plus 8 per group, where a 4-bit type needs about 0.56. Packing 4-bit types two to a byte
(and 5/6-bit ones into nibbles plus high bits) is a later step, once a real GPU says what the reads cost.
Plain numpy: nothing here touches numba.cuda.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels_cpu.formats import (BF16, BLOCK_SIZES, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K,
                                 Q8_0, check_raw, type_name)

__all__ = ["HostLayout", "host_layout", "reconstruct", "GROUPS"]

# columns per (scale, offset) group of each quantized type: its sub-block
GROUPS = {Q8_0: 32, Q4_0: 32, Q4_1: 32, Q5_0: 32, Q5_1: 32, Q4_K: 32, Q5_K: 32, Q2_K: 16, Q3_K: 16, Q6_K: 16}
FLOAT_TYPES = (F32, F16, BF16)


@dataclass(frozen=True)
class HostLayout:
    """One matrix in the device layout, still on the host: quantized (q, scale, offset, group) or float (values)."""

    ggml_type: int
    n_rows: int
    n_cols: int
    q: np.ndarray | None = None  # int8 (n_rows, n_cols)
    scale: np.ndarray | None = None  # float32 (n_rows, n_cols // group)
    offset: np.ndarray | None = None
    group: int = 0  # 0: a float matrix
    values: np.ndarray | None = None  # float16 or float32 (n_rows, n_cols)

    @property
    def nbytes(self) -> int:
        parts = (self.q, self.scale, self.offset) if self.group else (self.values,)
        return sum(a.nbytes for a in parts)


def host_layout(ggml_type: int, raw: np.ndarray, n_cols: int) -> HostLayout:
    """raw ggml blocks uint8 (n_rows, row_bytes) of any supported type -> the device layout (host arrays)."""
    raw = check_raw(ggml_type, raw, n_cols)
    ggml_type, n_rows = int(ggml_type), raw.shape[0]
    if ggml_type in FLOAT_TYPES:
        return HostLayout(ggml_type, n_rows, n_cols, values=_float_values(ggml_type, raw, n_cols))
    if ggml_type not in _DECODERS:
        raise ValueError(f"{type_name(ggml_type)}: no device layout")
    elements, nbytes = BLOCK_SIZES[ggml_type]
    blocks = np.ascontiguousarray(raw).reshape(n_rows, n_cols // elements, nbytes)
    q, scale, offset = _DECODERS[ggml_type](blocks)
    group = GROUPS[ggml_type]
    return HostLayout(ggml_type, n_rows, n_cols, q=np.ascontiguousarray(q.reshape(n_rows, n_cols), dtype=np.int8),
                      scale=np.ascontiguousarray(scale.reshape(n_rows, n_cols // group), dtype=np.float32),
                      offset=np.ascontiguousarray(offset.reshape(n_rows, n_cols // group), dtype=np.float32),
                      group=group)


def reconstruct(layout: HostLayout) -> np.ndarray:
    """float32 (n_rows, n_cols): what the layout holds, w = scale * q + offset (for tests)."""
    if not layout.group:
        return layout.values.astype(np.float32)
    shape = (layout.n_rows, layout.n_cols // layout.group, layout.group)
    q = layout.q.reshape(shape).astype(np.float32)
    w = layout.scale[..., None] * q + layout.offset[..., None]  # float32 product, then float32 sum
    return w.reshape(layout.n_rows, layout.n_cols)


# -------------------------------------------------------------------------------------------------- decoders
# Each takes blocks uint8 (n_rows, n_blocks, block_bytes) and returns (q, scale, offset) shaped so that q reshapes to
# (n_rows, n_cols) and scale/offset to (n_rows, n_cols // group), element order as in kernels_cpu.dequant.


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The IEEE half at byte `at` of every block, as float32 (n_rows, n_blocks)."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _u32(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., at:at + 4]).view("<u4")[..., 0].astype(np.int64)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: low nibbles first, then high (the legacy formats' order)."""
    qs = qs.astype(np.int16)
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _fifth_bits(blocks: np.ndarray, at: int) -> np.ndarray:
    """Q5_0/Q5_1's uint32 of 5th bits at byte `at`: bit e of it, times 16, for e < 32."""
    qh = _u32(blocks, at)
    return (((qh[..., None] >> np.arange(32)) & 1) << 4).astype(np.int16)


def _zeros_like(d: np.ndarray) -> np.ndarray:
    return np.zeros_like(d)


def _q8_0(b):
    d = _half(b, 0)
    return b[..., 2:34].view(np.int8), d, _zeros_like(d)


def _q4_0(b):
    d = _half(b, 0)
    return _nibbles(b[..., 2:18]) - 8, d, _zeros_like(d)


def _q4_1(b):
    return _nibbles(b[..., 4:20]), _half(b, 0), _half(b, 2)


def _q5_0(b):
    d = _half(b, 0)
    return (_nibbles(b[..., 6:22]) | _fifth_bits(b, 2)) - 16, d, _zeros_like(d)


def _q5_1(b):
    return _nibbles(b[..., 8:24]) | _fifth_bits(b, 4), _half(b, 0), _half(b, 2)


def _k_quant_positions():
    """For element e = 128 half + 32 s + l of a 256-element super-block: (half, s, l) as arrays of 256."""
    e = np.arange(256)
    return e // 128, (e // 32) % 4, e % 32


_HALF, _SHIFT, _LANE = _k_quant_positions()


def _q2_k(b):
    d, dmin = _half(b, 80), _half(b, 82)
    sc = b[..., 0:16].astype(np.int64)  # per 16 elements: low nibble scale, high nibble minimum
    q = (b[..., 16 + 32 * _HALF + _LANE].astype(np.int16) >> (2 * _SHIFT)) & 3
    scale = d[..., None] * (sc & 0xF).astype(np.float32)
    offset = -(dmin[..., None] * (sc >> 4).astype(np.float32))
    return q, scale, offset


def _q3_k_scales(b):
    """The 16 signed 6-bit scales of every Q3_K block (n_rows, n_blocks, 16), as kernels_cpu.dequant.q3_k_scale."""
    sc = b[..., 96:108].astype(np.int64)
    j = np.arange(16)
    low = np.where(j < 8, sc[..., j % 8] & 0xF, sc[..., j % 8] >> 4)
    high = (sc[..., 8 + (j & 3)] >> (2 * (j >> 2))) & 3
    return (low | (high << 4)) - 32


def _q3_k(b):
    d = _half(b, 108)
    low = (b[..., 32 + 32 * _HALF + _LANE].astype(np.int16) >> (2 * _SHIFT)) & 3
    high = (b[..., _LANE].astype(np.int16) >> (4 * _HALF + _SHIFT)) & 1
    scale = d[..., None] * _q3_k_scales(b).astype(np.float32)
    return low - 4 + 4 * high, scale, np.zeros_like(scale)


def _scale_min_k4(b):
    """(scales, minimums) (n_rows, n_blocks, 8) of Q4_K/Q5_K, as kernels_cpu.dequant.scale_min_k4."""
    s = b[..., 4:16].astype(np.int64)
    scales = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return scales, mins


_SUB, _SUB_LANE = np.arange(256) // 32, np.arange(256) % 32  # Q4_K/Q5_K: sub-block j of 32, lane l


def _k4_scales(b):
    d, dmin = _half(b, 0), _half(b, 2)
    sc, mn = _scale_min_k4(b)
    return d[..., None] * sc.astype(np.float32), -(dmin[..., None] * mn.astype(np.float32))


def _q4_k(b):
    q = (b[..., 16 + 32 * (_SUB // 2) + _SUB_LANE].astype(np.int16) >> (4 * (_SUB % 2))) & 0xF
    return (q, *_k4_scales(b))


def _q5_k(b):
    low = (b[..., 48 + 32 * (_SUB // 2) + _SUB_LANE].astype(np.int16) >> (4 * (_SUB % 2))) & 0xF
    high = ((b[..., 16 + _SUB_LANE].astype(np.int16) >> _SUB) & 1) << 4
    return (low | high, *_k4_scales(b))


def _q6_k(b):
    d = _half(b, 208)
    lo = (b[..., 64 * _HALF + 32 * (_SHIFT & 1) + _LANE].astype(np.int16) >> (4 * (_SHIFT >> 1))) & 0xF
    hi = (b[..., 128 + 32 * _HALF + _LANE].astype(np.int16) >> (2 * _SHIFT)) & 3
    scale = d[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
    return (lo | (hi << 4)) - 32, scale, np.zeros_like(scale)


_DECODERS = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q2_K: _q2_k, Q3_K: _q3_k, Q4_K: _q4_k,
             Q5_K: _q5_k, Q6_K: _q6_k}


def _float_values(ggml_type: int, raw: np.ndarray, n_cols: int) -> np.ndarray:
    if ggml_type == F16:
        return np.ascontiguousarray(raw).view(np.float16).reshape(raw.shape[0], n_cols).copy()
    if ggml_type == F32:
        return np.ascontiguousarray(raw).view(np.float32).reshape(raw.shape[0], n_cols).copy()
    bits = np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16  # BF16: the upper half of a float32
    return bits.view(np.float32).reshape(raw.shape[0], n_cols)
