"""Causal grouped-query attention of a batch of rows over a KV cache of sequences: tiled, with an online softmax.

The cache holds keys and values by layer, sequence, KV head and position, as (values, scales) pairs of any element
type (kernels_cpu.kv_types): k (n_layers, n_seq, n_kv_heads, n_ctx, d_k), v likewise with d_v. Row i, a query at
position p of sequence s, attends to s's cached positions j <= p (and with window > 0 only to those with
p - j < window: llama.cpp's standard sliding window).

Flash attention (Dao et al.), as llama.cpp's CPU `flash_attn_ext` and the flash-decoding split do it:
- rows of one sequence that lie together in the batch (a prompt chunk, draft tokens) form a block; a job is one
  block and one KV head: the query vectors of every row of the block and every query head of that KV head's group
  (GQA) are scored against each key tile, so each key and value is read once per job, not once per query head;
- keys are taken in tiles of TILE; a running maximum m, normalizer l and weighted sum of values per query vector
  absorb each tile (the online softmax), so no score row longer than a tile is ever held: memory does not grow with
  the context;
- tiles that no row of the block can see (beyond the causal edge or before the window) are skipped whole;
- keys are summed in chunks of CHUNK on one fixed grid (multiples of CHUNK from position 0): each chunk starts a
  fresh (m, l, sum) and the chunks are merged in order by one merge function. When a batch has too few jobs to keep
  every thread busy (decoding one or a few sequences over a long cache), the chunks of a job run in parallel and are
  merged after (flash-decoding: the second core helps at depth); otherwise one job merges them as it goes. Either
  way a row meets the same chunks, tiles and merges, so its result does not depend on how it was batched or split
  (speculative decoding and the prefix cache compare logits bit for bit).
Scores, exponentials and the weighted values are float32, the softmax's normalizer float64, as llama.cpp's CPU
softmax computes them (Gemma 3's parity at near-ties notices a float32 normalizer).
"""
from collections import namedtuple

import numpy as np
from numba import njit, prange

from kernels_cpu._fp16 import bits_to_f32
from kernels_cpu.kv_types import head_view, tile_rows
from kernels_cpu.simd import (PATH, add_widened, exp_f32x16, fma_f32x16, load_f32x16, splat_f32x16, store_f32x16,
                              store_f64x16, vmax, vmul, vsub, where_seen, zero_f32x16, zero_f64x16)

TILE = 64  # keys per tile
LANES = 16  # query vectors per SIMD vector: a job's query vectors lie across the lanes of f32x16 values
WIDE_VALUES = PATH == "avx512vnni"  # 32 vector registers: the weighted values in blocks of 4 vectors x 64 dims
CHUNK = 256  # keys per chunk of the fixed grid every job sums on (a multiple of TILE; see the module docstring)
QUERY_VECTORS = 64  # query vectors (rows x heads of a group) per job at most: a block's rows are 64 // group
# batches of at most this many rows may run each job's chunks on several threads: decode steps, and the new rows of
# an agent's request after its cached prefix or a verify pass (Gemma 3 has one KV head: unsplit, 16 rows are one job
# and the second core idles). The partials cost MAX_CHUNKS x SPLIT_ROWS x heads x d_v floats: 4-8 MB here.
SPLIT_ROWS = 16
PARTIAL_ROWS = SPLIT_ROWS  # rows the partials hold
MAX_CHUNKS = 64  # chunks a split job's partials hold (16384 keys); a longer job runs unsplit (the same result)
JOBS_PER_THREAD = 8  # split until there are this many jobs per thread (even shares under static scheduling)
# fast float math, but with infinities kept: -inf marks a vector that has seen no key yet
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# below this many multiply-adds per call, waking the worker threads costs more than it saves
PARALLEL_ATTENTION_WORK = 1 << 18

# partial results of split jobs: acc (MAX_CHUNKS, PARTIAL_ROWS, n_heads, d_v), m and l (MAX_CHUNKS, PARTIAL_ROWS, n_heads;
# l float64)
Partials = namedtuple("Partials", ["acc", "m", "l"])


def make_partials(n_heads: int, d_v: int) -> Partials:
    return Partials(np.zeros((MAX_CHUNKS, PARTIAL_ROWS, n_heads, d_v), np.float32),
                    np.zeros((MAX_CHUNKS, PARTIAL_ROWS, n_heads), np.float32),
                    np.zeros((MAX_CHUNKS, PARTIAL_ROWS, n_heads), np.float64))


