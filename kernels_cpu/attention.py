"""Causal grouped-query attention of a batch of rows over a KV cache of sequences: tiled, with an online softmax.

The cache holds keys and values by layer, sequence, KV head and position, as (values, scales) pairs of any element
type (kernels_cpu.kv_types): v (n_layers, n_seq, n_kv_heads, n_ctx, d_v), k likewise in blocks of 16 positions,
each block transposed (n_layers, n_seq, n_kv_heads, n_ctx / 16, d_k, 16). Row i, a query at
position p of sequence s, attends to s's cached positions j <= p (and with window > 0 only to those with
p - j < window: llama.cpp's standard sliding window).

Flash attention (Dao et al.), as llama.cpp's CPU `flash_attn_ext` and the flash-decoding split do it:
- rows of one sequence that lie together in the batch (a prompt chunk, draft tokens) form a block; a job is one
  block and one KV head: the query vectors of every row of the block and every query head of that KV head's group
  (GQA) are scored against each key tile, so each key and value is read once per job, not once per query head;
- keys are scored 16 at a time, one SIMD vector per dimension of a key block times a query element: a decode row
  has as few as 1-7 query vectors per KV head, and this keeps all 16 lanes busy however few there are (with the
  query vectors across the lanes instead, a SmolLM2 decode row filled 3 of 16);
- keys are taken in tiles of TILE; a running maximum m, normalizer l and weighted sum of values per query vector
  absorb each tile (the online softmax), so no score row longer than a tile is ever held: memory does not grow with
  the context;
- tiles that no row of the block can see (beyond the causal edge or before the window) are skipped whole;
- keys are summed in chunks of CHUNK on one fixed grid (multiples of CHUNK from position 0): each chunk starts a
  fresh (m, l, sum) and the chunks are merged in order by one merge function. When a batch has too few jobs to keep
  every thread busy (decoding one or a few sequences over a long cache, a short block of new rows after a cached
  prefix), the chunks of a job run in parallel and are merged after, on all threads (flash-decoding: the second core
  helps at depth); otherwise one job merges them as it goes. Either
  way a row meets the same chunks, tiles and merges, so its result does not depend on how it was batched or split
  (speculative decoding and the prefix cache compare logits bit for bit).
Scores, exponentials and the weighted values are float32, the softmax's normalizer float64, as llama.cpp's CPU
softmax computes them (Gemma 3's parity at near-ties notices a float32 normalizer).
This module runs the jobs, the softmax and the merges; the register-blocked loops over one tile (scores, weighted
values) are in kernels_cpu.attention_tile.
"""
from collections import namedtuple

import numpy as np
from numba import njit, prange

from kernels_cpu._fp16 import bits_to_f32
from kernels_cpu.attention_tile import FASTMATH, TILE, tile_scores, tile_values
from kernels_cpu.borrow import borrowed
from kernels_cpu.kv_types import (KEY_BLOCK, head_view, hint_scales, quantize_queries, raw_keys, raw_rows, tile_keys,
                                  tile_rows)
from kernels_cpu.simd import (add_widened, exp_f32x16, hint_l2_part, hmax, load_f32x16, splat_f32x16, store_f32x16,
                              tree_sum, vmax, vsub, where_in_range, zero_f64x16)

