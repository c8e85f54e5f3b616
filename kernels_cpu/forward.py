"""One forward pass of the pre-norm decoder family for any batch of tokens, each at its own (sequence, position).

A prompt's prefill (one sequence, positions p..p+n-1), one decode step (n = 1), a decode step of B sequences and k
draft tokens to verify are all the same call: `forward`. It runs every layer inside compiled code (Python-level
orchestration costs microseconds per kernel call; a 30-layer step makes hundreds). Row i's keys and values are
stored at `k_cache[layer, seqs[i], positions[i]]` before attention, so row i attends to its own sequence's cached
positions <= positions[i] (inside the layer's sliding window where it has one): rows of one sequence see each other
causally, rows of different sequences never meet. A batch must not hold two rows with the same (sequence, position).

Matrices multiply with int8-quantized activations: matvec kernels for one row, tile kernels (matmul_q8) for more;
both take the same per-block steps, so a token's logits are bit-identical whichever way it is batched.

Knows nothing of GGUF: weights arrive as two uint8 buffers (the memory-mapped file and the repacked weights) plus a
table of where each matrix lies (`MATRIX`, a record dtype); the small float vectors (norms, biases) as one padded
float32 table indexed by the V_* roles; the hyper-parameters and variant switches as a `Hyper` named tuple, the
scratch arrays as a `Scratch` named tuple. `edgeinfer.engine` builds them.
"""
from collections import namedtuple

import numpy as np
from numba import njit

from kernels_cpu.activation import _gated_rows, gated_activation_row, gated_from_fused_row, gated_from_fused_rows
from kernels_cpu.activations_q8 import quantize_activations, quantize_activations_rows
from kernels_cpu.attention import attention_rows, make_partials
from kernels_cpu.dequant import dequant_row
from kernels_cpu.kv_types import store_key, store_row
from kernels_cpu.matmul_q8 import matmul_tiles_dispatch
from kernels_cpu.matvec_q8 import REPACKED, matvec_q8_dispatch, weight_rows
from kernels_cpu.norm import rms_norm_rows, rms_norm_rows_parallel
from kernels_cpu.rope import rope_angles, rope_qk_rotate

# A weight matrix: where its bytes lie (`buffer` IN_FILE: the model file; IN_PACKED: the repacked weights, at
# `offset`), its layout (`type_id`: a ggml type or a repacked layout's id, matvec_q8), its shape and bytes per array
# row. A row of n_rows 0 marks a matrix that does not exist (e.g. the fused Q|K|V where Q, K, V are apart).
MATRIX = np.dtype([("offset", np.int64), ("type_id", np.int64), ("n_rows", np.int64), ("n_cols", np.int64),
                   ("row_bytes", np.int64), ("buffer", np.int64)])
IN_FILE, IN_PACKED = 0, 1

# roles of the per-layer matrices (second axis of the layer table); M_QKV and M_GATE_UP are Q|K|V and gate|up as one
# matrix where they lie one after another in one layout: one parallel region and one quantization of x, not three
M_Q, M_K, M_V, M_O, M_GATE, M_UP, M_DOWN, M_QKV, M_GATE_UP = range(9)
N_MAT = 9
# the head table: token embedding and output (LM head) matrices
H_EMBED, H_OUTPUT = range(2)
# roles of the per-layer float vectors (second axis of `vecs`)
V_ATTN_NORM, V_FFN_NORM, V_Q_BIAS, V_K_BIAS, V_V_BIAS, V_Q_NORM, V_K_NORM, V_POST_ATTN, V_POST_FFN = range(9)
N_VEC = 9

# The hyper-parameters and variant switches compiled code reads (built from an arch's DecoderConfig in one place).
Hyper = namedtuple("Hyper", [
    "d_model", "n_heads", "n_kv_heads", "head_dim", "value_dim", "d_ff", "n_vocab",  # sizes
    "rope_dims", "rope_style",  # RoPE: leading dims rotated per head, ROPE_NORMAL / ROPE_NEOX
    "qkv_bias", "qk_norm", "post_norms", "gelu",  # variant switches (bools)
    "pre_norms",  # bool: RMSNorm of each block's input (OLMo 2 has none: only post-norms)
    "qk_norm_whole",  # bool: the Q/K norms span the whole projection (OLMo 2), not each head
    "norm_eps", "embedding_scale", "attention_scale", "logit_softcap",  # reals (softcap 0: none)
    "attn_softcap",  # soft-cap of the attention scores (Gemma 2; 0: none)
    "residual_scale",  # each block's output is scaled by this before the residual add (Granite; 1: none)
    "logit_scale",  # the logits are divided by this (Granite; 1: none)
])