@njit(cache=True)
def _blocks(seqs, rows_per_block):
    """Start rows of the blocks (runs of rows of one sequence, at most rows_per_block long), and n as the last."""
    n = seqs.shape[0]
    starts = np.empty(n + 1, np.int64)
    k = 0
    for i in range(n):
        if i == 0 or seqs[i] != seqs[i - 1] or i - starts[k - 1] >= rows_per_block:
            starts[k] = i
            k += 1
    starts[k] = n
    return starts[:k + 1]


@njit(cache=True)
def _key_range(positions, r0, r1, window):
    """[first, end) of the keys any row r0..r1-1 can see."""
    lo, hi = positions[r0], positions[r0]
    for r in range(r0, r1):
        lo = min(lo, positions[r])
        hi = max(hi, positions[r])
    first = lo - window + 1 if window > 0 else 0
    return max(first, 0), hi + 1


@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def _attend(qt, keys, key_scales, values, value_scales, softcap, lane_low, lane_high, nv, key_lo, key_hi, key_buf,
            value_buf, scores, work, acc, m, l):
    """Absorb keys key_lo..key_hi-1 into (acc, m, l) of a job's query vectors, which lie across SIMD lanes: qt
    (d_k, lanes) holds query vector v (already scaled) in column v, lane_low/high[v] the first and last key it sees;
    the first nv are real, the rest padding. acc (lanes, d_v), m, l (lanes,) start at 0, -inf, 0.

    Each tile goes through three register-blocked steps (scores, online softmax, weighted values) in which every
    query vector's arithmetic is the same whichever lane or job it is in: a row's result does not depend on its
    batch."""
    lanes = qt.shape[1]
    # tiles on multiples of TILE: every row meets the same tiles (and sums) in a block as alone
    for t0 in range(key_lo - key_lo % TILE, key_hi, TILE):
        t1 = min(t0 + TILE, key_hi)
        n = t1 - t0
        tile_keys = tile_rows(keys, key_scales, t0, t1, key_buf)
        tile_values = tile_rows(values, value_scales, t0, t1, value_buf)
        for lane0 in range(0, lanes, LANES):
            _tile_scores(qt, tile_keys, n, lane0, softcap, scores)
            _tile_softmax(scores, n, t0, lane0, lane_low, lane_high, m, l, work)
        _tile_values(scores, tile_values, n, nv, work.correction, acc)


# per-lane scratch of the online softmax: this tile's maximum and normalizer, the new maximum, the factor the value
# sums are rescaled by (correction: one per query vector of the job)
SoftmaxWork = namedtuple("SoftmaxWork", ["tile_max", "new_max", "tile_sum", "correction"])


@njit(cache=True, inline="always")
def _softmax_work(lanes):
    return SoftmaxWork(np.empty(LANES, np.float32), np.empty(LANES, np.float32), np.empty(LANES, np.float64),
                       np.empty(lanes, np.float32))