CHUNK = 256  # keys per chunk of the fixed grid every job sums on (a multiple of TILE; see the module docstring)
QUERY_VECTORS = 64  # query vectors (rows x heads of a group) per job at most: a block's rows are 64 // group
# A batch with too few jobs for the threads runs each job's chunks on several threads (decode steps; the new rows of an
# agent's request after its cached prefix; a verify pass; a prompt's last chunk): Gemma 3 has one KV head, so 16 rows
# unsplit are one job and the second core idles; SmolLM2's 20 new rows after a 500-token prefix were 3 jobs on 2
# threads (3.9 ms of attention in a 9.4 ms step). The partials hold PARTIAL_SLOTS (chunk, row) pairs: a batch of n
# rows splits where its longest job has at most PARTIAL_SLOTS // n chunks (else it runs unsplit: the same result).
# They cost PARTIAL_SLOTS x heads x d_v floats: 2.4-4.2 MB here.
PARTIAL_SLOTS = 1024  # 64 chunks (16384 keys) of 16 rows, 16 chunks of 64 rows
JOBS_PER_THREAD = 8  # split until there are this many jobs per thread (even shares under static scheduling)
# Jobs of at most this many query vectors (decode rows: 1-7 per KV head here, 8 padded) read the cache's own type in
# the scoring and value loops, converting each vector as it is loaded; jobs of more (prompt blocks, which load each
# key once per 4 query vectors) widen a tile into float32 buffers first. Widening a 64-key tile of K and V wrote 32 KB
# of buffers (128 KB at head dim 256), all of the L1 cache: streaming a long f16 cache from DRAM then ran at 10-11
# GB/s, against 26-31 GB/s with 4 KB of buffers (the same conversions; measured on Zen 4).
READ_DIRECT = 8
# While a tile is worked on, the keys and values this many tiles ahead are hinted into L2, spread over its loops. A
# decode row's attention does too much arithmetic per byte for the core to keep enough cache misses in flight by
# itself: SmolLM2's layer at depth 4096 (f16, 1 thread) read its cache at 11 GB/s from DRAM, and now about as fast
# as from L3 (measured: 1 tile ahead 198-206 us a layer, 2: 217, 4: 230; before, 283-290).
PREFETCH_TILES = 1
# below this many multiply-adds per call, waking the worker threads costs more than it saves; from MANY_JOBS_WORK up,
# a call of at least 2 jobs per thread runs in parallel too (a decode step of several sequences over short caches:
# SmolLM2's 8 sequences at depth 32 took 1.47 ms of an 8 ms step on one thread, 0.90 on two, inside the forward)
PARALLEL_ATTENTION_WORK = 1 << 18
MANY_JOBS_WORK = 1 << 16

# partial results of split jobs, flat: acc (PARTIAL_SLOTS x n_heads x d_v), m and l (PARTIAL_SLOTS x n_heads; l
# float64); a call of n rows views them as (slots, n, n_heads[, d_v]) (_partials_view)
Partials = namedtuple("Partials", ["acc", "m", "l"])


def make_partials(n_heads: int, d_v: int) -> Partials:
    return Partials(np.zeros(PARTIAL_SLOTS * n_heads * d_v, np.float32), np.zeros(PARTIAL_SLOTS * n_heads, np.float32),
                    np.zeros(PARTIAL_SLOTS * n_heads, np.float64))


@njit(cache=True, inline="always")
def _partials_view(partials, n, n_heads, d_v):
    """The partials as (chunk slots, n rows, n_heads[, d_v]) arrays for a call of n rows: PARTIAL_SLOTS // n slots.
    Borrowed views (kernels_cpu.borrow): the caller holds `partials` through the call."""
    slots = partials.m.shape[0] // n_heads // n
    return (borrowed(partials.acc[:slots * n * n_heads * d_v].reshape((slots, n, n_heads, d_v))),
            borrowed(partials.m[:slots * n * n_heads].reshape((slots, n, n_heads))),
            borrowed(partials.l[:slots * n * n_heads].reshape((slots, n, n_heads))))


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


