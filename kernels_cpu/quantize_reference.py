"""Plain-numpy references for the quantize kernels (kernels_cpu/quantize.py), for tests only.

F16, BF16 and the legacy block formats come from gguf-py's `gguf.quants` (an independent numpy implementation of
ggml's reference quantizers), imported lazily. The K-quants (Q4_K, Q5_K, Q6_K) are a numpy re-derivation of ggml's
reference search, vectorized across sub-blocks instead of looping over them: every elementwise step is float32 in
C's order, and the per-sub-block sums are accumulated element by element (numpy's pairwise `sum` would round
differently), so the kernels can be compared bit for bit.
"""
import numpy as np

from kernels_cpu.formats import BF16, F16, F32, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, QK_K

f32 = np.float32
GGUF_QUANTIZED = (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)


def quantize_reference(ggml_type: int, x: np.ndarray) -> np.ndarray:
    """uint8[n_rows, row_bytes] of float32 x[n_rows, n_cols] quantized by the reference implementations."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_rows = x.shape[0]
    if ggml_type == F32:
        return x.view(np.uint8).reshape(n_rows, -1).copy()
    if ggml_type in GGUF_QUANTIZED:
        from gguf.quants import quantize as gguf_quantize

        return np.ascontiguousarray(gguf_quantize(x, ggml_type)).view(np.uint8).reshape(n_rows, -1)
    blocks = x.reshape(-1, QK_K)
    if ggml_type in (Q4_K, Q5_K):
        out = _q4_k_q5_k(blocks, 15 if ggml_type == Q4_K else 31)
    elif ggml_type == Q6_K:
        out = _q6_k(blocks)
    else:
        raise ValueError(f"no reference quantizer for ggml type {ggml_type}")
    return out.reshape(n_rows, -1)


def _rint(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (round half to even) for the magnitudes that occur here."""
    return np.rint(v).astype(np.int64)


def _half(v: np.ndarray) -> np.ndarray:
    """float32 values rounded through IEEE half, as stored (the float32 back and the 2 little-endian bytes)."""
    h = np.asarray(v, dtype=np.float32).astype(np.float16)
    return h.astype(np.float32), h.view(np.uint8).reshape(*h.shape, 2)