@njit(cache=True, fastmath=FASTMATH)
def _tile_scores(qt, keys, n, lane0, softcap, scores):
    """scores[j, lane0:lane0 + 16] = keys[j] . the query vectors of those lanes, for the tile's n keys: each score one
    chain of fused multiply-adds over the dimensions in order, four keys at a time sharing each load of the queries
    (float32); with softcap > 0 capped to softcap * tanh(score / softcap) (Gemma 2's attention logit soft-capping,
    as llama.cpp's flash attention)."""
    lanes, d = qt.shape[1], keys.shape[1]
    j = 0
    if WIDE_VALUES:  # 8 independent chains keep both FMA units busy (4 leave half their issue slots empty)
        while j + 8 <= n:
            k0, k1, k2, k3 = keys[j], keys[j + 1], keys[j + 2], keys[j + 3]
            k4, k5, k6, k7 = keys[j + 4], keys[j + 5], keys[j + 6], keys[j + 7]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero_f32x16()
            for c in range(d):
                q = load_f32x16(qt, c * lanes + lane0)
                a0 = fma_f32x16(q, splat_f32x16(k0[c]), a0)
                a1 = fma_f32x16(q, splat_f32x16(k1[c]), a1)
                a2 = fma_f32x16(q, splat_f32x16(k2[c]), a2)
                a3 = fma_f32x16(q, splat_f32x16(k3[c]), a3)
                a4 = fma_f32x16(q, splat_f32x16(k4[c]), a4)
                a5 = fma_f32x16(q, splat_f32x16(k5[c]), a5)
                a6 = fma_f32x16(q, splat_f32x16(k6[c]), a6)
                a7 = fma_f32x16(q, splat_f32x16(k7[c]), a7)
            for k, a in enumerate((a0, a1, a2, a3, a4, a5, a6, a7)):
                store_f32x16(scores, (j + k) * lanes + lane0, a)
            j += 8
    while j + 4 <= n:
        k0, k1, k2, k3 = keys[j], keys[j + 1], keys[j + 2], keys[j + 3]
        a0 = a1 = a2 = a3 = zero_f32x16()
        for c in range(d):
            q = load_f32x16(qt, c * lanes + lane0)
            a0 = fma_f32x16(q, splat_f32x16(k0[c]), a0)
            a1 = fma_f32x16(q, splat_f32x16(k1[c]), a1)
            a2 = fma_f32x16(q, splat_f32x16(k2[c]), a2)
            a3 = fma_f32x16(q, splat_f32x16(k3[c]), a3)
        store_f32x16(scores, j * lanes + lane0, a0)
        store_f32x16(scores, (j + 1) * lanes + lane0, a1)
        store_f32x16(scores, (j + 2) * lanes + lane0, a2)
        store_f32x16(scores, (j + 3) * lanes + lane0, a3)
        j += 4
    while j < n:
        kj = keys[j]
        a0 = zero_f32x16()
        for c in range(d):
            a0 = fma_f32x16(load_f32x16(qt, c * lanes + lane0), splat_f32x16(kj[c]), a0)
        store_f32x16(scores, j * lanes + lane0, a0)
        j += 1
    if softcap > 0.0:
        cap = np.float32(softcap)
        inverse = np.float32(1.0 / softcap)
        for j in range(n):
            row = scores[j]
            for i in range(LANES):
                row[lane0 + i] = cap * np.tanh(row[lane0 + i] * inverse)


@njit(cache=True, fastmath=FASTMATH)
def _tile_softmax(scores, n, t0, lane0, lane_low, lane_high, m, l, work):
    """The online softmax step for the 16 query vectors of lanes lane0..: their scores of keys t0..t0+n-1 become
    exp(s - m') (0 where the vector does not see the key), m[v] becomes the new maximum m', l[v] the rescaled
    normalizer plus this tile's weights, and correction[v] = exp(m - m') the factor the vector's value sum must be
    rescaled by (1 where it sees no key of the tile). Whole vectors of 16 lanes, so every lane takes the same code
    whether or not the tile needs masking."""
    lanes = scores.shape[1]
    tile_max, new_max, tile_sum, correction = work.tile_max, work.new_max, work.tile_sum, work.correction
    last = t0 + n - 1
    whole = True  # every lane sees every key of the tile (the common case, away from the causal edge and window)
    for i in range(lane0, lane0 + LANES):
        whole = whole and lane_low[i] <= t0 and last <= lane_high[i]
    best = splat_f32x16(-np.inf)
    for j in range(n):
        row = load_f32x16(scores, j * lanes + lane0)
        if not whole:
            row = where_seen(row, lane_low, lane_high, lane0, t0 + j, -np.inf)
        best = vmax(best, row)
    store_f32x16(tile_max, 0, best)
    for i in range(LANES):
        v = lane0 + i
        if tile_max[i] == -np.inf:  # the vector sees no key of this tile
            new_max[i] = m[v]
            correction[v] = 1.0
        else:
            new_max[i] = max(m[v], tile_max[i])
            correction[v] = exp_f32(m[v] - new_max[i]) if m[v] > -np.inf else np.float32(0.0)
    shift = load_f32x16(new_max, 0)
    total = zero_f64x16()  # float64, as llama.cpp's softmax sums (ggml_vec_soft_max_f32 returns a double)
    for j in range(n):
        weight = exp_f32x16(vsub(load_f32x16(scores, j * lanes + lane0), shift))
        if not whole:
            weight = where_seen(weight, lane_low, lane_high, lane0, t0 + j, 0.0)  # unseen keys weigh (and add) 0
        store_f32x16(scores, j * lanes + lane0, weight)
        total = add_widened(total, weight)
    store_f64x16(tile_sum, 0, total)
    for i in range(LANES):
        v = lane0 + i
        l[v] = l[v] * correction[v] + tile_sum[i]
        m[v] = new_max[i]