# Scratch arrays for a batch of n rows; the q8 triples are x quantized to int8 blocks (values, block scales, block
# sums) at the three widths matrices read: d_model, n_heads * value_dim (attention output) and d_ff.
Scratch = namedtuple("Scratch", [
    "x", "h",  # (n, d_model): the residual stream, the normed input of a block
    "qkv", "q", "k", "v",  # (n, q+k+v dims) the fused projection; q (n, heads, hd), k (n, kv, hd), v (n, kv, vd)
    "attn",  # (n, heads, vd)
    "gate_up", "gate", "up",  # (n, 2 ff) fused; gate, up (n, ff)
    "out",  # (n, d_model): a block's output before the residual add
    "q8_model", "q8_attn", "q8_ff",  # (values int8 (n, w), scales f32 (n, w/32), sums i32 (n, w/32)) per width
    "head_in",  # (n, d_model): final-normed rows whose logits are wanted
    "rope_cos", "rope_sin",  # (n, rope_dims / 2) float64: the rows' RoPE angles, shared by layers of one frequency set
    "partials",  # attention's partial results when it splits keys across threads (kernels_cpu.attention)
    "threads",  # int64 (1,): the threads parallel regions run on (the engine sets it; numba's get_num_threads
                # in compiled code would make the forward uncacheable)
])

# below this many rows, waking the worker threads for norms costs more than it saves (prefill's old threshold)
PARALLEL_NORM_ROWS = 64