@njit(cache=True, inline="always")
def _extent(positions, starts, window):
    """(keys seen x rows, summed over the blocks; the most chunks one block's keys span)."""
    work, most_chunks = 0, 0
    for b in range(starts.shape[0] - 1):
        lo, hi = _key_range(positions, starts[b], starts[b + 1], window)
        work += (hi - lo) * (starts[b + 1] - starts[b])
        most_chunks = max(most_chunks, (hi + CHUNK - 1) // CHUNK - lo // CHUNK)
    return work, most_chunks


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
def _attend(queries, keys, key_scales, values, value_scales, softcap, low, high, nv, key_lo, key_hi, key_buf,
            value_buf, scores, correction, tile_max, acc, m, l, hint_end):
    """Absorb keys key_lo..key_hi-1 into (acc, m, l) of a job's nv query vectors: queries (attention_tile's
    tile_scores) hold query vector v (already scaled) in row v, low/high[v] the first and last key it sees. acc
    (rows, d_v), m, l (rows,) start at 0, -inf, 0; rows past nv are padding (4 vectors at a time share each value
    load). Coming tiles are hinted up to hint_end, the end of the keys this job reads (past it: positions nobody
    reads, or another thread's part).

    Each tile goes through three register-blocked steps (scores, online softmax, weighted values) in which every
    query vector's arithmetic is the same whichever row or job it is in: a row's result does not depend on its
    batch."""
    # tiles on multiples of TILE: every row meets the same tiles (and sums) in a block as alone
    for t0 in range(key_lo - key_lo % TILE, key_hi, TILE):
        t1 = min(t0 + TILE, key_hi)
        if nv <= READ_DIRECT:
            # the tile whose keys and values are hinted in meanwhile (the next chunk's too: this call sees one chunk)
            a0 = min(t0 + PREFETCH_TILES * TILE, hint_end)
            a1 = min(a0 + TILE, hint_end)
            ahead_keys, ahead_values = keys[a0 // KEY_BLOCK:(a1 + KEY_BLOCK - 1) // KEY_BLOCK], values[a0:a1]
            hint_scales(keys, key_scales, value_scales, a0, a1)
            tile_keys_, tile_key_scales = raw_keys(keys, key_scales, t0, t1)
            tile_values, tile_value_scales = raw_rows(values, value_scales, t0, t1)
            _tile_step(queries, tile_keys_, tile_key_scales, tile_values, tile_value_scales, softcap, t0, t1, low,
                       high, nv, scores, correction, tile_max, acc, m, l, ahead_keys, ahead_values)
        else:
            tile_keys_, tile_key_scales = tile_keys(keys, key_scales, t0, t1, key_buf)
            _tile_step(queries, tile_keys_, tile_key_scales, tile_rows(values, value_scales, t0, t1, value_buf),
                       value_scales, softcap, t0, t1, low, high, nv, scores, correction, tile_max, acc, m, l, None,
                       None)


@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def _tile_step(queries, keys, key_scales, values, value_scales, softcap, t0, t1, low, high, nv, scores, correction,
               tile_max, acc, m, l, ahead_keys, ahead_values):
    """One tile: scores, online softmax, weighted values (keys and values float32, or in the cache's type); the
    cache's ahead_keys and ahead_values (a coming tile) hinted into L2 meanwhile."""
    tile_scores(queries, keys, key_scales, nv, softcap, scores, ahead_keys)
    _tile_softmax(scores, keys.shape[0], t0, low, high, nv, m, l, correction, tile_max)
    tile_values(scores, values, value_scales, t1 - t0, nv, correction, acc, ahead_values)


@njit(cache=True, fastmath=FASTMATH)
def _tile_softmax(scores, n_blocks, t0, low, high, nv, m, l, correction, tile_max):
    """The online softmax step for query vectors 0..nv-1 over the tile's keys t0..t0 + 16 n_blocks - 1: each score
    becomes exp(s - m') (0 where the vector does not see the key), m[v] becomes the new maximum m', l[v] the
    rescaled normalizer plus this tile's weights (summed in one fixed order: 16 lanes across the blocks, then
    tree_sum), and correction[v] = exp(m - m') the factor the vector's value sum must be rescaled by (1 where it sees
    no key of the tile). In passes over all the vectors, so that the scalar steps of one vector (its maximum, its
    correction, its sum) overlap those of the next instead of waiting on each other's latency."""
    end = t0 + n_blocks * KEY_BLOCK - 1
    for v in range(nv):  # each vector's maximum over the keys it sees
        lo, hi = low[v], high[v]
        whole = lo <= t0 and end <= hi  # the vector sees every key of the tile (away from the causal edge, window)
        best = splat_f32x16(-np.inf)
        for b in range(n_blocks):
            s = load_f32x16(scores, v * TILE + b * KEY_BLOCK)
            if not whole:
                s = where_in_range(s, t0 + b * KEY_BLOCK, lo, hi, -np.inf)
            best = vmax(best, s)
        tile_max[v] = hmax(best)
    for v in range(nv):  # the new maxima (kept in tile_max) and the factors the old sums are rescaled by
        old, seen = m[v], tile_max[v]
        new_max = max(old, seen)
        correction[v] = exp_f32(old - new_max) if old > -np.inf else np.float32(1.0 if seen == -np.inf else 0.0)
        tile_max[v] = new_max
    for v in range(nv):  # weights and their sum
        lo, hi = low[v], high[v]
        whole = lo <= t0 and end <= hi
        shift = splat_f32x16(tile_max[v])
        total = zero_f64x16()  # float64, as llama.cpp's softmax sums (ggml_vec_soft_max_f32 returns a double)
        for b in range(n_blocks):
            weight = exp_f32x16(vsub(load_f32x16(scores, v * TILE + b * KEY_BLOCK), shift))
            if not whole:
                weight = where_in_range(weight, t0 + b * KEY_BLOCK, lo, hi, 0.0)  # unseen keys weigh (and add) 0
            store_f32x16(scores, v * TILE + b * KEY_BLOCK, weight)
            total = add_widened(total, weight)
        l[v] = l[v] * correction[v] + tree_sum(total)
        m[v] = tile_max[v]


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
def _vector_limits(positions, r0, r1, window, group, low, high):
    """Per query vector (row-major over the block's rows and the group's heads): the first and last key it sees, into
    low and high; padding vectors see every key (their results are never read)."""
    low[:] = 0
    high[:] = np.iinfo(np.int64).max
    for r in range(r0, r1):
        p = positions[r]
        for g in range(group):
            v = (r - r0) * group + g
            low[v] = max(p - window + 1, 0) if window > 0 else 0
            high[v] = p


@njit(cache=True, inline="always")
def _workspace(rows, d_k, d_v):
    """One thread's buffers for the jobs of one call, each of up to `rows` query vectors: allocated once per thread,
    not once per job (a dozen allocations per job took a fifth of an 8-sequence SmolLM2 step's attention at depth 16:
    38 -> 31 us for its 24 jobs on 2 threads)."""
    qs = _aligned_f32(rows, d_k, 0)  # the query vectors by rows, scaled
    q8 = np.empty((rows, d_k), np.int8)  # and as q8_0 (for q8_0 keys): values, scales, dot_i8_biased's start
    qd = np.empty((rows, d_k // 32), np.float32)
    q_bias = np.empty((rows, d_k // 32), np.int32)
    key_buf = _aligned_f32(TILE // KEY_BLOCK * d_k, KEY_BLOCK, 1).reshape((TILE // KEY_BLOCK, d_k, KEY_BLOCK))
    value_buf = _aligned_f32(TILE, d_v, 2)
    scores = _aligned_f32(rows, TILE, 3)
    acc = _aligned_f32(rows, d_v, 4)  # one chunk's sums
    total_acc = _aligned_f32(rows, d_v, 5)  # the merged chunks' sums
    vectors_f32 = np.empty((4, rows), np.float32)  # correction, tile_max, m, total_m
    vectors_f64 = np.empty((2, rows), np.float64)  # l, total_l
    limits = np.empty((2, rows), np.int64)  # low, high
    return (qs, q8, qd, q_bias), key_buf, value_buf, scores, acc, total_acc, vectors_f32, vectors_f64, limits


@njit(cache=True, inline="always")
def _job_rows(starts, group):
    """The most query vectors (with the values step's padding to fours) any job of these blocks holds."""
    most = 0
    for b in range(starts.shape[0] - 1):
        most = max(most, (starts[b + 1] - starts[b]) * group)
    return (most + 3) // 4 * 4


@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def _job(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, part_acc, part_m, part_l, starts, n_kv,
         n_parts, chunks_per_part, job, work):
    """Job = (block, KV head, part). n_parts == 0: all the block's chunks, each merged into the running result as it
    is done, the result into out. Else part `part` of n_parts: chunks first + part * chunks_per_part onwards (at most
    chunks_per_part of them), each chunk's (acc, m, l) into the partials at its slot (chunk - first), merged after
    by _merge_partials (passed as arrays, not the Partials tuple: numba loses writes through a named tuple's fields
    inside prange). work: the calling thread's _workspace."""
    part, kv_head, block = _job_place(job, starts, n_kv, n_parts)
    r0, r1 = starts[block], starts[block + 1]
    key_lo, key_hi = _key_range(positions, r0, r1, window)
    n_heads, d_k, d_v = q.shape[1], q.shape[2], out.shape[2]
    group = n_heads // n_kv
    nv = (r1 - r0) * group
    rows = (nv + 3) // 4 * 4  # query vectors with padding: the values step takes them in fours
    keys, key_scales = head_view(k_pair[0], k_pair[1], layer, seqs[r0], kv_head)
    values, value_scales = head_view(v_pair[0], v_pair[1], layer, seqs[r0], kv_head)
    (qs_all, q8_all, qd_all, q_bias_all), key_buf, value_buf, scores_all, acc_all, total_acc_all, vectors_f32, \
        vectors_f64, limits = work
    # the workspace's arrays without reference counting: the caller's `work` holds them through every job
    qs_all, q8_all, qd_all, q_bias_all = borrowed(qs_all), borrowed(q8_all), borrowed(qd_all), borrowed(q_bias_all)
    key_buf, value_buf, scores_all = borrowed(key_buf), borrowed(value_buf), borrowed(scores_all)
    acc_all, total_acc_all, limits = borrowed(acc_all), borrowed(total_acc_all), borrowed(limits)
    vectors_f32, vectors_f64 = borrowed(vectors_f32), borrowed(vectors_f64)
    qs = qs_all[:rows]  # the query vectors by rows, scaled; padding rows 0
    qs[:] = 0.0
    for r in range(r0, r1):
        for g in range(group):
            for c in range(d_k):
                qs[(r - r0) * group + g, c] = q[r, kv_head * group + g, c] * np.float32(scale)
    queries = (qs, q8_all[:rows], qd_all[:rows], q_bias_all[:rows])
    quantize_queries(keys, qs, nv, queries[1], queries[2], queries[3])
    low, high = limits[0, :rows], limits[1, :rows]
    _vector_limits(positions, r0, r1, window, group, low, high)
    scores = scores_all[:rows]
    scores[:] = 0.0  # padding rows weigh 0 (their sums are never read: no stray denormals or NaNs)
    correction, tile_max, m = vectors_f32[0, :rows], vectors_f32[1, :rows], vectors_f32[2, :rows]
    correction[:] = 0.0
    l = vectors_f64[0, :rows]
    acc = acc_all[:rows]  # one chunk's sums
    first, end = key_lo // CHUNK, (key_hi + CHUNK - 1) // CHUNK  # the block's chunks: first..end-1
    if n_parts > 0:
        first_slot = part * chunks_per_part
        part_end = min(key_hi, (first + first_slot + chunks_per_part) * CHUNK)  # the next part is another job's
        for slot in range(first_slot, min(first_slot + chunks_per_part, part_m.shape[0])):
            c = first + slot
            _fresh(acc, m, l)
            if c < end:
                _attend(queries, keys, key_scales, values, value_scales, softcap, low, high, nv,
                        max(key_lo, c * CHUNK), min(key_hi, (c + 1) * CHUNK), key_buf, value_buf, scores,
                        correction, tile_max, acc, m, l, part_end)
            for v in range(nv):  # every slot is written (-inf: nothing), so no earlier call's partial survives
                r, h = r0 + v // group, kv_head * group + v % group
                part_m[slot, r, h] = m[v]
                part_l[slot, r, h] = l[v]
                for i in range(d_v):
                    part_acc[slot, r, h, i] = acc[v, i]
        return
    # One chunk: merging it into nothing gives its own sums (total = acc, l exactly), so it finishes from them. (A
    # first-chunk copy inside _merge_chunk instead, for every job, was slower: 8 SmolLM2 rows at depth 32, warm, 1
    # thread, 17.1-18.8 us a layer against 15.3.)
    if end - first == 1:
        _fresh(acc, m, l)
        _attend(queries, keys, key_scales, values, value_scales, softcap, low, high, nv, key_lo, key_hi, key_buf,
                value_buf, scores, correction, tile_max, acc, m, l, key_hi)
        for v in range(nv):
            _finish(acc[v], l[v], out[r0 + v // group, kv_head * group + v % group])
        return
    total_acc, total_m, total_l = total_acc_all[:nv], vectors_f32[3, :nv], vectors_f64[1, :nv]
    total_acc[:] = 0.0
    total_m[:] = -np.inf
    total_l[:] = 0.0
    for c in range(first, end):
        _fresh(acc, m, l)
        _attend(queries, keys, key_scales, values, value_scales, softcap, low, high, nv, max(key_lo, c * CHUNK),
                min(key_hi, (c + 1) * CHUNK), key_buf, value_buf, scores, correction, tile_max, acc, m, l, key_hi)
        for v in range(nv):
            _merge_chunk(total_acc[v], total_m, total_l, v, acc[v], m[v], l[v])
    for v in range(nv):
        _finish(total_acc[v], total_l[v], out[r0 + v // group, kv_head * group + v % group])


@njit(cache=True, inline="always")
def _job_place(job, starts, n_kv, n_parts):
    """(part, KV head, block) of job number `job` (parts vary fastest, blocks slowest, in zigzag order)."""
    parts = max(n_parts, 1)
    return job % parts, (job // parts) % n_kv, _zigzag(job // (parts * n_kv), starts.shape[0] - 1)


@njit(cache=True, inline="always")
def _hint_job(positions, seqs, k_pair, v_pair, layer, window, starts, n_kv, n_parts, chunks_per_part, job):
    """Hint into L2 the first tile of keys and values job `job` will read (nothing past the last job): a decode
    step's jobs each start with a tile the weights streamed past since the last step evicted, and a job over a short
    cache is nothing but that tile, so the next job's lines arrive while this one computes."""
    if job >= (starts.shape[0] - 1) * n_kv * max(n_parts, 1):
        return
    part, kv_head, block = _job_place(job, starts, n_kv, n_parts)
    key_lo, key_hi = _key_range(positions, starts[block], starts[block + 1], window)
    t0 = key_lo - key_lo % TILE
    if n_parts > 0:
        t0 = max(t0, (key_lo // CHUNK + part * chunks_per_part) * CHUNK)
    t1 = min(t0 + TILE, key_hi)
    if t1 <= t0:
        return
    keys, _ = head_view(k_pair[0], k_pair[1], layer, seqs[starts[block]], kv_head)
    values, _ = head_view(v_pair[0], v_pair[1], layer, seqs[starts[block]], kv_head)
    first_keys, first_values = keys[t0 // KEY_BLOCK:(t1 + KEY_BLOCK - 1) // KEY_BLOCK], values[t0:t1]
    hint_l2_part(first_keys, 0, first_keys.size)
    hint_l2_part(first_values, 0, first_values.size)


@njit(cache=True, inline="always")
def _fresh(acc, m, l):
    acc[:] = 0.0
    m[:] = -np.inf
    l[:] = 0.0


# The merge and the final division are the only arithmetic that differs between one job and a split one: each is one
# compiled function without fast-math (no contraction into fused multiply-adds, no reassociation), so it computes
# the same bits wherever it is called from. fastmath=False is said explicitly: a function that leaves it unset
# inherits its caller's flags, and _job's are fast.
@njit(cache=True, error_model="numpy", fastmath=False)
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


@njit(cache=True, error_model="numpy", fastmath=False)
def _finish(total_acc, total_l, out):
    inverse = np.float32(1.0 / total_l)
    for i in range(out.shape[0]):
        out[i] = total_acc[i] * inverse


@njit(cache=True, inline="always")
def _zigzag(i, n):
    """0, n-1, 1, n-2, ...: blocks late in a prompt see more keys, so interleave them with early ones before
    static scheduling hands out consecutive jobs."""
    return i // 2 if i % 2 == 0 else n - 1 - i // 2


@njit(cache=True, parallel=True, error_model="numpy")
def _merge_partials(part_acc, part_m, part_l, n_slots, out):
    """out[r, h] = the chunks' partial results in the slots 0..n_slots-1, merged in order as one job merges them;
    the (row, head) pairs across the threads. (Serial, with buffers per pair, SmolLM2's 20 new rows after a
    500-token prefix merged their 540 chunks in 34 us a layer, 1 ms a step; now 9.5 us. One row at depth 4096: 8.5
    -> 5.0 us.)"""
    n_heads = out.shape[1]
    total_m = np.empty(out.shape[0] * n_heads, np.float32)
    total_l = np.empty(out.shape[0] * n_heads, np.float64)
    for i in prange(out.shape[0] * n_heads):
        _merge_pair(part_acc, part_m, part_l, n_slots, out, i // n_heads, i % n_heads, total_m, total_l, i)


@njit(cache=True, inline="always", error_model="numpy")
def _merge_pair(part_acc, part_m, part_l, n_slots, out, r, h, total_m, total_l, v):
    """out[r, h] = the partials of slots 0..n_slots-1 merged in order (total_m[v], total_l[v]: the running maximum
    and normalizer). The sums are built in place in out, then divided by the normalizer."""
    total_acc = out[r, h]
    total_acc[:] = 0.0
    total_m[v], total_l[v] = -np.inf, 0.0
    for slot in range(n_slots):
        _merge_chunk(total_acc, total_m, total_l, v, part_acc[slot, r, h], part_m[slot, r, h], part_l[slot, r, h])
    _finish(total_acc, total_l[v], total_acc)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def _jobs_parallel(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, part_acc, part_m, part_l,
                   starts, n_kv, n_parts, chunks_per_part, threads):
    """The jobs dealt round-robin to `threads` workers, each with its own workspace (zigzag order keeps the shares
    even)."""
    n_jobs = (starts.shape[0] - 1) * n_kv * max(n_parts, 1)
    workers = min(threads, n_jobs)
    rows = _job_rows(starts, q.shape[1] // n_kv)
    for worker in prange(workers):
        work = _workspace(rows, q.shape[2], out.shape[2])
        for job in range(worker, n_jobs, workers):
            _hint_job(positions, seqs, k_pair, v_pair, layer, window, starts, n_kv, n_parts, chunks_per_part,
                      job + workers)
            _job(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, part_acc, part_m, part_l,
                 starts, n_kv, n_parts, chunks_per_part, job, work)


@njit(cache=True)
def split_plan(n_jobs, most_chunks, slots, threads):
    """(parts per job, chunks per part) for a call of n_jobs jobs whose longest spans most_chunks chunks, with
    partials of `slots` chunk slots: (0, 0) (unsplit) where there are jobs enough for the threads, a job has one
    chunk, or the partials cannot hold its chunks; else parts enough for JOBS_PER_THREAD jobs per thread."""
    if n_jobs >= JOBS_PER_THREAD * threads or not 2 <= most_chunks <= slots:
        return 0, 0
    wanted = min((JOBS_PER_THREAD * threads + n_jobs - 1) // n_jobs, most_chunks)
    chunks_per_part = (most_chunks + wanted - 1) // wanted
    return (most_chunks + chunks_per_part - 1) // chunks_per_part, chunks_per_part


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def attention_rows(q, positions, seqs, k_pair, v_pair, layer, scale, window, out, partials, threads, softcap=0.0):
    """A batch over a cache of sequences: q (n, n_heads, d_k), row i at positions[i] of sequence seqs[i], against
    layer `layer` of the cache pairs k_pair, v_pair -> out (n, n_heads, d_v). partials: make_partials(n_heads, d_v);
    softcap > 0: each scaled score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2);
    threads: how many threads the parallel regions run on (numba's get_num_threads in compiled code would make the
    caller uncacheable).
    Small work (one query over a short cache) runs on the calling thread: waking the workers would cost more."""
    # views without reference counting (kernels_cpu.borrow): the caller holds these arrays through the call, and a
    # job takes dozens of views of them (both threads at once, of the same arrays)
    q, positions, seqs, out = borrowed(q), borrowed(positions), borrowed(seqs), borrowed(out)
    k_pair, v_pair = (borrowed(k_pair[0]), borrowed(k_pair[1])), (borrowed(v_pair[0]), borrowed(v_pair[1]))
    n, n_heads, d_k = q.shape
    n_kv = k_pair[0].shape[2]
    group = n_heads // n_kv
    starts = _blocks(seqs, max(1, QUERY_VECTORS // group))
    n_blocks = starts.shape[0] - 1
    work, most_chunks = _extent(positions, starts, window)
    work *= n_heads * d_k
    many_jobs = n_blocks * n_kv >= 2 * threads and work >= MANY_JOBS_WORK
    part_acc, part_m, part_l = _partials_view(partials, n, n_heads, out.shape[2])
    if threads == 1 or (work < PARALLEL_ATTENTION_WORK and not many_jobs):
        work = _workspace(_job_rows(starts, group), d_k, out.shape[2])
        for job in range(n_blocks * n_kv):
            _hint_job(positions, seqs, k_pair, v_pair, layer, window, starts, n_kv, 0, 0, job + 1)
            _job(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, part_acc, part_m, part_l,
                 starts, n_kv, 0, 0, job, work)
        return
    n_parts, chunks_per_part = split_plan(n_blocks * n_kv, most_chunks, part_m.shape[0], threads)
    _jobs_parallel(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, part_acc, part_m, part_l,
                   starts, n_kv, n_parts, chunks_per_part, threads)
    if n_parts > 0:
        _merge_partials(part_acc, part_m, part_l, min(n_parts * chunks_per_part, part_m.shape[0]), out)


# ---------------------------------------------------------------- a layer's attention shared by a team (forward.py)

@njit(cache=True)
def team_blocks(seqs, n_heads, n_kv):
    """The blocks (as _blocks) a batch's rows form for any layer: the same in every layer of one forward pass."""
    return _blocks(seqs, max(1, QUERY_VECTORS // (n_heads // n_kv)))


@njit(cache=True)
def team_workspace(starts, n_heads, n_kv, d_k, d_v):
    """One team thread's buffers for the attention jobs of a forward pass (as _workspace), and a pair of
    one-element arrays for its merges (a running maximum and normalizer)."""
    work = _workspace(_job_rows(starts, n_heads // n_kv), d_k, d_v)
    return work, np.empty(1, np.float32), np.empty(1, np.float64)


@njit(cache=True)
def team_split(positions, starts, window, n_heads, n_kv, d_k, n_rows, partials, threads):
    """(parts per job, chunks per part) for a team of `threads` over one layer: split as attention_rows splits
    (never on one thread, or where the work is too small to be worth a merge), else (0, 0)."""
    work, most_chunks = _extent(positions, starts, window)
    if threads == 1 or work * n_heads * d_k < PARALLEL_ATTENTION_WORK:
        return 0, 0
    return split_plan((starts.shape[0] - 1) * n_kv, most_chunks, partials.m.shape[0] // n_heads // n_rows, threads)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def team_jobs(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, partials, starts, n_kv, n_parts,
              chunks_per_part, job0, job1, hint, work):
    """Attention jobs job0..job1-1 of a layer (as _jobs_parallel runs them) on the calling team thread, with its
    workspace `work`, each job hinting the first tile of the next (the last: of job `hint`, the one this thread
    will likely claim next) into L2 first. The caller's arrays come borrowed (kernels_cpu.borrow)."""
    part_acc, part_m, part_l = _partials_view(partials, q.shape[0], q.shape[1], out.shape[2])
    for job in range(job0, job1):
        _hint_job(positions, seqs, k_pair, v_pair, layer, window, starts, n_kv, n_parts, chunks_per_part,
                  job + 1 if job + 1 < job1 else hint)
        _job(q, positions, seqs, k_pair, v_pair, layer, scale, softcap, window, out, part_acc, part_m, part_l, starts,
             n_kv, n_parts, chunks_per_part, job, work)


@njit(cache=True, error_model="numpy")
def team_merge(partials, n_slots, out, i0, i1, total_m, total_l):
    """_merge_partials' (row, head) pairs i0..i1-1 (i = row * n_heads + head) on the calling team thread;
    total_m, total_l: its one-element buffers."""
    n, n_heads, d_v = out.shape
    part_acc, part_m, part_l = _partials_view(partials, n, n_heads, d_v)
    for i in range(i0, i1):
        _merge_pair(part_acc, part_m, part_l, n_slots, out, i // n_heads, i % n_heads, total_m, total_l, 0)