@njit(cache=True, fastmath=FASTMATH)
def _tile_values(weights, values, n, nv, correction, acc):
    """acc[v] = acc[v] * correction[v] + sum over the tile's n keys j of weights[j, v] * values[j], for the first nv
    query vectors: each output lane one chain of fused multiply-adds over the keys in order, blocks of 4 vectors x
    64 (or x 16) dims held in registers across the tile."""
    lanes, d_v = weights.shape[1], values.shape[1]
    for v0 in range(0, nv, 4):
        c0 = 0
        if WIDE_VALUES:
            while c0 + 64 <= d_v:
                _values_4x64(weights, values, n, v0, c0, lanes, correction, acc)
                c0 += 64
        while c0 < d_v:
            _values_4x16(weights, values, n, v0, c0, lanes, correction, acc)
            c0 += 16


@njit(cache=True, inline="always")
def _values_4x16(weights, values, n, v0, c0, lanes, correction, acc):
    d_v = acc.shape[1]
    a0 = vmul(load_f32x16(acc, v0 * d_v + c0), splat_f32x16(correction[v0]))
    a1 = vmul(load_f32x16(acc, (v0 + 1) * d_v + c0), splat_f32x16(correction[v0 + 1]))
    a2 = vmul(load_f32x16(acc, (v0 + 2) * d_v + c0), splat_f32x16(correction[v0 + 2]))
    a3 = vmul(load_f32x16(acc, (v0 + 3) * d_v + c0), splat_f32x16(correction[v0 + 3]))
    for j in range(n):
        x = load_f32x16(values[j], c0)
        w = weights[j]
        a0 = fma_f32x16(splat_f32x16(w[v0]), x, a0)
        a1 = fma_f32x16(splat_f32x16(w[v0 + 1]), x, a1)
        a2 = fma_f32x16(splat_f32x16(w[v0 + 2]), x, a2)
        a3 = fma_f32x16(splat_f32x16(w[v0 + 3]), x, a3)
    store_f32x16(acc, v0 * d_v + c0, a0)
    store_f32x16(acc, (v0 + 1) * d_v + c0, a1)
    store_f32x16(acc, (v0 + 2) * d_v + c0, a2)
    store_f32x16(acc, (v0 + 3) * d_v + c0, a3)


