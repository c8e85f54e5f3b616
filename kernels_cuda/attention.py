"""The device KV cache's stores and attention over it, for any batch of (sequence, position) rows.

The cache arrays have the host KVCache's shape (n_layers, n_seq, n_kv_heads, n_ctx, dim), as device arrays:
  f32   values float32;  f16 values float16 (the device's own half type);  scales a (1, 1, 1, 1, 1) stand-in
  q8_0  values int8 and scales float32 (..., dim / 32): ggml's block_q8_0 (d = max|x| / 127 rounded to a half,
        q = roundf(x / d)), as kernels_cpu.kv_types stores it
Row i of a batch (sequence seqs[i], position positions[i]) stores its K and V first (store_kv), then attends to its
own sequence's positions j <= positions[i] (and p - j < window on a sliding-window layer): rows of one sequence see
each other causally, rows of others never.

attention_kernel: one block per (row, group of query heads); blockDim.x key lanes split the row's visible keys
(lane l takes keys lo + l, lo + l + lanes, ...), each keeping its own online softmax (running maximum, normalizer,
weighted sum of values), merged once at the end through shared memory (flash-decoding inside a block: a constant
number of barriers whatever the context). Scores are float32 of the query scaled first (as the CPU), optionally
soft-capped (Gemma 2), the normalizer float64. A row's result does not depend on the other rows of its batch.
Not yet: keys shared by the query heads of a GQA group (each head reads them), key tiles in shared memory.
"""
from __future__ import annotations

import math

from numba import cuda, float32, float64, int32
from numba.core.types import float16

from kernels_cuda.launch import ATTENTION_SHARED, MAX_BLOCK_THREADS, MAX_HEAD_DIM, Geometry, blocks
from kernels_cuda.linear import round_away

QK = 32  # values per q8_0 block


@cuda.jit
def store_kv_float_kernel(src, col0, n_heads, dim, layer, seqs, positions, values):
    """values[layer, seqs[t], h, positions[t], c] = src[t, col0 + h * dim + c] (cast to values' float type)."""
    for k in range(cuda.grid(1), src.shape[0] * n_heads * dim, cuda.gridsize(1)):
        t, h, c = k // (n_heads * dim), (k // dim) % n_heads, k % dim
        values[layer, seqs[t], h, positions[t], c] = src[t, col0 + h * dim + c]


