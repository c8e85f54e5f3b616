"""Element-wise and per-row kernels of the decoder's forward pass, as kernels_cpu computes them.

Activations are float32 device arrays (n_tokens, width). Q, K and V lie side by side in one (n, q|k|v) buffer and
gate and up in one (n, 2 d_ff) buffer, so kernels take a column start where they work on part of a row:
- rms_norm: x / sqrt(mean(x^2) + eps) * weight (float64 mean, as the CPU), over a whole row, each head of a
  projection, or one projection; lanes share a row through a shared-memory tree, as the linear kernels;
- rope: RoPE of heads lying one after another (Q's then K's) with a per-layer frequency table the host computes
  (DecoderConfig.layer_rope_freqs: scaling and per-pair factors folded in), normal or NeoX pairs, float64 angles;
- gated: SiLU(gate) * up or GELU-tanh(gate) * up into the gate half;
- add_vector (biases), add_scaled (residual add with a scale), embed (rows of the device layout, times a scale),
  gather_rows, finish_logits (Granite's logit scale, the final soft-cap).
"""
from __future__ import annotations

import math

from numba import cuda, float32, float64

from kernels_cuda.launch import MAX_BLOCK_THREADS, Geometry, blocks

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@cuda.jit
def rms_norm_kernel(x, col0, n_sub, width, weight, eps, out):
    """Row i = (token i // n_sub, part i % n_sub) is x[t, col0 + s * width: ... + width], normed into the same
    columns of out (which may be x). weight (width,) float32; an empty weight means none."""
    lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
    n_rows = x.shape[0] * n_sub
    partial = cuda.shared.array(MAX_BLOCK_THREADS, float64)
    slot = cuda.threadIdx.y * lanes + lane
    has_weight = weight.shape[0] > 0
    # rounds of blockDim.y rows, the same count for every thread of a block (the reduction's barriers)
    for first in range(cuda.blockIdx.x * cuda.blockDim.y, n_rows, cuda.gridDim.x * cuda.blockDim.y):
        i = first + cuda.threadIdx.y
        t, base = i // n_sub, col0 + (i % n_sub) * width
        acc = float64(0.0)
        if i < n_rows:
            for j in range(lane, width, lanes):
                v = float64(x[t, base + j])
                acc += v * v
        if lanes > 1:  # (one lane per row, the simulator's geometry, needs no sum and no barrier)
            partial[slot] = acc
            cuda.syncthreads()
            stride = lanes // 2
            while stride > 0:
                if lane < stride:
                    partial[slot] += partial[slot + stride]
                cuda.syncthreads()
                stride //= 2
            acc = partial[cuda.threadIdx.y * lanes]
        if i < n_rows:
            scale = float32(1.0 / math.sqrt(acc / width + eps))
            for j in range(lane, width, lanes):
                v = x[t, base + j] * scale
                out[t, base + j] = v * weight[j] if has_weight else v
        if lanes > 1:
            cuda.syncthreads()  # before the next round overwrites the partial sums


@cuda.jit
def rope_kernel(buf, n_heads, head_dim, positions, freqs, neox):
    """Rotate the first 2 * len(freqs) dims of heads 0..n_heads-1 of buf (n, >= n_heads * head_dim): pair i by the
    angle positions[t] * freqs[i]; pairs (2i, 2i+1), or (i, i + half) when neox. One (token, head, pair) a step."""
    half = freqs.shape[0]
    for k in range(cuda.grid(1), buf.shape[0] * n_heads * half, cuda.gridsize(1)):
        t, h, i = k // (n_heads * half), (k // half) % n_heads, k % half
        angle = float64(positions[t]) * freqs[i]
        c, s = math.cos(angle), math.sin(angle)
        base = h * head_dim
        a_col, b_col = (base + i, base + i + half) if neox else (base + 2 * i, base + 2 * i + 1)
        a, b = float64(buf[t, a_col]), float64(buf[t, b_col])
        buf[t, a_col] = a * c - b * s
        buf[t, b_col] = a * s + b * c


@cuda.jit
def gated_kernel(gate_up, d_ff, gelu):
    """gate_up (n, 2 d_ff): the first d_ff columns become act(gate) * up, act GELU-tanh if gelu else SiLU."""
    half, one = float32(0.5), float32(1.0)
    for k in range(cuda.grid(1), gate_up.shape[0] * d_ff, cuda.gridsize(1)):
        t, j = k // d_ff, k % d_ff
        g, u = gate_up[t, j], gate_up[t, d_ff + j]
        if gelu:
            inner = float32(_SQRT_2_OVER_PI) * (g + float32(0.044715) * g * g * g)
            gate_up[t, j] = half * g * (one + math.tanh(inner)) * u
        else:
            gate_up[t, j] = g * (half + half * math.tanh(half * g)) * u