@njit(cache=True, inline="always")
def _values_4x64(weights, values, n, v0, c0, lanes, correction, acc):
    """_values_4x16 over 64 dims at once: 16 accumulators (AVX-512's 32 registers hold them; AVX2's 16 do not)."""
    d_v = acc.shape[1]
    s0, s1 = splat_f32x16(correction[v0]), splat_f32x16(correction[v0 + 1])
    s2, s3 = splat_f32x16(correction[v0 + 2]), splat_f32x16(correction[v0 + 3])
    r0, r1, r2, r3 = v0 * d_v + c0, (v0 + 1) * d_v + c0, (v0 + 2) * d_v + c0, (v0 + 3) * d_v + c0
    a00, a01 = vmul(load_f32x16(acc, r0), s0), vmul(load_f32x16(acc, r0 + 16), s0)
    a02, a03 = vmul(load_f32x16(acc, r0 + 32), s0), vmul(load_f32x16(acc, r0 + 48), s0)
    a10, a11 = vmul(load_f32x16(acc, r1), s1), vmul(load_f32x16(acc, r1 + 16), s1)
    a12, a13 = vmul(load_f32x16(acc, r1 + 32), s1), vmul(load_f32x16(acc, r1 + 48), s1)
    a20, a21 = vmul(load_f32x16(acc, r2), s2), vmul(load_f32x16(acc, r2 + 16), s2)
    a22, a23 = vmul(load_f32x16(acc, r2 + 32), s2), vmul(load_f32x16(acc, r2 + 48), s2)
    a30, a31 = vmul(load_f32x16(acc, r3), s3), vmul(load_f32x16(acc, r3 + 16), s3)
    a32, a33 = vmul(load_f32x16(acc, r3 + 32), s3), vmul(load_f32x16(acc, r3 + 48), s3)
    for j in range(n):
        row = values[j]
        x0, x1 = load_f32x16(row, c0), load_f32x16(row, c0 + 16)
        x2, x3 = load_f32x16(row, c0 + 32), load_f32x16(row, c0 + 48)
        w = weights[j]
        w0 = splat_f32x16(w[v0])
        a00, a01, a02, a03 = fma_f32x16(w0, x0, a00), fma_f32x16(w0, x1, a01), fma_f32x16(w0, x2, a02), \
            fma_f32x16(w0, x3, a03)
        w1 = splat_f32x16(w[v0 + 1])
        a10, a11, a12, a13 = fma_f32x16(w1, x0, a10), fma_f32x16(w1, x1, a11), fma_f32x16(w1, x2, a12), \
            fma_f32x16(w1, x3, a13)
        w2 = splat_f32x16(w[v0 + 2])
        a20, a21, a22, a23 = fma_f32x16(w2, x0, a20), fma_f32x16(w2, x1, a21), fma_f32x16(w2, x2, a22), \
            fma_f32x16(w2, x3, a23)
        w3 = splat_f32x16(w[v0 + 3])
        a30, a31, a32, a33 = fma_f32x16(w3, x0, a30), fma_f32x16(w3, x1, a31), fma_f32x16(w3, x2, a32), \
            fma_f32x16(w3, x3, a33)
    store_f32x16(acc, r0, a00)
    store_f32x16(acc, r0 + 16, a01)
    store_f32x16(acc, r0 + 32, a02)
    store_f32x16(acc, r0 + 48, a03)
    store_f32x16(acc, r1, a10)
    store_f32x16(acc, r1 + 16, a11)
    store_f32x16(acc, r1 + 32, a12)
    store_f32x16(acc, r1 + 48, a13)
    store_f32x16(acc, r2, a20)
    store_f32x16(acc, r2 + 16, a21)
    store_f32x16(acc, r2 + 32, a22)
    store_f32x16(acc, r2 + 48, a23)
    store_f32x16(acc, r3, a30)
    store_f32x16(acc, r3 + 16, a31)
    store_f32x16(acc, r3 + 32, a32)
    store_f32x16(acc, r3 + 48, a33)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def exp_f32(x):
    """e**x in float32 within 2 ulp (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r, times 2**n); a
    branch-free body that LLVM vectorizes across a tile (numba's np.exp is a libm call per element). Inputs are
    clamped to [-87, 88]: exp(-87) ~ 1.6e-38 stands in for 0, which only masked keys would need."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * bits_to_f32((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(cache=True, inline="always")
def _aligned_f32(rows, cols, color):
    """An uninitialized float32 (rows, cols) array starting `color` x 9 cache lines into a 4 KB page. Two reasons:
    numba aligns arrays to 32 bytes, and a 64-byte vector load from a misaligned row splits across two cache lines;
    and buffers of 16 KB allocated one after another share their offsets within a page, so the loads of one falsely
    wait on the stores to another at the same offset (4K aliasing): each job's buffers get their own color. Either
    costs up to 40% of the kernel's speed, differently in each process."""
    raw = np.empty(rows * cols + 1024, np.float32)
    skip = ((color * 576 - raw.ctypes.data) % 4096) // 4
    return raw[skip:skip + rows * cols].reshape((rows, cols))


@njit(cache=True, inline="always")
def _lane_limits(positions, r0, r1, window, group, lanes):
    """Per query vector (row-major over the block's rows and the group's heads): the first and last key it sees;
    padding lanes see every key (their results are never read, and they never break a tile's fast path)."""
    low = np.zeros(lanes, np.int64)
    high = np.full(lanes, np.iinfo(np.int64).max, np.int64)
    for r in range(r0, r1):
        p = positions[r]
        for g in range(group):
            v = (r - r0) * group + g
            low[v] = max(p - window + 1, 0) if window > 0 else 0
            high[v] = p
    return low, high


