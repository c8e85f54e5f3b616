"""y = x @ W.T on the device with int8 activations, for a tile of tokens x output rows.

x is first quantized per 32 values as the CPU's int8 path does it (kernels_cpu.activations_q8: d = max|x| / 127,
q = roundf(x * (1 / d)), halves away from zero), into xq int8 (n, width), xd float32 (n, width / 32) and the sums
xs int32 (n, width / 16) of xq over each 16 (groups are 16 or 32 wide).
A quantized weight (kernels_cuda.layout: q int8, scale and offset float32 per group) then contributes per group g
  scale[g] * xd * dot(q, xq) + offset[g] * xd * sum(xq)   (the sum from xs)
with the dot in int32 by dp4a (four int8 products a step: kernels_cuda.dot4) and the sum in int32; a float weight
(F16, F32) a float dot with x = xd * xq, as the CPU's float kernels take it (summed per block of 32, then scaled).
Threads: blockDim.x lanes share a row (lane l takes groups l, l + lanes, ...; a shared-memory tree adds their partial
sums), blockDim.y rows per block, and blockIdx.y picks a tile of TOKEN_TILE tokens, whose activations each loaded
weight serves. Launch through `linear` with a kernels_cuda.launch Geometry.
"""
from __future__ import annotations

import math

import numpy as np

from numba import cuda, float32, int32

from kernels_cuda.dot4 import dot4
from kernels_cuda.launch import MAX_BLOCK_THREADS, TOKEN_TILE, Geometry, blocks

QK = 32  # activations per quantization block
# partial sums of a block's lanes (a shared array's size must be one constant: a product of two is an expression,
# which the simulator runs and CUDA refuses to compile; tools.cuda_compile_check catches such things)
PARTIAL_SUMS = MAX_BLOCK_THREADS * TOKEN_TILE


@cuda.jit(device=True, inline=True)
def round_away(v):
    """roundf(v): the nearest integer, halves away from zero (exact: the fraction of |v| is computed exactly)."""
    a = abs(v)
    whole = math.floor(a)
    r = whole + 1 if a - whole >= 0.5 else whole
    return -r if v < 0 else r


