"""Repacking raw ggml blocks into the 16-row interleaved layouts the fast matvec and matmul kernels read.

The layouts themselves (bytes per block, where quants, scales and minimums lie) are described next to the kernels
that read them, in matvec_q8.py; this module only converts, once per model (edgeinfer.backends.cpu_repack caches
the result).
"""
import numpy as np
from numba import njit, prange

from kernels_cpu.dequant import scale_min_k4, u32_at
from kernels_cpu.formats import BLOCK_SIZES, Q2_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, QK
from kernels_cpu.kernel_thread import call_parallel
from kernels_cpu.matvec_q8 import repacked_row_bytes
from kernels_cpu.q8_layouts import GROUP, REPACKED, block_layout


@njit(cache=True)
def _block_quants(ggml_type, row, j, q):
    """q[0:32] = the stored (unsigned, offset included; Q8_0: int8 bits) quants of 32-element block j of a raw row."""
    if ggml_type == Q8_0:
        for l in range(32):
            q[l] = row[34 * j + 2 + l]
    elif ggml_type == Q4_0 or ggml_type == Q4_1 or ggml_type == Q5_0 or ggml_type == Q5_1:
        size, first, bits = block_layout(ggml_type)[0], 2 if ggml_type == Q4_0 or ggml_type == Q5_0 else 4, -1
        if ggml_type == Q5_0 or ggml_type == Q5_1:  # 32 5th bits before the nibbles
            bits = u32_at(row, size * j + first)
            first += 4
        for l in range(16):
            byte = row[size * j + first + l]
            q[l], q[l + 16] = byte & 15, byte >> 4
        if bits >= 0:
            for l in range(32):
                q[l] |= ((bits >> l) & 1) << 4
    elif ggml_type == Q4_K or ggml_type == Q5_K:
        o, sub = (144 if ggml_type == Q4_K else 176) * (j // 8), j % 8
        quants = o + (16 if ggml_type == Q4_K else 48) + 32 * (sub // 2)
        for l in range(32):
            q[l] = (row[quants + l] >> (4 * (sub % 2))) & 15
            if ggml_type == Q5_K:
                q[l] |= ((row[o + 16 + l] >> sub) & 1) << 4
    else:  # Q6_K
        o, half, s = 210 * (j // 8), (j % 8) // 4, j % 4
        for l in range(32):
            low = (row[o + 64 * half + 32 * (s & 1) + l] >> (4 * (s >> 1))) & 15
            q[l] = low | (((row[o + 128 + 32 * half + l] >> (2 * s)) & 3) << 4)


@njit(cache=True)
def _repack_group(ggml_type, raw, out, g, n_blocks):
    """out = group g of the 16-row layout of raw ggml blocks (rows of n_blocks 32-element blocks)."""
    q = np.empty((GROUP, 32), np.uint8)
    for j in range(n_blocks):
        if ggml_type < Q2_K:  # legacy: blocks one after the other
            o, quants = j * block_layout(REPACKED + ggml_type)[0], block_layout(REPACKED + ggml_type)[1]
        elif ggml_type == Q6_K:  # d of the super-block first
            o, quants = 3360 * (j // 8) + 32 + 416 * (j % 8), 384
        else:
            block = block_layout(REPACKED + ggml_type)[0]
            o, quants = (64 + 8 * block) * (j // 8) + 64 + block * (j % 8), block - 32
        for r in range(GROUP):
            _block_quants(ggml_type, raw[GROUP * g + r], j, q[r])
        if ggml_type == Q8_0:
            for k in range(512):  # step t = k // 64, byte k % 64: row (k % 64) // 4, element 4t + k % 4
                out[o + k] = q[(k % 64) // 4, 4 * (k // 64) + k % 4]
        else:
            for k in range(256):  # chunk i = k // 64: step 2i in the low nibbles, 2i + 1 in the high
                r, e = (k % 64) // 4, 8 * (k // 64) + k % 4
                out[o + k] = (q[r, e] & 15) | ((q[r, e + 4] & 15) << 4)
        if ggml_type == Q5_0 or ggml_type == Q5_1 or ggml_type == Q5_K:  # bit k of step t's 8 bytes: byte k
            for i in range(64):
                t, bits = i // 8, 0
                for b in range(8):
                    k = 8 * (i % 8) + b
                    bits |= ((q[k // 4, 4 * t + k % 4] >> 4) & 1) << b
                out[o + 256 + i] = bits
        if ggml_type == Q6_K:
            for k in range(128):  # chunk c = k // 64: bits 2f = high bits of step 4c + f
                r, crumbs = (k % 64) // 4, 0
                for f in range(4):
                    crumbs |= ((q[r, 4 * (4 * (k // 64) + f) + k % 4] >> 4) & 3) << (2 * f)
                out[o + 256 + k] = crumbs
        for r in range(GROUP):
            row = raw[GROUP * g + r]
            if ggml_type < Q2_K:
                size = block_layout(ggml_type)[0]
                out[o + quants + 2 * r], out[o + quants + 2 * r + 1] = row[size * j], row[size * j + 1]
                if ggml_type == Q4_1 or ggml_type == Q5_1:
                    out[o + quants + 32 + 2 * r], out[o + quants + 33 + 2 * r] = row[size * j + 2], row[size * j + 3]
            elif ggml_type == Q6_K:
                top = 210 * (j // 8)
                out[o + quants + r] = row[top + 192 + 2 * (j % 8)]
                out[o + quants + 16 + r] = row[top + 193 + 2 * (j % 8)]
                if j % 8 == 0:
                    out[o - 32 + 2 * r], out[o - 31 + 2 * r] = row[top + 208], row[top + 209]
            else:
                top = (144 if ggml_type == Q4_K else 176) * (j // 8)
                scale, minimum = scale_min_k4(row, top + 4, j % 8)
                out[o + quants + r], out[o + quants + 16 + r] = scale, minimum
                if j % 8 == 0:
                    for i in range(2):
                        out[o - 64 + 2 * r + i], out[o - 32 + 2 * r + i] = row[top + i], row[top + 2 + i]


@njit(cache=True, parallel=True)
def _repack16_parallel(ggml_type, raw, packed, n_blocks):
    for g in prange(packed.shape[0]):
        _repack_group(ggml_type, raw, packed[g], g, n_blocks)


def repack(ggml_type: int, raw: np.ndarray) -> tuple:
    """(type id, array) of the fastest layout for matvec_q8: the 16-row interleaved one, type id REPACKED +
    ggml_type, a new read-only uint8 array (n_rows // 16, row_bytes) of the raw size, if this type and shape have
    one (n_rows a multiple of 16); else (ggml_type, raw) unchanged. Done once when a model loads (about 1 GB/s per
    thread); raw: ggml blocks uint8[n_rows, row_bytes]."""
    ggml_type = int(ggml_type)
    n_rows, row_bytes = raw.shape
    elements, block_bytes = BLOCK_SIZES[ggml_type]
    packed_bytes = repacked_row_bytes(ggml_type, row_bytes // block_bytes * elements)
    if not packed_bytes or n_rows % GROUP:
        return ggml_type, raw
    packed = np.empty((n_rows // GROUP, packed_bytes), np.uint8)
    raw = np.ascontiguousarray(raw).view()
    raw.flags.writeable = False  # one specialization for file views and arrays
    # (one parallel kernel only: a serial twin for small tensors would save milliseconds and cost 5 s of compiling)
    call_parallel(_repack16_parallel, ggml_type, raw, packed, row_bytes // block_bytes * elements // QK)
    packed.flags.writeable = False  # as raw views are: one Numba specialization for both
    return REPACKED + ggml_type, packed