@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def _job(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, part_acc, part_m, part_l, starts, n_kv,
         n_parts, chunks_per_part, job):
    """Job = (block, KV head, part). n_parts == 0: all the block's chunks, each merged into the running result as it
    is done, the result into out. Else part `part` of n_parts: chunks first + part * chunks_per_part onwards (at most
    chunks_per_part of them), each chunk's (acc, m, l) into the partials at its slot (chunk - first), merged after
    by _merge_partials (passed as arrays, not the Partials tuple: numba loses writes through a named tuple's fields
    inside prange)."""
    parts = max(n_parts, 1)
    part = job % parts
    kv_head = (job // parts) % n_kv
    block = _zigzag(job // (parts * n_kv), starts.shape[0] - 1)
    r0, r1 = starts[block], starts[block + 1]
    key_lo, key_hi = _key_range(positions, r0, r1, window)
    n_heads, d_k, d_v = q.shape[1], q.shape[2], out.shape[2]
    group = n_heads // n_kv
    nv = (r1 - r0) * group
    lanes = (nv + LANES - 1) // LANES * LANES
    keys, key_scales = head_view(k_pair[0], k_pair[1], layer, seqs[r0], kv_head)
    values, value_scales = head_view(v_pair[0], v_pair[1], layer, seqs[r0], kv_head)
    qt = _aligned_f32(d_k, lanes, 0)  # the query vectors across lanes, scaled; padding lanes 0
    qt[:] = 0.0
    for r in range(r0, r1):
        for g in range(group):
            for c in range(d_k):
                qt[c, (r - r0) * group + g] = q[r, kv_head * group + g, c] * np.float32(scale)
    low, high = _lane_limits(positions, r0, r1, window, group, lanes)
    key_buf = _aligned_f32(TILE, d_k, 1)
    value_buf = _aligned_f32(TILE, d_v, 2)
    scores = _aligned_f32(TILE, lanes, 3)
    work = _softmax_work(lanes)
    acc = _aligned_f32(lanes, d_v, 4)  # one chunk's sums
    m = np.empty(lanes, np.float32)
    l = np.empty(lanes, np.float64)
    first, end = key_lo // CHUNK, (key_hi + CHUNK - 1) // CHUNK  # the block's chunks: first..end-1
    if n_parts > 0:
        first_slot = part * chunks_per_part
        for slot in range(first_slot, min(first_slot + chunks_per_part, part_m.shape[0])):
            c = first + slot
            _fresh(acc, m, l)
            if c < end:
                _attend(qt, keys, key_scales, values, value_scales, softcap, low, high, nv, max(key_lo, c * CHUNK),
                        min(key_hi, (c + 1) * CHUNK), key_buf, value_buf, scores, work, acc, m, l)
            for v in range(nv):  # every slot is written (-inf: nothing), so no earlier call's partial survives
                r, h = r0 + v // group, kv_head * group + v % group
                part_m[slot, r, h] = m[v]
                part_l[slot, r, h] = l[v]
                for i in range(d_v):
                    part_acc[slot, r, h, i] = acc[v, i]
        return
    total_acc = np.zeros((nv, d_v), np.float32)
    total_m = np.full(nv, -np.inf, np.float32)
    total_l = np.zeros(nv, np.float64)
    for c in range(first, end):
        _fresh(acc, m, l)
        _attend(qt, keys, key_scales, values, value_scales, softcap, low, high, nv, max(key_lo, c * CHUNK),
                min(key_hi, (c + 1) * CHUNK), key_buf, value_buf, scores, work, acc, m, l)
        for v in range(nv):
            _merge_chunk(total_acc[v], total_m, total_l, v, acc[v], m[v], l[v])
    for v in range(nv):
        _finish(total_acc[v], total_l[v], out[r0 + v // group, kv_head * group + v % group])


@njit(cache=True, inline="always")
def _fresh(acc, m, l):
    acc[:] = 0.0
    m[:] = -np.inf
    l[:] = 0.0


# The merge and the final division are the only arithmetic that differs between one job and a split one: each is one
# compiled function without fast-math (no contraction into fused multiply-adds, no reassociation), so it computes
# the same bits wherever it is called from.
@njit(cache=True, error_model="numpy")
def _merge_chunk(total_acc, total_m, total_l, v, acc, m, l):
    """Fold one chunk's (acc, m, l) of vector v into the running (total_acc (d_v,), total_m[v], total_l[v])."""
    if m == -np.inf:  # the vector saw no key of this chunk
        return
    new_m = max(total_m[v], m)
    old_weight = np.exp(np.float64(total_m[v]) - np.float64(new_m))  # 0 while nothing was merged yet
    chunk_weight = np.exp(np.float64(m) - np.float64(new_m))
    total_l[v] = total_l[v] * old_weight + l * chunk_weight
    old32, chunk32 = np.float32(old_weight), np.float32(chunk_weight)
    for i in range(total_acc.shape[0]):
        total_acc[i] = total_acc[i] * old32 + acc[i] * chunk32
    total_m[v] = new_m


@njit(cache=True, error_model="numpy")
def _finish(total_acc, total_l, out):
    inverse = np.float32(1.0 / total_l)
    for i in range(out.shape[0]):
        out[i] = total_acc[i] * inverse


@njit(cache=True, inline="always")
def _zigzag(i, n):
    """0, n-1, 1, n-2, ...: blocks late in a prompt see more keys, so interleave them with early ones before
    static scheduling hands out consecutive jobs."""
    return i // 2 if i % 2 == 0 else n - 1 - i // 2


@njit(cache=True, error_model="numpy")
def _merge_partials(part_acc, part_m, part_l, n_slots, out):
    """out[r, h] = the chunks' partial results in the slots 0..n_slots-1, merged in order as one job merges them."""
    total_m = np.empty(1, np.float32)
    total_l = np.empty(1, np.float64)
    total_acc = np.empty(out.shape[2], np.float32)
    for r in range(out.shape[0]):
        for h in range(out.shape[1]):
            total_acc[:] = 0.0
            total_m[0] = -np.inf
            total_l[0] = 0.0
            for slot in range(n_slots):
                _merge_chunk(total_acc, total_m, total_l, 0, part_acc[slot, r, h], part_m[slot, r, h],
                             part_l[slot, r, h])
            _finish(total_acc, total_l[0], out[r, h])


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def _jobs_parallel(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, part_acc, part_m, part_l,
                   starts, n_kv, n_parts, chunks_per_part):
    for job in prange((starts.shape[0] - 1) * n_kv * max(n_parts, 1)):
        _job(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, part_acc, part_m, part_l, starts,
             n_kv, n_parts, chunks_per_part, job)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def attention_rows(q, positions, seqs, k_pair, v_pair, layer, scale, window, out, partials, threads, softcap=0.0):
    """A batch over a cache of sequences: q (n, n_heads, d_k), row i at positions[i] of sequence seqs[i], against
    layer `layer` of the cache pairs k_pair, v_pair -> out (n, n_heads, d_v). partials: make_partials(n_heads, d_v);
    softcap > 0: each scaled score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2);
    threads: how many threads the parallel regions run on (numba's get_num_threads in compiled code would make the
    caller uncacheable).
    Small work (one query over a short cache) runs on the calling thread: waking the workers would cost more."""
    n, n_heads, d_k = q.shape
    n_kv = k_pair[0].shape[2]
    group = n_heads // n_kv
    starts = _blocks(seqs, max(1, QUERY_VECTORS // group))
    n_blocks = starts.shape[0] - 1
    work, most_chunks = 0, 0
    for b in range(n_blocks):
        lo, hi = _key_range(positions, starts[b], starts[b + 1], window)
        work += (hi - lo) * (starts[b + 1] - starts[b])
        most_chunks = max(most_chunks, (hi + CHUNK - 1) // CHUNK - lo // CHUNK)
    if work * n_heads * d_k < PARALLEL_ATTENTION_WORK or threads == 1:
        for job in range(n_blocks * n_kv):
            _job(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, partials.acc, partials.m,
                 partials.l, starts, n_kv, 0, 0, job)
        return
    n_parts, chunks_per_part = 0, 0
    if (n <= SPLIT_ROWS and n_blocks * n_kv < JOBS_PER_THREAD * threads and 2 <= most_chunks <= MAX_CHUNKS):
        wanted = (JOBS_PER_THREAD * threads + n_blocks * n_kv - 1) // (n_blocks * n_kv)
        chunks_per_part = (most_chunks + min(wanted, most_chunks) - 1) // min(wanted, most_chunks)
        n_parts = (most_chunks + chunks_per_part - 1) // chunks_per_part
    _jobs_parallel(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, partials.acc, partials.m,
                   partials.l, starts, n_kv, n_parts, chunks_per_part)
    if n_parts > 0:
        _merge_partials(partials.acc, partials.m, partials.l, min(n_parts * chunks_per_part, MAX_CHUNKS), out)
