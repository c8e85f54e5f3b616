"""One forward pass of the pre-norm decoder family for any batch of tokens, each at its own (sequence, position).

A prompt's prefill (one sequence, positions p..p+n-1), one decode step (n = 1), a decode step of B sequences and k
draft tokens to verify are all the same call: `forward`. It runs every layer inside compiled code (Python-level
orchestration costs microseconds per kernel call; a 30-layer step makes hundreds). Row i's keys and values are
stored at `k_cache[layer, seqs[i], positions[i]]` before attention, so row i attends to its own sequence's cached
positions <= positions[i] (inside the layer's sliding window where it has one): rows of one sequence see each other
causally, rows of different sequences never meet. A batch must not hold two rows with the same (sequence, position).

Matrices multiply with int8-quantized activations: matvec kernels for one row, tile kernels (matmul_q8) for more;
both take the same per-block steps, so a token's logits are bit-identical whichever way it is batched.

The whole pass is one parallel region, a team of s.threads[0] threads (kernels_cpu.team), as llama.cpp runs its graph
on a thread pool: every thread walks every op in the same order, and each op is a phase whose items (a chunk of a
matrix's rows, a block of 4 rows of a norm, a chunk of attention jobs) the threads claim, then wait for the phase to
be done before the next; a thread with nothing left to claim in a small op hints the next matrix's first bytes into
L2 meanwhile (team.wait_warming). Before, each op started a region of its own (~180 per SmolLM2 step) and the small
ops ran on the calling thread while the other waited. Measured on the 2-vCPU Zen 5 (in process, min of 280 calls,
the old forward and this one taking turns), SmolLM2 at 2 threads: one row at depth 32 1.54-1.58 ms against
1.65-1.73, eight rows 3.31-4.56 against 3.68-4.91, one row at depth 4096 4.37 against 4.60; one thread: the same.

Knows nothing of GGUF: weights arrive as two uint8 buffers (the memory-mapped file and the repacked weights) plus a
table of where each matrix lies (`MATRIX`, a record dtype); the small float vectors (norms, biases) as one padded
float32 table indexed by the V_* roles; the hyper-parameters and variant switches as a `Hyper` named tuple, the
scratch arrays as a `Scratch` named tuple. `edgeinfer.engine` builds them.
"""
from collections import namedtuple

import numpy as np
from numba import njit, prange

from kernels_cpu.activation import gated_row
from kernels_cpu.activations_q8 import quantize_activations
from kernels_cpu.attention import (Partials, make_partials, team_blocks, team_jobs, team_merge, team_split,
                                   team_workspace)
from kernels_cpu.borrow import borrowed
from kernels_cpu.dequant import dequant_row
from kernels_cpu.kv_types import store_key, store_row
from kernels_cpu.matmul_q8 import matmul_tiles_part
from kernels_cpu.matvec_q8 import matvec_q8_part, matvec_units, weight_rows
from kernels_cpu.norm import rms_norm_rows
from kernels_cpu.q8_layouts import REPACKED
from kernels_cpu.rope import rope_angles, rope_qk_rotate
from kernels_cpu.team import chunks, claim, done_and_claim, item_range, make_sync, wait_done, wait_warming

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
    "n_layers",
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
    "threads",  # int64 (1,): the team's threads (the engine sets it; numba's get_num_threads in compiled code
                # would make the forward uncacheable)
    "sync",  # the team's phase counters (kernels_cpu.team): PHASES_PER_LAYER per layer and PHASES_OUTSIDE more
])