@cuda.jit
def quantize_rows(x, xq, xd, xs):
    """x float32 (n, width) -> xq int8 (n, width), xd float32 (n, width / 32) and xs int32 (n, width / 16), the sums
    of xq over each 16 (the x side of a group's offset); one thread per block of 32."""
    n_blocks = xd.shape[1]
    for i in range(cuda.grid(1), x.shape[0] * n_blocks, cuda.gridsize(1)):
        _quantize_block(x, xq, xd, xs, i // n_blocks, i % n_blocks)


@cuda.jit(device=True, inline=True)
def _quantize_block(x, xq, xd, xs, t, b):
    amax = float32(0.0)
    for c in range(QK * b, QK * b + QK):
        amax = max(amax, abs(x[t, c]))
    d = amax / float32(127.0)
    inverse = float32(1.0) / d if d > 0 else float32(0.0)
    for half in range(2):
        total = int32(0)
        for c in range(QK * b + 16 * half, QK * b + 16 * half + 16):
            v = int32(round_away(x[t, c] * inverse))
            xq[t, c] = v
            total += v
        xs[t, 2 * b + half] = total
    xd[t, b] = d


@cuda.jit(device=True, inline=True)
def _reduce_and_store(acc, n_tokens, t0, row, n_rows, out):
    """Add the lanes' acc (TOKEN_TILE partial sums each) in shared memory; lane 0 writes out[t0 + k, row]."""
    partial = cuda.shared.array(PARTIAL_SUMS, float32)
    lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
    if lanes == 1:  # one thread per row (the simulator's geometry): nothing to add up, no barrier
        if row < n_rows:
            for k in range(n_tokens):
                out[t0 + k, row] = acc[k]
        return
    base = (cuda.threadIdx.y * lanes + lane) * TOKEN_TILE
    for k in range(TOKEN_TILE):
        partial[base + k] = acc[k]
    cuda.syncthreads()
    stride = lanes // 2
    while stride > 0:
        if lane < stride:
            for k in range(TOKEN_TILE):
                partial[base + k] += partial[base + stride * TOKEN_TILE + k]
        cuda.syncthreads()
        stride //= 2
    if lane == 0 and row < n_rows:
        for k in range(n_tokens):
            out[t0 + k, row] = partial[base + k]
    cuda.syncthreads()  # before a next round of rows overwrites the partial sums


@cuda.jit
def linear_quantized(q4, scale, offset, group, xq4, xd, xs, out):
    """out[t, r] = sum_c (scale[r, c // group] * q[r, c] + offset[r, c // group]) * xd[t, c // 32] * xq[t, c],
    with q and xq given as int32 views (q4, xq4: four int8 values each), dotted four at a time by dp4a."""
    t0 = cuda.blockIdx.y * TOKEN_TILE
    n_tokens = min(TOKEN_TILE, xq4.shape[0] - t0)
    acc = cuda.local.array(TOKEN_TILE, float32)
    dots = cuda.local.array(TOKEN_TILE, int32)
    first = cuda.blockIdx.x * cuda.blockDim.y
    # rounds of blockDim.y rows, the same count for every thread of a block (the reduction's barriers)
    for base in range(first, q4.shape[0], cuda.gridDim.x * cuda.blockDim.y):
        row = base + cuda.threadIdx.y
        for k in range(TOKEN_TILE):
            acc[k] = float32(0.0)
        if row < q4.shape[0]:
            for g in range(cuda.threadIdx.x, scale.shape[1], cuda.blockDim.x):
                c0 = g * group
                for k in range(n_tokens):
                    dots[k] = 0
                for c4 in range(c0 // 4, (c0 + group) // 4):
                    w4 = q4[row, c4]  # four weights, loaded once for the whole tile of tokens
                    for k in range(n_tokens):
                        dots[k] = dot4(w4, xq4[t0 + k, c4], dots[k])
                w_scale, w_offset = scale[row, g], offset[row, g]
                for k in range(n_tokens):
                    t = t0 + k
                    total = xs[t, c0 // 16]
                    if group == 32:
                        total += xs[t, c0 // 16 + 1]
                    d = xd[t, c0 // QK]
                    acc[k] += w_scale * d * float32(dots[k]) + w_offset * d * float32(total)
        _reduce_and_store(acc, n_tokens, t0, row, q4.shape[0], out)


@cuda.jit
def linear_float(w, xq, xd, out):
    """out[t, r] = sum over blocks b of xd[t, b] * sum_c w[r, c] * xq[t, c], w float16 or float32."""
    t0 = cuda.blockIdx.y * TOKEN_TILE
    n_tokens = min(TOKEN_TILE, xq.shape[0] - t0)
    acc = cuda.local.array(TOKEN_TILE, float32)
    sums = cuda.local.array(TOKEN_TILE, float32)
    first = cuda.blockIdx.x * cuda.blockDim.y
    # rounds of blockDim.y rows, the same count for every thread of a block (the reduction's barriers)
    for base in range(first, w.shape[0], cuda.gridDim.x * cuda.blockDim.y):
        row = base + cuda.threadIdx.y
        for k in range(TOKEN_TILE):
            acc[k] = float32(0.0)
        if row < w.shape[0]:
            for b in range(cuda.threadIdx.x, xd.shape[1], cuda.blockDim.x):
                for k in range(n_tokens):
                    sums[k] = float32(0.0)
                for c in range(QK * b, QK * b + QK):
                    wc = float32(w[row, c])  # loaded once for the whole tile of tokens
                    for k in range(n_tokens):
                        sums[k] += wc * float32(xq[t0 + k, c])
                for k in range(n_tokens):
                    acc[k] += sums[k] * xd[t0 + k, b]
        _reduce_and_store(acc, n_tokens, t0, row, w.shape[0], out)


def quantize(x, xq, xd, xs, geometry: Geometry) -> None:
    """Launch quantize_rows over x (n, width) device arrays."""
    n = x.shape[0] * xd.shape[1]
    quantize_rows[blocks(n, geometry.threads, geometry), geometry.threads](x, xq, xd, xs)


def linear(matrix, xq, xd, xs, out, geometry: Geometry) -> None:
    """out (n, n_rows) = x @ W.T for a kernels_cuda DeviceMatrix, x given quantized (xq, xd, xs: n rows; xq
    C-contiguous, so that it can be read as int32s)."""
    grid = (blocks(matrix.n_rows, geometry.rows, geometry), blocks(xq.shape[0], TOKEN_TILE))
    block = (geometry.lanes, geometry.rows)
    if matrix.group:
        linear_quantized[grid, block](matrix.q4, matrix.scale, matrix.offset, matrix.group, xq.view(np.int32), xd,
                                      xs, out)
    else:
        linear_float[grid, block](matrix.values, xq, xd, out)


class DeviceMatrix:
    """A matrix of the device layout (kernels_cuda.layout) uploaded: q, scale, offset (or values) device arrays."""

    def __init__(self, host):
        self.ggml_type, self.n_rows, self.n_cols, self.group = host.ggml_type, host.n_rows, host.n_cols, host.group
        if host.group:
            self.q, self.scale, self.offset = (cuda.to_device(a) for a in (host.q, host.scale, host.offset))
            self.q4 = self.q.view(np.int32)  # the same bytes, four values an element: what dp4a takes
            self.values = None
        else:
            self.values = cuda.to_device(host.values)
            self.q = self.q4 = self.scale = self.offset = None
        self.nbytes = host.nbytes


__all__ = ["DeviceMatrix", "linear", "quantize", "quantize_rows", "linear_quantized", "linear_float", "round_away"]
