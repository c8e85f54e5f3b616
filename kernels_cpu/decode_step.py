"""One compiled call per generated token: the whole decoder step for any variant of the pre-norm decoder family.

Python-level orchestration costs a few microseconds per call, and a decode step of a 30-layer model is ~400 kernel
calls; inside one Numba function they cost nothing. The step knows nothing of GGUF: weights arrive as one uint8
buffer (the memory-mapped file) plus tables of where each matrix lies and how it is encoded; the small float
vectors (norms, biases) as one padded float32 table. Layouts of the tables are built by `edgeinfer.engine`.

Matrix table rows: byte offset, type id (a ggml type, or a repacked layout's id: matvec_q8), n_rows, n_cols, bytes
per array row, and which buffer holds it (IN_FILE: the model file; IN_PACKED: the repacked weights). Vector roles
(VEC_*) index the second axis of `vecs` (n_layers, N_VEC, width). Variant switches and sizes travel in `dims` (int64)
and `reals`.
"""
import numpy as np
from numba import njit

from kernels_cpu.activation import gated_activation_row
from kernels_cpu.activations_q8 import quantize_activations
from kernels_cpu.attention import attention_cached, attention_cached_serial
from kernels_cpu.dequant import dequant_row
from kernels_cpu.matvec_q8 import matvec_q8_dispatch, weight_rows
from kernels_cpu.norm import rms_norm_rows
from kernels_cpu.rope import rope_inplace

# roles of the per-layer matrices; M_QKV and M_GATE_UP are Q|K|V and gate|up as one matrix where they lie one after
# another in one layout (n_rows 0 where not): one parallel region and one quantization of x instead of three or two
M_Q, M_K, M_V, M_O, M_GATE, M_UP, M_DOWN, M_QKV, M_GATE_UP = range(9)
N_MAT = 9
# roles of the per-layer float vectors
V_ATTN_NORM, V_FFN_NORM, V_Q_BIAS, V_K_BIAS, V_V_BIAS, V_Q_NORM, V_K_NORM, V_POST_ATTN, V_POST_FFN = range(9)
N_VEC = 9
# entries of `dims`
D_MODEL, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_VALUE_DIM, D_FF, D_ROPE_DIMS, D_ROPE_STYLE, D_QKV_BIAS, D_QK_NORM, \
    D_POST_NORMS, D_GELU, D_VOCAB = range(13)
N_DIMS = 13
# entries of `reals`
R_EPS, R_EMBED_SCALE, R_ATTN_SCALE, R_SOFTCAP = range(4)
N_REALS = 4
# below this many multiply-adds per attention call, waking the worker threads costs more than it saves
PARALLEL_ATTENTION_WORK = 1 << 18


IN_FILE, IN_PACKED = 0, 1


@njit(cache=True)
def _matrix(weights, packed, table, i):
    """The uint8 (array rows, row_bytes) view of matrix i of a table (offset, type id, n_rows, n_cols, row_bytes,
    buffer)."""
    off, rb = table[i, 0], table[i, 4]
    rows = weight_rows(table[i, 1], table[i, 2])
    buffer = packed if table[i, 5] == IN_PACKED else weights
    return buffer[off:off + rows * rb].reshape((rows, rb))