@cuda.jit
def store_kv_q8_0_kernel(src, col0, n_heads, dim, layer, seqs, positions, values, scales):
    """q8_0 of each 32 values of a head's row: one thread per (token, head, block)."""
    n_blocks = dim // QK
    for k in range(cuda.grid(1), src.shape[0] * n_heads * n_blocks, cuda.gridsize(1)):
        _store_q8_0_block(src, col0, dim, layer, seqs, positions, values, scales, k // (n_heads * n_blocks),
                          (k // n_blocks) % n_heads, k % n_blocks)


@cuda.jit(device=True, inline=True)
def _store_q8_0_block(src, col0, dim, layer, seqs, positions, values, scales, t, h, b):
    start = col0 + h * dim + b * QK
    amax = float32(0.0)
    for c in range(QK):
        amax = max(amax, abs(src[t, start + c]))
    d = amax / float32(127.0)
    inverse = float32(1.0) / d if d > 0 else float32(0.0)
    s, p = seqs[t], positions[t]
    for c in range(QK):
        values[layer, s, h, p, b * QK + c] = int32(round_away(src[t, start + c] * inverse))
    scales[layer, s, h, p, b] = float32(float16(d))  # rounded to a half, as ggml stores it


@cuda.jit(device=True, inline=True)
def _cached(values, scales, layer, seq, head, pos, c, quantized):
    if quantized:
        return float32(values[layer, seq, head, pos, c]) * scales[layer, seq, head, pos, c // QK]
    return float32(values[layer, seq, head, pos, c])


@cuda.jit
def attention_kernel(qkv, n_heads, n_kv_heads, head_dim, value_dim, positions, seqs, k_values, k_scales,
                     v_values, v_scales, quantized, layer, scale, softcap, window, out):
    """out[t, h * value_dim: ...] = softmax over visible keys of (scale * q_h . k_j) applied to v_j, for the row t
    = blockIdx.x and the query heads blockIdx.y * blockDim.y + threadIdx.y; q_h at qkv[t, h * head_dim: ...]."""
    lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
    t = cuda.blockIdx.x
    slot = cuda.threadIdx.y
    h = cuda.blockIdx.y * cuda.blockDim.y + slot
    active = h < n_heads
    kv = (h if active else 0) // (n_heads // n_kv_heads)
    seq, p = seqs[t], positions[t]
    lo = max(p - window + 1, 0) if window > 0 else 0
    query = cuda.local.array(MAX_HEAD_DIM, float32)
    acc = cuda.local.array(MAX_HEAD_DIM, float32)
    best = -math.inf
    total = float64(0.0)
    for c in range(value_dim):
        acc[c] = float32(0.0)
    if active:
        for c in range(head_dim):
            query[c] = qkv[t, h * head_dim + c] * float32(scale)
        for j in range(lo + lane, p + 1, lanes):
            s = float32(0.0)
            for c in range(head_dim):
                s += query[c] * _cached(k_values, k_scales, layer, seq, kv, j, c, quantized)
            if softcap > 0:
                s = float32(softcap) * math.tanh(s * float32(1.0 / softcap))
            if s > best:  # a new maximum: rescale what was summed under the old one
                correction = math.exp(best - s) if best > -math.inf else 0.0
                total *= correction
                for c in range(value_dim):
                    acc[c] *= float32(correction)
                best = s
            w = float32(math.exp(s - best))
            total += w
            for c in range(value_dim):
                acc[c] += w * _cached(v_values, v_scales, layer, seq, kv, j, c, quantized)
    # merge the lanes' partial softmaxes: lane l's sums rescaled by exp(m_l - max m)
    maxima = cuda.shared.array(MAX_BLOCK_THREADS, float32)
    totals = cuda.shared.array(MAX_BLOCK_THREADS, float64)
    sums = cuda.shared.array(ATTENTION_SHARED, float32)
    me = slot * lanes + lane
    maxima[me] = best
    totals[me] = total
    for c in range(value_dim):
        sums[me * value_dim + c] = acc[c]
    cuda.syncthreads()
    if not active:
        return
    first = slot * lanes
    top = -math.inf
    for other in range(lanes):
        top = max(top, maxima[first + other])
    norm = float64(0.0)
    for other in range(lanes):
        if maxima[first + other] > -math.inf:
            norm += totals[first + other] * math.exp(maxima[first + other] - top)
    inverse = 1.0 / norm
    for c in range(lane, value_dim, lanes):
        v = float32(0.0)
        for other in range(lanes):
            m = maxima[first + other]
            if m > -math.inf:
                v += sums[(first + other) * value_dim + c] * float32(math.exp(m - top))
        out[t, h * value_dim + c] = v * float32(inverse)


# ------------------------------------------------------------------------------------------ launches (host side)


def store_kv(src, col0: int, n_heads: int, dim: int, layer: int, seqs, positions, pair, geometry: Geometry) -> None:
    """Store each row's heads (src columns col0 ...) into the cache pair (values, scales) at its (seq, position)."""
    values, scales = pair
    n = src.shape[0]
    if values.dtype.name == "int8":
        store_kv_q8_0_kernel[blocks(n * n_heads * (dim // QK), geometry.threads, geometry), geometry.threads](
            src, col0, n_heads, dim, layer, seqs, positions, values, scales)
    else:
        store_kv_float_kernel[blocks(n * n_heads * dim, geometry.threads, geometry), geometry.threads](
            src, col0, n_heads, dim, layer, seqs, positions, values)


def attention_heads_per_block(geometry: Geometry, n_heads: int, value_dim: int) -> int:
    """Query heads one block holds: the geometry's, fewer where their lanes' partial sums would not fit."""
    fit = ATTENTION_SHARED // (geometry.key_lanes * value_dim)
    if fit < 1:
        raise ValueError(f"value heads of {value_dim} do not fit {geometry.key_lanes} key lanes' shared memory")
    return max(1, min(geometry.heads, n_heads, fit))


def attention(qkv, n_heads: int, n_kv_heads: int, head_dim: int, value_dim: int, positions, seqs, k_pair, v_pair,
              layer: int, scale: float, softcap: float, window: int, out, geometry: Geometry) -> None:
    """out (n, n_heads * value_dim) = attention of the batch's queries (qkv's first n_heads * head_dim columns)."""
    if head_dim > MAX_HEAD_DIM or value_dim > MAX_HEAD_DIM:
        raise ValueError(f"heads longer than {MAX_HEAD_DIM} are not supported by the attention kernel")
    per_block = attention_heads_per_block(geometry, n_heads, value_dim)
    grid = (qkv.shape[0], blocks(n_heads, per_block))
    quantized = k_pair[0].dtype.name == "int8"
    attention_kernel[grid, (geometry.key_lanes, per_block)](
        qkv, n_heads, n_kv_heads, head_dim, value_dim, positions, seqs, k_pair[0], k_pair[1], v_pair[0], v_pair[1],
        quantized, layer, float32(scale), float32(softcap), window, out)