def _running_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis, left to right in float32 (C's `for (...) s += t`)."""
    acc = np.zeros(terms.shape[:-1], dtype=np.float32)
    for i in range(terms.shape[-1]):
        acc += terms[..., i]
    return acc


def _qkx2(x, w, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants for every row of x (m, n) at once: levels (m, n), scale (m,), -min (m,)."""
    lo = np.minimum(x.min(axis=1), f32(0))
    hi = x.max(axis=1)
    sum_w = _running_sum(w)
    sum_x = _running_sum(w * x)
    flat = hi == lo
    span = np.where(flat, f32(1), hi - lo)
    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    levels = np.clip(_rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    diff = scale[:, None] * levels.astype(f32) + lo[:, None] - x
    best = _running_sum(w * (diff * diff))
    for step in range(nstep + 1):  # C divides by max - min with min the best fit so far
        span = np.where(flat, f32(1), hi - lo)
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        aux = np.clip(_rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        wl = w * aux.astype(f32)
        sum_l, sum_l2, sum_xl = _running_sum(wl), _running_sum(wl * aux.astype(f32)), _running_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive, f32(0), this_min)
        diff = this_scale[:, None] * aux.astype(f32) + this_min[:, None] - x
        err = _running_sum(w * (diff * diff))
        better = (det > 0) & (err < best) & ~flat
        levels[better], best[better] = aux[better], err[better]
        scale, lo = np.where(better, this_scale, scale), np.where(better, this_min, lo)
    levels[flat], scale[flat] = 0, 0
    return levels, scale, -lo


def _q4_k_q5_k(blocks: np.ndarray, nmax: int) -> np.ndarray:
    nb = blocks.shape[0]
    sub = blocks.reshape(nb * 8, 32)
    av_x = np.sqrt(_running_sum(sub * sub) / f32(32))
    weights = av_x[:, None] + np.abs(sub)
    rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
    levels, scales, mins = _qkx2(sub, weights, nmax, rmin, rdelta, nstep)
    levels, scales, mins = levels.reshape(nb, 256), scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = np.maximum(scales.max(axis=1), 0), np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.minimum(63, _rint(inv_scale[:, None] * scales) & 0xFF)
    lm = np.minimum(63, _rint(inv_min[:, None] * mins) & 0xFF)
    d, d_bytes = _half(max_scale / f32(63))
    dmin, dmin_bytes = _half(max_min / f32(63))
    packed = np.zeros((nb, 12), dtype=np.int64)  # 6-bit scales and mins: low 4 sub-blocks whole, high 4 split
    packed[:, 0:4], packed[:, 4:8] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    dl = d[:, None] * ls.astype(f32)
    dm = dmin[:, None] * lm.astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint((blocks.reshape(nb, 8, 32) + dm[:, :, None]) / dl[:, :, None]), 0, nmax)
    levels = np.where((dl != 0)[:, :, None], requant, levels.reshape(nb, 8, 32)).reshape(nb, 4, 2, 32)
    low = (levels[:, :, 0] & 0xF) | ((levels[:, :, 1] & 0xF) << 4)  # (nb, 4, 32): sub-blocks 2k and 2k + 1
    parts = [d_bytes, dmin_bytes, packed.astype(np.uint8)]
    if nmax == 31:
        bits = (levels >> 4).transpose(0, 3, 1, 2).reshape(nb, 32, 8)  # bit j of qh[lane] = 5th bit in sub-block j
        parts.append((bits << np.arange(8)).sum(axis=2).astype(np.uint8))
    parts.append(low.reshape(nb, 128).astype(np.uint8))
    return np.concatenate(parts, axis=1)


def _qx_rmse1(x: np.ndarray, nmax: int):
    """make_qx_quants(rmse_type=1, no weights) for every row of x (m, n): levels (m, n) in [0, 2 nmax), scale (m,)."""
    m = x.shape[0]
    mx = x[np.arange(m), np.abs(x).argmax(axis=1)]
    zero = np.abs(mx) < f32(1e-15)
    mx_safe = np.where(zero, f32(1), mx)
    w = x * x

    def try_scale(iscale):
        lv = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        return lv, _running_sum(w * x * lv.astype(f32)), _running_sum(w * lv.astype(f32) * lv.astype(f32))

    lv, sumlx, suml2 = try_scale(-f32(nmax) / mx_safe)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s != 0]:
        cand, sumlx, suml2 = try_scale(-(f32(nmax) + f32(0.1) * f32(step)) / mx_safe)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = sumlx / suml2
        lv[take], scale = cand[take], np.where(take, new_scale, scale)
        best = np.where(take, scale * sumlx, best)
    lv[zero] = -nmax
    scale = np.where(zero, f32(0), scale)
    return lv + nmax, scale


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    levels, scales = _qx_rmse1(blocks.reshape(nb * 16, 16), 32)
    levels, scales = levels.reshape(nb, 16, 16), scales.reshape(nb, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), pick]
    empty = np.abs(max_scale) < f32(1e-15)
    with np.errstate(divide="ignore"):
        iscale = f32(-128) / np.where(empty, f32(1), max_scale)
        d, d_bytes = _half(f32(1) / iscale)
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
    dl = d[:, None] * sc.astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint(blocks.reshape(nb, 16, 16) / dl[:, :, None]), -32, 31) + 32
    levels = np.where((dl != 0)[:, :, None], requant, levels).reshape(nb, 2, 4, 32)  # (half, quarter, lane)
    ql = np.concatenate([(levels[:, :, 0] & 0xF) | ((levels[:, :, 2] & 0xF) << 4),
                         (levels[:, :, 1] & 0xF) | ((levels[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((levels >> 4) << (2 * np.arange(4))[None, None, :, None]).sum(axis=2).reshape(nb, 64)
    out = np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.view(np.uint8), d_bytes], axis=1)
    out[empty] = 0
    return out