# The team (kernels_cpu.team) claims each op's items: a matrix's units in ITEMS_PER_THREAD items per thread for a
# decode step (each thread streams one long run of rows, which the hardware prefetcher follows best; SmolLM2's
# 1-row step at 2 threads, min of 280 calls: 4 items per thread 1.83-1.98 ms, 2 1.69-1.89, 1 1.54-1.58, against
# 1.63-1.80 for the old region per op, taking turns), ITEMS_PER_THREAD_MANY_ROWS from MANY_ROWS rows on (a prompt:
# items are long, and even shares matter more than claims), each of at least ITEM_BYTES of weights times rows (a
# claim costs ~50-100 ns when the counter's cache line moves between the cores).
ITEMS_PER_THREAD = 1
ITEMS_PER_THREAD_MANY_ROWS = 16
MANY_ROWS = 16
ITEM_BYTES = 32 * 1024
# ops in a layer at most (norm, Q, K, V, RoPE + store, attention, merge, quantize, O, norm, gate, up, activation,
# down), and before and after the layers (embedding; last residual add, final norm, head, logit scaling)
PHASES_PER_LAYER = 16
PHASES_OUTSIDE = 8
# rows per item of the small ops (norms, RoPE, quantizing) at most, where there are items enough for the team
# (_row_items): a norm's float64 sum is a chain of dependent adds, and rms_norm_rows runs four rows' chains side by
# side (one row alone: ~0.5 us of latency)
ROWS_PER_ITEM = 4
# bytes of the next matrix a thread with no item left hints into L2 while a small op's other items finish (a 1-row
# step's small ops are one item: the other thread would wait, and the memory bus idle, ~10 us a layer)
WARM_BYTES = 64 * 1024
# attention jobs are claimed in chunks of about this many per thread (a call per job cost 30% of a short job)
JOB_ITEMS_PER_THREAD = 4
# an activation row's columns per item (a multiple of the 32-element blocks it is quantized in)
ACTIVATION_COLUMNS = 512


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
        sync=make_sync(PHASES_PER_LAYER * hp.n_layers + PHASES_OUTSIDE),
    )


@njit(cache=True)
def _matrix(weights, packed, m):
    """The uint8 (array rows, row_bytes) view of the matrix that table record m describes."""
    rows = weight_rows(m.type_id, m.n_rows)
    buffer = packed if m.buffer == IN_PACKED else weights
    return buffer[m.offset:m.offset + rows * m.row_bytes].reshape((rows, m.row_bytes))