class StepBuffers:
    """Scratch arrays of a decode step, allocated once per engine (sizes from the model's dims)."""

    def __init__(self, dims: np.ndarray):
        d, heads, kv, hd, vd, ff = (int(dims[i]) for i in (D_MODEL, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_VALUE_DIM, D_FF))
        widest = max(d, ff, heads * hd, heads * vd)
        f32 = np.float32
        self.x = np.zeros((1, d), f32)
        self.h = np.zeros((1, d), f32)
        # q, k, v and gate, up are views into one buffer each, which the fused matrices write at once
        self.qkv = np.zeros(heads * hd + kv * hd + kv * vd, f32)
        self.q = self.qkv[:heads * hd].reshape(1, heads, hd)
        self.k = self.qkv[heads * hd:(heads + kv) * hd].reshape(1, kv, hd)
        self.v = self.qkv[(heads + kv) * hd:].reshape(1, kv, vd)
        self.attn = np.zeros((1, heads, vd), f32)
        self.gate_up = np.zeros(2 * ff, f32)
        self.gate = self.gate_up[:ff].reshape(1, ff)
        self.up = self.gate_up[ff:].reshape(1, ff)
        self.out = np.zeros((1, widest), f32)
        self.xq = np.zeros(widest, np.int8)
        self.xd = np.zeros(widest // 32, f32)
        self.xs = np.zeros(widest // 32, np.int32)
        self.position = np.zeros(1, np.int64)

    def as_tuple(self):
        return (self.x, self.h, self.q, self.k, self.v, self.attn, self.gate, self.up, self.out, self.xq, self.xd,
                self.xs, self.position, self.qkv, self.gate_up)


@njit(cache=True)
def _linear(weights, packed, table, i, x, out, xq, xd, xs):
    """out[:n_rows] = W_i @ x with x quantized to int8 blocks first (as llama.cpp's vec_dot with Q8 activations)."""
    n_cols = table[i, 3]
    quantize_activations(x[:n_cols], xq[:n_cols], xd[:n_cols // 32], xs[:n_cols // 32])
    matvec_q8_dispatch(table[i, 1], _matrix(weights, packed, table, i), xq[:n_cols], xd[:n_cols // 32],
                       xs[:n_cols // 32], out[:table[i, 2]])


@njit(cache=True)
def decode_step(token, pos, weights, packed, layer_mats, head_mats, vecs, output_norm, windows, rope_bases, dims, reals,
                k_cache, v_cache, buffers, logits):
    """Evaluate `token` at position `pos` (its K/V are stored there); write the next-token logits (n_vocab,)."""
    x, h, q, k, v, attn, gate, up, out, xq, xd, xs, position, qkv, gate_up = buffers
    d, heads, kv_heads = dims[D_MODEL], dims[D_HEADS], dims[D_KV_HEADS]
    hd, vd, ff = dims[D_HEAD_DIM], dims[D_VALUE_DIM], dims[D_FF]
    eps = reals[R_EPS]
    position[0] = pos

    dequant_row(head_mats[0, 1], _matrix(weights, packed, head_mats, 0)[token], x[0])
    if reals[R_EMBED_SCALE] != 1.0:
        scale = np.float32(reals[R_EMBED_SCALE])  # a float32 product, as the prefill path computes it
        for j in range(d):
            x[0, j] *= scale

    for layer in range(layer_mats.shape[0]):
        mats, lv = layer_mats[layer], vecs[layer]
        # attention block
        rms_norm_rows(x, lv[V_ATTN_NORM, :d], eps, h)
        qf, kf, vf = q.reshape((1, heads * hd)), k.reshape((1, kv_heads * hd)), v.reshape((1, kv_heads * vd))
        if mats[M_QKV, 2]:
            _linear(weights, packed, mats, M_QKV, h[0], qkv, xq, xd, xs)
        else:
            _linear(weights, packed, mats, M_Q, h[0], qf[0], xq, xd, xs)
            _linear(weights, packed, mats, M_K, h[0], kf[0], xq, xd, xs)
            _linear(weights, packed, mats, M_V, h[0], vf[0], xq, xd, xs)
        if dims[D_QKV_BIAS]:
            qf[0] += lv[V_Q_BIAS, :heads * hd]
            kf[0] += lv[V_K_BIAS, :kv_heads * hd]
            vf[0] += lv[V_V_BIAS, :kv_heads * vd]
        if dims[D_QK_NORM]:
            rms_norm_rows(q.reshape((heads, hd)), lv[V_Q_NORM, :hd], eps, q.reshape((heads, hd)))
            rms_norm_rows(k.reshape((kv_heads, hd)), lv[V_K_NORM, :hd], eps, k.reshape((kv_heads, hd)))
        rope_inplace(q, position, rope_bases[layer], dims[D_ROPE_DIMS], dims[D_ROPE_STYLE])
        rope_inplace(k, position, rope_bases[layer], dims[D_ROPE_DIMS], dims[D_ROPE_STYLE])
        k_cache[layer, pos] = k[0]
        v_cache[layer, pos] = v[0]
        if (pos + 1) * heads * hd < PARALLEL_ATTENTION_WORK:
            attention_cached_serial(q, position, k_cache[layer], v_cache[layer], reals[R_ATTN_SCALE], windows[layer],
                                    attn)
        else:
            attention_cached(q, position, k_cache[layer], v_cache[layer], reals[R_ATTN_SCALE], windows[layer], attn)
        _linear(weights, packed, mats, M_O, attn.reshape((1, heads * vd))[0], out[0], xq, xd, xs)
        if dims[D_POST_NORMS]:
            rms_norm_rows(out[:, :d], lv[V_POST_ATTN, :d], eps, out[:, :d])
        x[0] += out[0, :d]
        # feed-forward block
        rms_norm_rows(x, lv[V_FFN_NORM, :d], eps, h)
        if mats[M_GATE_UP, 2]:
            _linear(weights, packed, mats, M_GATE_UP, h[0], gate_up, xq, xd, xs)
        else:
            _linear(weights, packed, mats, M_GATE, h[0], gate[0], xq, xd, xs)
            _linear(weights, packed, mats, M_UP, h[0], up[0], xq, xd, xs)
        gated_activation_row(gate[0], up[0], dims[D_GELU] != 0)
        _linear(weights, packed, mats, M_DOWN, gate[0], out[0], xq, xd, xs)
        if dims[D_POST_NORMS]:
            rms_norm_rows(out[:, :d], lv[V_POST_FFN, :d], eps, out[:, :d])
        x[0] += out[0, :d]

    rms_norm_rows(x, output_norm, eps, h)
    _linear(weights, packed, head_mats, 1, h[0], logits, xq, xd, xs)
    cap = reals[R_SOFTCAP]
    if cap != 0.0:
        for j in range(logits.shape[0]):
            logits[j] = np.tanh(logits[j] / cap) * cap