def make_scratch(hp: Hyper, n: int) -> Scratch:
    """Scratch arrays for batches of up to n rows."""
    f32 = np.float32
    d, heads, kv, hd, vd, ff = hp.d_model, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.value_dim, hp.d_ff

    def q8(width):
        return (np.zeros((n, width), np.int8), np.zeros((n, width // 32), f32), np.zeros((n, width // 32), np.int32))

    return Scratch(
        x=np.zeros((n, d), f32), h=np.zeros((n, d), f32),
        qkv=np.zeros((n, heads * hd + kv * hd + kv * vd), f32),
        q=np.zeros((n, heads, hd), f32), k=np.zeros((n, kv, hd), f32), v=np.zeros((n, kv, vd), f32),
        attn=np.zeros((n, heads, vd), f32),
        gate_up=np.zeros((n, 2 * ff), f32), gate=np.zeros((n, ff), f32), up=np.zeros((n, ff), f32),
        out=np.zeros((n, d), f32),
        q8_model=q8(d), q8_attn=q8(heads * vd), q8_ff=q8(ff),
        head_in=np.zeros((n, d), f32),
        rope_cos=np.zeros((n, hp.rope_dims // 2)), rope_sin=np.zeros((n, hp.rope_dims // 2)),
        partials=make_partials(heads, vd),
        threads=np.ones(1, np.int64),
    )


@njit(cache=True)
def _matrix(weights, packed, m):
    """The uint8 (array rows, row_bytes) view of the matrix that table record m describes."""
    rows = weight_rows(m.type_id, m.n_rows)
    buffer = packed if m.buffer == IN_PACKED else weights
    return buffer[m.offset:m.offset + rows * m.row_bytes].reshape((rows, m.row_bytes))


@njit(cache=True)
def _linear(weights, packed, m, x, out, q8):
    """out[:, :n_rows] = x @ W.T for the rows of x (n, n_cols), x quantized to int8 blocks first (as llama.cpp's
    vec_dot with Q8 activations). One row: a matvec; more: the tile kernels of a repacked layout, else a matvec per
    row."""
    n = x.shape[0]
    xq, xd, xs = q8[0][:n], q8[1][:n], q8[2][:n]
    w = _matrix(weights, packed, m)
    if n == 1:
        quantize_activations(x[0], xq[0], xd[0], xs[0])
        matvec_q8_dispatch(m.type_id, w, xq[0], xd[0], xs[0], out[0])
        return
    quantize_activations_rows(x, xq, xd, xs)
    if m.type_id >= REPACKED:
        matmul_tiles_dispatch(m.type_id, w, xq, xd, xs, out)
    else:
        for t in range(n):
            matvec_q8_dispatch(m.type_id, w, xq[t], xd[t], xs[t], out[t])


@njit(cache=True)
def _rms_norm(x, weight, eps, out):
    if x.shape[0] >= PARALLEL_NORM_ROWS:
        rms_norm_rows_parallel(x, weight, eps, out)
    else:
        rms_norm_rows(x, weight, eps, out)


@njit(cache=True)
def _add_rows(x, y, scale):
    """x += y * scale, row by row (y may be wider than x: only x's columns are added); scale 1 adds y exactly."""
    if scale == 1.0:
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                x[i, j] += y[i, j]
        return
    f = np.float32(scale)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            x[i, j] += y[i, j] * f


@njit(cache=True)
def _same_values(a, b):
    for i in range(a.shape[0]):
        if a[i] != b[i]:
            return False
    return True


@njit(cache=True)
def _block_input(x, h, norm, hp):
    """h = the normed block input (pre-norm), or x itself for a post-norm-only family (OLMo 2)."""
    if hp.pre_norms:
        _rms_norm(x, norm, hp.norm_eps, h)
    else:
        h[:] = x


@njit(cache=True)
def _attention_block(layer, weights, packed, mats, lv, hp, window, positions, seqs, k_cache, v_cache, s, n):
    """s.out[:n] = the attention block's output for s.x[:n] (its K/V rows stored into the cache first; the rows'
    RoPE angles for this layer in s.rope_cos, s.rope_sin)."""
    d, heads, kv_heads, hd, vd = hp.d_model, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.value_dim
    qd, kd = heads * hd, kv_heads * hd
    x, h, q, k, v = s.x[:n], s.h[:n], s.q[:n], s.k[:n], s.v[:n]
    _block_input(x, h, lv[V_ATTN_NORM, :d], hp)
    q2, k2, v2 = q.reshape((n, qd)), k.reshape((n, kd)), v.reshape((n, kv_heads * vd))
    if mats[M_QKV].n_rows:
        qkv = s.qkv[:n]
        _linear(weights, packed, mats[M_QKV], h, qkv, s.q8_model)
        for i in range(n):
            q2[i] = qkv[i, :qd]
            k2[i] = qkv[i, qd:qd + kd]
            v2[i] = qkv[i, qd + kd:]
    else:
        _linear(weights, packed, mats[M_Q], h, q2, s.q8_model)
        _linear(weights, packed, mats[M_K], h, k2, s.q8_model)
        _linear(weights, packed, mats[M_V], h, v2, s.q8_model)
    if hp.qkv_bias:
        for i in range(n):
            q2[i] += lv[V_Q_BIAS, :qd]
            k2[i] += lv[V_K_BIAS, :kd]
            v2[i] += lv[V_V_BIAS, :kv_heads * vd]
    if hp.qk_norm and hp.qk_norm_whole:
        rms_norm_rows(q2, lv[V_Q_NORM, :qd], hp.norm_eps, q2)
        rms_norm_rows(k2, lv[V_K_NORM, :kd], hp.norm_eps, k2)
    elif hp.qk_norm:
        rms_norm_rows(q.reshape((n * heads, hd)), lv[V_Q_NORM, :hd], hp.norm_eps, q.reshape((n * heads, hd)))
        rms_norm_rows(k.reshape((n * kv_heads, hd)), lv[V_K_NORM, :hd], hp.norm_eps, k.reshape((n * kv_heads, hd)))
    rope_qk_rotate(q, k, s.rope_cos[:n], s.rope_sin[:n], hp.rope_style)
    for i in range(n):
        store_key(k_cache[0], k_cache[1], layer, seqs[i], positions[i], k[i])
        store_row(v_cache[0], v_cache[1], layer, seqs[i], positions[i], v[i])
    attn = s.attn[:n]
    attention_rows(q, positions, seqs, k_cache, v_cache, layer, hp.attention_scale, window, attn, s.partials,
                   s.threads[0], hp.attn_softcap)
    out = s.out[:n]
    _linear(weights, packed, mats[M_O], attn.reshape((n, heads * vd)), out, s.q8_attn)
    if hp.post_norms:
        _rms_norm(out, lv[V_POST_ATTN, :d], hp.norm_eps, out)


@njit(cache=True)
def _feed_forward_block(weights, packed, mats, lv, hp, s, n):
    """s.out[:n] = the feed-forward block's output for s.x[:n]."""
    d = hp.d_model
    x, h, gate, up = s.x[:n], s.h[:n], s.gate[:n], s.up[:n]
    _block_input(x, h, lv[V_FFN_NORM, :d], hp)
    if mats[M_GATE_UP].n_rows:  # the activation reads gate and up where the fused projection left them
        gate_up = s.gate_up[:n]
        _linear(weights, packed, mats[M_GATE_UP], h, gate_up, s.q8_model)
        if n == 1:
            gated_from_fused_row(gate_up[0], gate[0], hp.gelu)
        else:
            gated_from_fused_rows(gate_up, gate, hp.gelu)
    else:
        _linear(weights, packed, mats[M_GATE], h, gate, s.q8_model)
        _linear(weights, packed, mats[M_UP], h, up, s.q8_model)
        if n == 1:
            gated_activation_row(gate[0], up[0], hp.gelu)
        else:
            _gated_rows(gate, up, hp.gelu)
    out = s.out[:n]
    _linear(weights, packed, mats[M_DOWN], gate, out, s.q8_ff)
    if hp.post_norms:
        _rms_norm(out, lv[V_POST_FFN, :d], hp.norm_eps, out)


@njit(cache=True, nogil=True)
def forward(tokens, positions, seqs, logit_rows, weights, packed, layer_mats, head_mats, vecs, output_norm,
            windows, rope_freqs, hp, k_cache, v_cache, s, logits):
    """Evaluate tokens (n,) at positions (n,) of sequences seqs (n,) (each row's K/V stored there), and write the
    logits of rows logit_rows (m,) into logits (m, n_vocab). Runs without the GIL (a server's event loop writes
    the last step's tokens meanwhile); callers must not run two at once (edgeinfer.backends.cpu holds a lock).

    layer_mats (n_layers, N_MAT) and head_mats (2,) of MATRIX records; vecs (n_layers, N_VEC, width) float32;
    windows (n_layers,) int64 (0: full attention); rope_freqs (n_layers, rope_dims / 2) float64, each layer's angle
    per position of each rotated pair (kernels_cpu.rope; all 0 on a layer without RoPE); hp a Hyper; v_cache a
    (values, scales) pair of shape (n_layers, n_seq, n_kv_heads, n_ctx, value_dim) in any cache type
    (kernels_cpu.kv_types), k_cache likewise in key blocks (n_layers, n_seq, n_kv_heads, n_ctx / 16, head_dim, 16); s a Scratch of at least n rows."""
    n = tokens.shape[0]
    d = hp.d_model
    x = s.x[:n]
    embed = _matrix(weights, packed, head_mats[H_EMBED])
    for i in range(n):
        dequant_row(head_mats[H_EMBED].type_id, embed[tokens[i]], x[i])
    if hp.embedding_scale != 1.0:
        scale = np.float32(hp.embedding_scale)  # a float32 product, as llama.cpp computes it
        for i in range(n):
            for j in range(d):
                x[i, j] *= scale

    angles_of = -1  # the layer whose frequencies s.rope_cos / s.rope_sin hold the angles of
    for layer in range(layer_mats.shape[0]):
        mats, lv = layer_mats[layer], vecs[layer]
        if angles_of < 0 or not _same_values(rope_freqs[layer], rope_freqs[angles_of]):
            rope_angles(positions, rope_freqs[layer], s.rope_cos[:n], s.rope_sin[:n])
            angles_of = layer
        _attention_block(layer, weights, packed, mats, lv, hp, windows[layer], positions, seqs, k_cache, v_cache, s,
                         n)
        _add_rows(x, s.out[:n], hp.residual_scale)
        _feed_forward_block(weights, packed, mats, lv, hp, s, n)
        _add_rows(x, s.out[:n], hp.residual_scale)

    m = logit_rows.shape[0]
    if m == 0:  # a prompt chunk before the last one: its keys and values are all that is wanted
        return
    head_in = s.head_in[:m]
    for r in range(m):
        head_in[r] = x[logit_rows[r]]
    _rms_norm(head_in, output_norm, hp.norm_eps, head_in)
    _linear(weights, packed, head_mats[H_OUTPUT], head_in, logits, s.q8_model)
    if hp.logit_scale != 1.0:
        inverse = np.float32(1.0 / hp.logit_scale)  # llama.cpp scales by 1 / logit_scale in float32
        for r in range(m):
            for j in range(logits.shape[1]):
                logits[r, j] *= inverse
    cap = hp.logit_softcap
    if cap != 0.0:
        for r in range(m):
            for j in range(logits.shape[1]):
                logits[r, j] = np.tanh(logits[r, j] / cap) * cap