@njit(cache=True)
def _linear(sync, phase, threads, weights, packed, m, n, q8, out):
    """Start phase `phase`: out[:n, :n_rows] = x @ W.T, x quantized already (q8: its values, scales, sums; n rows).
    One row: matvec shares; more: the tile kernels' shares for a repacked layout, else a matvec share per row.
    Returns the phase's item count: the caller waits for it (wait_done) when it needs the result."""
    w = _matrix(weights, packed, m)
    xq, xd, xs = q8[0], q8[1], q8[2]
    units = matvec_units(m.type_id, m.n_rows)
    unit_bytes = n * (m.row_bytes if m.type_id >= REPACKED else m.row_bytes * min(4, m.n_rows))
    per_thread = ITEMS_PER_THREAD if n < MANY_ROWS else ITEMS_PER_THREAD_MANY_ROWS
    n_items = chunks(units, threads, per_thread, (ITEM_BYTES + unit_bytes - 1) // unit_bytes)
    i = claim(sync, phase)
    while i < n_items:
        u0, u1 = item_range(i, n_items, units)
        if n == 1:
            matvec_q8_part(m.type_id, w, xq[0], xd[0], xs[0], out[0], u0, u1)
        elif m.type_id >= REPACKED:
            matmul_tiles_part(m.type_id, w, xq[:n], xd[:n], xs[:n], out[:n], u0, u1)
        else:
            for t in range(n):
                matvec_q8_part(m.type_id, w, xq[t], xd[t], xs[t], out[t], u0, u1)
        i = done_and_claim(sync, phase)
    return n_items


@njit(cache=True)
def _first_bytes(weights, packed, m):
    """The first WARM_BYTES of the matrix that table record m describes (1-D uint8), for wait_warming."""
    w = _matrix(weights, packed, m)
    return w.reshape(w.size)[:WARM_BYTES]


@njit(cache=True, inline="always")
def _row_items(n, threads):
    """How many items a small op over n rows is cut into: ROWS_PER_ITEM rows each, but one per thread at least
    (where there are rows for it), so that 4 rows on 2 threads are 2 items of 2, not one item on one thread while
    the other waits. (SmolLM2 at depth 32 on 2 threads, the two ways taking turns step by step in one process, 600
    steps: 4 rows 2.816 -> 2.718 ms a step, 3 rows 2.829 -> 2.778, 2 rows 2.382 -> 2.330; 8 rows, cut the same
    either way, 3.501 / 3.518. The same logits.)"""
    return max((n + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM, min(threads, n))


@njit(cache=True, inline="always")
def _rows_of(i, items, n):
    """[r0, r1): the rows of item i of a small op over n rows cut into `items` items (_row_items)."""
    return item_range(i, items, n)


@njit(cache=True)
def _add_rows(x, y, r0, r1, scale):
    """x[r0:r1] += y[r0:r1] * scale (y may be wider than x: only x's columns are added); scale 1 adds y exactly."""
    if scale == 1.0:
        for r in range(r0, r1):
            for j in range(x.shape[1]):
                x[r, j] += y[r, j]
        return
    f = np.float32(scale)
    for r in range(r0, r1):
        for j in range(x.shape[1]):
            x[r, j] += y[r, j] * f


@njit(cache=True)
def _same_values(a, b):
    for i in range(a.shape[0]):
        if a[i] != b[i]:
            return False
    return True


@njit(cache=True)
def _quantize_rows(x, r0, r1, q8):
    for r in range(r0, r1):
        quantize_activations(x[r], q8[0][r], q8[1][r], q8[2][r])


@njit(cache=True)
def _block_input_rows(x, h, r0, r1, norm, hp, q8):
    """h[r0:r1] = the normed block input (pre-norm), or x itself for a post-norm-only family (OLMo 2); quantized."""
    if hp.pre_norms:
        rms_norm_rows(x[r0:r1], norm, hp.norm_eps, h[r0:r1])
    else:
        h[r0:r1] = x[r0:r1]
    _quantize_rows(h, r0, r1, q8)


@njit(cache=True)
def _residual_rows(x, out, r0, r1, post_norm, hp):
    """x[r0:r1] += a block's output rows (post-normed first where the family has post-norms), scaled."""
    if hp.post_norms:
        rms_norm_rows(out[r0:r1], post_norm, hp.norm_eps, out[r0:r1])
    _add_rows(x, out, r0, r1, hp.residual_scale)


@njit(cache=True)
def _qkv_row(r, layer, lv, hp, positions, seqs, k_cache, v_cache, s, fused):
    """Row r's Q, K, V from the projections: split (fused), biased, Q/K-normed, rotated, K and V stored."""
    heads, kv_heads, hd, vd = hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.value_dim
    qd, kd = heads * hd, kv_heads * hd
    q, k, v = s.q[r:r + 1], s.k[r:r + 1], s.v[r:r + 1]
    q2, k2, v2 = q.reshape((1, qd)), k.reshape((1, kd)), v.reshape((1, kv_heads * vd))
    if fused:
        q2[0] = s.qkv[r, :qd]
        k2[0] = s.qkv[r, qd:qd + kd]
        v2[0] = s.qkv[r, qd + kd:qd + kd + kv_heads * vd]
    if hp.qkv_bias:
        q2[0] += lv[V_Q_BIAS, :qd]
        k2[0] += lv[V_K_BIAS, :kd]
        v2[0] += lv[V_V_BIAS, :kv_heads * vd]
    if hp.qk_norm and hp.qk_norm_whole:
        rms_norm_rows(q2, lv[V_Q_NORM, :qd], hp.norm_eps, q2)
        rms_norm_rows(k2, lv[V_K_NORM, :kd], hp.norm_eps, k2)
    elif hp.qk_norm:
        rms_norm_rows(q.reshape((heads, hd)), lv[V_Q_NORM, :hd], hp.norm_eps, q.reshape((heads, hd)))
        rms_norm_rows(k.reshape((kv_heads, hd)), lv[V_K_NORM, :hd], hp.norm_eps, k.reshape((kv_heads, hd)))
    rope_qk_rotate(q, k, s.rope_cos[r:r + 1], s.rope_sin[r:r + 1], hp.rope_style)
    store_key(k_cache[0], k_cache[1], layer, seqs[r], positions[r], k[0])
    store_row(v_cache[0], v_cache[1], layer, seqs[r], positions[r], v[0])


@njit(cache=True, error_model="numpy")
def _activation_part(s, r, c0, c1, fused, gelu):
    """gate[r, c0:c1] = act(gate) * up for those columns (from the fused gate|up projection where it is one), then
    quantized (c0, c1 multiples of 32: whole blocks)."""
    ff = s.gate.shape[1]
    gate = s.gate[r, c0:c1]
    if fused:
        gated_row(s.gate_up[r, c0:c1], s.gate_up[r, ff + c0:ff + c1], gate, gelu)
    else:
        gated_row(gate, s.up[r, c0:c1], gate, gelu)
    xq, xd, xs = s.q8_ff
    quantize_activations(gate, xq[r, c0:c1], xd[r, c0 // 32:c1 // 32], xs[r, c0 // 32:c1 // 32])


@njit(cache=True)
def _layer(layer, sync, phase, threads, weights, packed, mats, lv, prev_post_ffn, hp, window, freqs, fresh_angles,
           positions, seqs, k_cache, v_cache, s, n, starts, work, merge_m, merge_l):
    """One layer on a team thread, its ops (phases) from `phase` on, in the same order on every thread; returns the
    next phase. The previous layer's feed-forward output still waits in s.out: its residual add (post-normed with
    prev_post_ffn where the family has post-norms) is this layer's first op, with the rows' RoPE angles where this
    layer's frequencies differ from the last ones (fresh_angles)."""
    d, heads, kv_heads, vd = hp.d_model, hp.n_heads, hp.n_kv_heads, hp.value_dim
    x, h = s.x, s.h
    # -- the residual add, this block's input (normed and quantized) and the angles: items of rows (_row_items)
    n_blocks = _row_items(n, threads)
    i = claim(sync, phase)
    while i < n_blocks:
        r0, r1 = _rows_of(i, n_blocks, n)
        if layer > 0:
            _residual_rows(x, s.out, r0, r1, prev_post_ffn, hp)
        if fresh_angles:
            rope_angles(positions[r0:r1], freqs, s.rope_cos[r0:r1], s.rope_sin[r0:r1])
        _block_input_rows(x, h, r0, r1, lv[V_ATTN_NORM, :d], hp, s.q8_model)
        i = done_and_claim(sync, phase)
    fused = mats[M_QKV].n_rows > 0
    phase = wait_warming(sync, phase, n_blocks, _first_bytes(weights, packed, mats[M_QKV if fused else M_Q]))
    # -- Q, K, V: one fused matrix or three, whose items are claimed without waiting in between (independent)
    if fused:
        phase = wait_done(sync, phase, _linear(sync, phase, threads, weights, packed, mats[M_QKV], n, s.q8_model,
                                               s.qkv))
    else:
        qd, kd = heads * hp.head_dim, kv_heads * hp.head_dim
        q2, k2 = s.q.reshape((s.q.shape[0], qd)), s.k.reshape((s.k.shape[0], kd))
        v2 = s.v.reshape((s.v.shape[0], kv_heads * vd))
        items_q = _linear(sync, phase, threads, weights, packed, mats[M_Q], n, s.q8_model, q2)
        items_k = _linear(sync, phase + 1, threads, weights, packed, mats[M_K], n, s.q8_model, k2)
        items_v = _linear(sync, phase + 2, threads, weights, packed, mats[M_V], n, s.q8_model, v2)
        wait_done(sync, phase, items_q)
        wait_done(sync, phase + 1, items_k)
        phase = wait_done(sync, phase + 2, items_v)
    # -- split, bias, Q/K norms, RoPE, K and V into the cache: items of rows
    i = claim(sync, phase)
    while i < n_blocks:
        r0, r1 = _rows_of(i, n_blocks, n)
        for r in range(r0, r1):
            _qkv_row(r, layer, lv, hp, positions, seqs, k_cache, v_cache, s, fused)
        i = done_and_claim(sync, phase)
    warm_o = _first_bytes(weights, packed, mats[M_O])
    phase = wait_warming(sync, phase, n_blocks, warm_o)
    # -- attention: runs of jobs per item (jobs split into parts, then merged, where there are too few for the threads)
    q, attn = s.q[:n], s.attn[:n]
    n_parts, chunks_per_part = team_split(positions, starts, window, heads, kv_heads, hp.head_dim, n, s.partials,
                                          threads)
    n_jobs = (starts.shape[0] - 1) * kv_heads * max(n_parts, 1)
    n_items = chunks(n_jobs, threads, JOB_ITEMS_PER_THREAD, 1)
    i = claim(sync, phase)
    while i < n_items:
        job0, job1 = item_range(i, n_items, n_jobs)
        team_jobs(q, positions, seqs, k_cache, v_cache, layer, hp.attention_scale, hp.attn_softcap, window, attn,
                  s.partials, starts, kv_heads, n_parts, chunks_per_part, job0, job1,
                  job1 + (threads - 1) * (job1 - job0), work)
        i = done_and_claim(sync, phase)
    phase = wait_warming(sync, phase, n_items, warm_o)
    if n_parts > 0:
        pairs = n * heads
        n_items = chunks(pairs, threads, 2, 1)
        i = claim(sync, phase)
        while i < n_items:
            i0, i1 = item_range(i, n_items, pairs)
            team_merge(s.partials, min(n_parts * chunks_per_part, s.partials.m.shape[0] // heads // n), attn, i0, i1,
                       merge_m, merge_l)
            i = done_and_claim(sync, phase)
        phase = wait_done(sync, phase, n_items)
    # -- the attention output quantized (items of rows), its projection
    attn2 = s.attn.reshape((s.attn.shape[0], heads * vd))
    i = claim(sync, phase)
    while i < n_blocks:
        r0, r1 = _rows_of(i, n_blocks, n)
        _quantize_rows(attn2, r0, r1, s.q8_attn)
        i = done_and_claim(sync, phase)
    phase = wait_warming(sync, phase, n_blocks, warm_o)
    phase = wait_done(sync, phase, _linear(sync, phase, threads, weights, packed, mats[M_O], n, s.q8_attn, s.out))
    # -- the residual add, the feed-forward block's input: items of rows
    i = claim(sync, phase)
    while i < n_blocks:
        r0, r1 = _rows_of(i, n_blocks, n)
        _residual_rows(x, s.out, r0, r1, lv[V_POST_ATTN, :d], hp)
        _block_input_rows(x, h, r0, r1, lv[V_FFN_NORM, :d], hp, s.q8_model)
        i = done_and_claim(sync, phase)
    fused = mats[M_GATE_UP].n_rows > 0
    phase = wait_warming(sync, phase, n_blocks, _first_bytes(weights, packed, mats[M_GATE_UP if fused else M_GATE]))
    # -- gate and up: one fused matrix or two
    if fused:
        phase = wait_done(sync, phase, _linear(sync, phase, threads, weights, packed, mats[M_GATE_UP], n,
                                               s.q8_model, s.gate_up))
    else:
        items_gate = _linear(sync, phase, threads, weights, packed, mats[M_GATE], n, s.q8_model, s.gate)
        items_up = _linear(sync, phase + 1, threads, weights, packed, mats[M_UP], n, s.q8_model, s.up)
        wait_done(sync, phase, items_gate)
        phase = wait_done(sync, phase + 1, items_up)
    # -- the activation, quantized: column chunks of each row per item
    ff = hp.d_ff
    per_row = (ff + ACTIVATION_COLUMNS - 1) // ACTIVATION_COLUMNS
    i = claim(sync, phase)
    while i < n * per_row:
        r, c = i // per_row, i % per_row
        _activation_part(s, r, c * ACTIVATION_COLUMNS, min(c * ACTIVATION_COLUMNS + ACTIVATION_COLUMNS, ff), fused,
                         hp.gelu)
        i = done_and_claim(sync, phase)
    phase = wait_warming(sync, phase, n * per_row, _first_bytes(weights, packed, mats[M_DOWN]))
    # -- the down projection (its residual add: the next layer's first op, or the head's)
    return wait_done(sync, phase, _linear(sync, phase, threads, weights, packed, mats[M_DOWN], n, s.q8_ff, s.out))


@njit(cache=True)
def _team_thread(tokens, positions, seqs, logit_rows, weights, packed, layer_mats, head_mats, vecs, output_norm,
                 windows, rope_freqs, hp, k_cache, v_cache, s, logits):
    """One thread of the team: every op of the forward pass, claiming its share of each (kernels_cpu.team)."""
    n, d, threads, sync = tokens.shape[0], hp.d_model, s.threads[0], s.sync
    x = s.x
    # -- the embedding: a row per item (a dequantized row of the table is work enough)
    embed = _matrix(weights, packed, head_mats[H_EMBED])
    phase = 0
    r = claim(sync, phase)
    while r < n:
        dequant_row(head_mats[H_EMBED].type_id, embed[tokens[r]], x[r])
        if hp.embedding_scale != 1.0:
            scale = np.float32(hp.embedding_scale)  # a float32 product, as llama.cpp computes it
            for j in range(d):
                x[r, j] *= scale
        r = done_and_claim(sync, phase)
    phase = wait_done(sync, phase, n)

    starts = team_blocks(seqs, hp.n_heads, hp.n_kv_heads)
    work, merge_m, merge_l = team_workspace(starts, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.value_dim)
    angles_of = -1  # the layer whose frequencies s.rope_cos / s.rope_sin hold the angles of
    n_layers = layer_mats.shape[0]
    for layer in range(n_layers):
        fresh_angles = angles_of < 0 or not _same_values(rope_freqs[layer], rope_freqs[angles_of])
        if fresh_angles:
            angles_of = layer
        phase = _layer(layer, sync, phase, threads, weights, packed, layer_mats[layer], vecs[layer],
                       vecs[max(layer - 1, 0), V_POST_FFN, :d], hp, windows[layer], rope_freqs[layer], fresh_angles,
                       positions, seqs, k_cache, v_cache, s, n, starts, work, merge_m, merge_l)

    m = logit_rows.shape[0]
    if m == 0:  # a prompt chunk before the last one: its keys and values are all that is wanted
        return
    # -- the last residual add (items of rows), then the final norm of the logit rows (quantized)
    n_blocks = _row_items(n, threads)
    i = claim(sync, phase)
    while i < n_blocks:
        r0, r1 = _rows_of(i, n_blocks, n)
        _residual_rows(x, s.out, r0, r1, vecs[n_layers - 1, V_POST_FFN, :d], hp)
        i = done_and_claim(sync, phase)
    phase = wait_done(sync, phase, n_blocks)
    head_in = s.head_in
    m_blocks = _row_items(m, threads)
    i = claim(sync, phase)
    while i < m_blocks:
        r0, r1 = _rows_of(i, m_blocks, m)
        for r in range(r0, r1):
            head_in[r] = x[logit_rows[r]]
        rms_norm_rows(head_in[r0:r1], output_norm, hp.norm_eps, head_in[r0:r1])
        _quantize_rows(head_in, r0, r1, s.q8_model)
        i = done_and_claim(sync, phase)
    phase = wait_warming(sync, phase, m_blocks, _first_bytes(weights, packed, head_mats[H_OUTPUT]))
    phase = wait_done(sync, phase, _linear(sync, phase, threads, weights, packed, head_mats[H_OUTPUT], m, s.q8_model,
                                           logits))
    if hp.logit_scale == 1.0 and hp.logit_softcap == 0.0:
        return
    # -- logit scaling (Granite) and soft-capping (Gemma 2): a row per item
    inverse = np.float32(1.0 / hp.logit_scale)  # llama.cpp scales by 1 / logit_scale in float32
    cap = hp.logit_softcap
    r = claim(sync, phase)
    while r < m:
        if hp.logit_scale != 1.0:
            for j in range(logits.shape[1]):
                logits[r, j] *= inverse
        if cap != 0.0:
            for j in range(logits.shape[1]):
                logits[r, j] = np.tanh(logits[r, j] / cap) * cap
        r = done_and_claim(sync, phase)
    wait_done(sync, phase, m)


@njit(cache=True)
def _reset(sync, n_phases):
    for p in range(n_phases):
        sync[p, 0] = 0
        sync[p, 1] = 0


@njit(cache=True, nogil=True, parallel=True)
def forward(tokens, positions, seqs, logit_rows, weights, packed, layer_mats, head_mats, vecs, output_norm,
            windows, rope_freqs, hp, k_cache, v_cache, s, logits):
    """Evaluate tokens (n,) at positions (n,) of sequences seqs (n,) (each row's K/V stored there), and write the
    logits of rows logit_rows (m,) into logits (m, n_vocab). Runs without the GIL (a server's event loop writes
    the last step's tokens meanwhile); callers must not run two at once (edgeinfer.backends.cpu holds a lock).

    layer_mats (n_layers, N_MAT) and head_mats (2,) of MATRIX records; vecs (n_layers, N_VEC, width) float32;
    windows (n_layers,) int64 (0: full attention); rope_freqs (n_layers, rope_dims / 2) float64, each layer's angle
    per position of each rotated pair (kernels_cpu.rope; all 0 on a layer without RoPE); hp a Hyper; v_cache a
    (values, scales) pair of shape (n_layers, n_seq, n_kv_heads, n_ctx, value_dim) in any cache type
    (kernels_cpu.kv_types), k_cache likewise in key blocks (n_layers, n_seq, n_kv_heads, n_ctx / 16, head_dim, 16);
    s a Scratch of at least n rows whose `threads` says the team's size.

    One parallel region: s.threads[0] threads each run every op, claiming items of it (kernels_cpu.team)."""
    _reset(s.sync, s.sync.shape[0])
    # The team's arrays without reference counting (kernels_cpu.borrow): the caller holds them through the call, and
    # both threads pass them to dozens of calls per layer. Handed to the region one by one and put back together
    # inside it: numba's parallel region takes arrays, scalars and flat tuples, not tuples of tuples.
    x, h, qkv, q, k, v = borrowed(s.x), borrowed(s.h), borrowed(s.qkv), borrowed(s.q), borrowed(s.k), borrowed(s.v)
    attn, gate_up, gate, up, out = borrowed(s.attn), borrowed(s.gate_up), borrowed(s.gate), borrowed(s.up), \
        borrowed(s.out)
    mq, md, ms = borrowed(s.q8_model[0]), borrowed(s.q8_model[1]), borrowed(s.q8_model[2])
    aq, ad, as_ = borrowed(s.q8_attn[0]), borrowed(s.q8_attn[1]), borrowed(s.q8_attn[2])
    fq, fd, fs = borrowed(s.q8_ff[0]), borrowed(s.q8_ff[1]), borrowed(s.q8_ff[2])
    head_in, rope_cos, rope_sin = borrowed(s.head_in), borrowed(s.rope_cos), borrowed(s.rope_sin)
    p_acc, p_m, p_l = borrowed(s.partials.acc), borrowed(s.partials.m), borrowed(s.partials.l)
    threads, sync = borrowed(s.threads), borrowed(s.sync)
    k0, k1, v0, v1 = borrowed(k_cache[0]), borrowed(k_cache[1]), borrowed(v_cache[0]), borrowed(v_cache[1])
    tokens, positions, seqs, logit_rows = borrowed(tokens), borrowed(positions), borrowed(seqs), borrowed(logit_rows)
    weights, packed, layer_mats, head_mats = borrowed(weights), borrowed(packed), borrowed(layer_mats), \
        borrowed(head_mats)
    vecs, output_norm, windows, rope_freqs = borrowed(vecs), borrowed(output_norm), borrowed(windows), \
        borrowed(rope_freqs)
    logits = borrowed(logits)
    for _ in prange(threads[0]):
        scratch = Scratch(x, h, qkv, q, k, v, attn, gate_up, gate, up, out, (mq, md, ms), (aq, ad, as_),
                          (fq, fd, fs), head_in, rope_cos, rope_sin, Partials(p_acc, p_m, p_l), threads, sync)
        _team_thread(tokens, positions, seqs, logit_rows, weights, packed, layer_mats, head_mats, vecs, output_norm,
                     windows, rope_freqs, hp, (k0, k1), (v0, v1), scratch, logits)