@cuda.jit
def add_vector_kernel(x, vector):
    """x[t, j] += vector[j] for j < len(vector)."""
    width = vector.shape[0]
    for k in range(cuda.grid(1), x.shape[0] * width, cuda.gridsize(1)):
        x[k // width, k % width] += vector[k % width]


@cuda.jit
def add_scaled_kernel(x, y, scale):
    """x += y * scale (scale 1: y exactly)."""
    width = x.shape[1]
    for k in range(cuda.grid(1), x.shape[0] * width, cuda.gridsize(1)):
        t, j = k // width, k % width
        x[t, j] += y[t, j] if scale == 1.0 else y[t, j] * scale


@cuda.jit
def embed_quantized_kernel(q, scale, offset, group, tokens, factor, x):
    """x[t] = row tokens[t] of a quantized layout (scale * q + offset), times factor unless it is 1."""
    width = x.shape[1]
    for k in range(cuda.grid(1), x.shape[0] * width, cuda.gridsize(1)):
        t, j = k // width, k % width
        r = tokens[t]
        v = scale[r, j // group] * float32(q[r, j]) + offset[r, j // group]
        x[t, j] = v if factor == 1.0 else v * factor


@cuda.jit
def embed_float_kernel(values, tokens, factor, x):
    width = x.shape[1]
    for k in range(cuda.grid(1), x.shape[0] * width, cuda.gridsize(1)):
        t, j = k // width, k % width
        v = float32(values[tokens[t], j])
        x[t, j] = v if factor == 1.0 else v * factor


@cuda.jit
def gather_rows_kernel(x, rows, out):
    """out[r] = x[rows[r]]."""
    width = x.shape[1]
    for k in range(cuda.grid(1), out.shape[0] * width, cuda.gridsize(1)):
        out[k // width, k % width] = x[rows[k // width], k % width]


@cuda.jit
def finish_logits_kernel(logits, inverse_scale, cap):
    """logits *= inverse_scale (unless 1), then cap * tanh(logits / cap) where cap > 0."""
    width = logits.shape[1]
    for k in range(cuda.grid(1), logits.shape[0] * width, cuda.gridsize(1)):
        t, j = k // width, k % width
        v = logits[t, j]
        if inverse_scale != 1.0:
            v *= inverse_scale
        if cap != 0.0:
            v = math.tanh(v / cap) * cap
        logits[t, j] = v


# ------------------------------------------------------------------------------------------ launches (host side)


def _flat(n: int, geometry: Geometry):
    return blocks(n, geometry.threads, geometry), geometry.threads


def rms_norm(x, weight, eps: float, geometry: Geometry, out=None, col0: int = 0, n_sub: int = 1,
             width: int | None = None) -> None:
    """RMSNorm of x's rows (or of n_sub parts of `width` columns from col0 of each row), into out (default x)."""
    width = x.shape[1] if width is None else width
    n_rows = x.shape[0] * n_sub
    rms_norm_kernel[blocks(n_rows, geometry.rows, geometry), (geometry.lanes, geometry.rows)](
        x, col0, n_sub, width, weight, float32(eps), x if out is None else out)


def rope(buf, n_heads: int, head_dim: int, positions, freqs, neox: bool, geometry: Geometry) -> None:
    rope_kernel[_flat(buf.shape[0] * n_heads * freqs.shape[0], geometry)](buf, n_heads, head_dim, positions, freqs,
                                                                          neox)


def gated(gate_up, d_ff: int, gelu: bool, geometry: Geometry) -> None:
    gated_kernel[_flat(gate_up.shape[0] * d_ff, geometry)](gate_up, d_ff, gelu)


def add_vector(x, vector, geometry: Geometry) -> None:
    add_vector_kernel[_flat(x.shape[0] * vector.shape[0], geometry)](x, vector)


def add_scaled(x, y, scale: float, geometry: Geometry) -> None:
    add_scaled_kernel[_flat(x.shape[0] * x.shape[1], geometry)](x, y, float32(scale))


def embed(matrix, tokens, factor: float, x, geometry: Geometry) -> None:
    """x (n, d) = the rows `tokens` of a DeviceMatrix, times factor (a float32 product, as llama.cpp)."""
    grid = _flat(x.shape[0] * x.shape[1], geometry)
    if matrix.group:
        embed_quantized_kernel[grid](matrix.q, matrix.scale, matrix.offset, matrix.group, tokens, float32(factor), x)
    else:
        embed_float_kernel[grid](matrix.values, tokens, float32(factor), x)


def gather_rows(x, rows, out, geometry: Geometry) -> None:
    gather_rows_kernel[_flat(out.shape[0] * x.shape[1], geometry)](x, rows, out)


def finish_logits(logits, logit_scale: float, cap: float, geometry: Geometry) -> None:
    """Granite's 1 / logit_scale and the final soft-cap, where the model has them (nothing is launched else)."""
    if logit_scale != 1.0 or cap != 0.0:
        finish_logits_kernel[_flat(logits.shape[0] * logits.shape[1], geometry)](
            logits, float32(1.0 / logit_scale), float32(cap))
