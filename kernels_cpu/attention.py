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

TILE = 64  # keys per tile
CHUNK = 256  # keys per chunk of the fixed grid every job sums on (a multiple of TILE; see the module docstring)
QUERY_VECTORS = 64  # query vectors (rows x heads of a group) per job at most: a block's rows are 64 // group
SPLIT_ROWS = 8  # batches of at most this many rows may run each job's chunks on several threads
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
def _attend(queries, keys, key_scales, values, value_scales, softcap, low, high, group, key_lo, key_hi, key_buf,
            value_buf, scores, correction, acc, m, l):
    """Absorb keys key_lo..key_hi-1 into (acc, m, l) of a block's query vectors (vector v = row * group + g, already
    scaled); low/high: the first and last key each row sees. acc (nv, d_v), m, l (nv,) start at 0, -inf, 0.

    Each step works on a whole tile in a compiled loop of its own (scores, softmax, values): LLVM vectorizes those,
    where the same loops inlined into this nest came out scalar."""
    # tiles on multiples of TILE: every row meets the same tiles (and sums) in a block as alone
    for t0 in range(key_lo - key_lo % TILE, key_hi, TILE):
        t1 = min(t0 + TILE, key_hi)
        _tile_scores(queries, tile_rows(keys, key_scales, t0, t1, key_buf), softcap, scores)
        _tile_softmax(scores, t1 - t0, t0, low, high, group, m, l, correction)
        _tile_values(scores, tile_rows(values, value_scales, t0, t1, value_buf), correction, acc)


@njit(cache=True, fastmath=FASTMATH)
def _tile_scores(queries, keys, softcap, scores):
    """scores[v, j] = queries[v] . keys[j] for the tile's keys (n, d) (float32); with softcap > 0 capped to
    softcap * tanh(score / softcap) (Gemma 2's attention logit soft-capping, as llama.cpp's flash attention)."""
    for v in range(queries.shape[0]):
        qv = queries[v]
        for j in range(keys.shape[0]):
            kj = keys[j]
            s = np.float32(0.0)
            for c in range(kj.shape[0]):
                s += qv[c] * kj[c]
            scores[v, j] = s
    if softcap > 0.0:
        cap = np.float32(softcap)
        inverse = np.float32(1.0 / softcap)
        for v in range(queries.shape[0]):
            for j in range(keys.shape[0]):
                scores[v, j] = cap * np.tanh(scores[v, j] * inverse)


@njit(cache=True, fastmath=FASTMATH)
def _tile_softmax(scores, n, t0, low, high, group, m, l, correction):
    """The online softmax step: each vector's scores of keys t0..t0+n-1 become exp(s - m') (0 where the row does
    not see the key), m[v] becomes the new maximum m', l[v] the rescaled normalizer plus this tile's weights, and
    correction[v] = exp(m - m') the factor the vector's value sum must be rescaled by."""
    for v in range(scores.shape[0]):
        r = v // group
        a, b = max(low[r] - t0, 0), min(high[r] - t0 + 1, n)  # the keys of this tile row r sees: a..b-1
        row = scores[v]
        if a >= b:
            for j in range(n):
                row[j] = 0.0
            correction[v] = 1.0
            continue
        best = row[a]
        for j in range(a, b):
            best = max(best, row[j])
        new_m = max(m[v], best)
        correction[v] = exp_f32(m[v] - new_m) if m[v] > -np.inf else np.float32(0.0)
        for j in range(n):
            e = exp_f32(row[j] - new_m)
            row[j] = e if a <= j < b else np.float32(0.0)
        # summed over exactly the visible keys, so a row's sum is the same whichever block it is computed in (the
        # int8 activations downstream turn a last-bit difference into visibly different logits)
        total = 0.0  # float64, as llama.cpp's softmax sums (ggml_vec_soft_max_f32 returns a double)
        for j in range(a, b):
            total += row[j]
        l[v] = l[v] * correction[v] + total
        m[v] = new_m


@njit(cache=True, fastmath=FASTMATH)
def _tile_values(weights, values, correction, acc):
    """acc[v] = acc[v] * correction[v] + sum over the tile's keys j of weights[v, j] * values[j]."""
    for v in range(acc.shape[0]):
        out = acc[v]
        c_v = correction[v]
        if c_v != 1.0:
            for c in range(out.shape[0]):
                out[c] *= c_v
        w = weights[v]
        for j in range(values.shape[0]):
            wj = w[j]
            vj = values[j]
            for c in range(out.shape[0]):
                out[c] += wj * vj[c]


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
def _row_limits(positions, r0, r1, window):
    """Per row of the block: the first and last key it sees."""
    low = np.empty(r1 - r0, np.int64)
    high = np.empty(r1 - r0, np.int64)
    for r in range(r0, r1):
        p = positions[r]
        low[r - r0] = max(p - window + 1, 0) if window > 0 else 0
        high[r - r0] = p
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
    keys, key_scales = head_view(k_pair[0], k_pair[1], layer, seqs[r0], kv_head)
    values, value_scales = head_view(v_pair[0], v_pair[1], layer, seqs[r0], kv_head)
    queries = np.empty((nv, d_k), np.float32)
    for r in range(r0, r1):
        for g in range(group):
            for c in range(d_k):
                queries[(r - r0) * group + g, c] = q[r, kv_head * group + g, c] * np.float32(scale)
    low, high = _row_limits(positions, r0, r1, window)
    key_buf = np.empty((TILE, d_k), np.float32)
    value_buf = np.empty((TILE, d_v), np.float32)
    scores = np.empty((nv, TILE), np.float32)
    correction = np.empty(nv, np.float32)
    acc = np.empty((nv, d_v), np.float32)  # one chunk's sums
    m = np.empty(nv, np.float32)
    l = np.empty(nv, np.float64)
    first, end = key_lo // CHUNK, (key_hi + CHUNK - 1) // CHUNK  # the block's chunks: first..end-1
    if n_parts > 0:
        first_slot = part * chunks_per_part
        for slot in range(first_slot, min(first_slot + chunks_per_part, part_m.shape[0])):
            c = first + slot
            _fresh(acc, m, l)
            if c < end:
                _attend(queries, keys, key_scales, values, value_scales, softcap, low, high, group,
                        max(key_lo, c * CHUNK), min(key_hi, (c + 1) * CHUNK), key_buf, value_buf, scores, correction,
                        acc, m, l)
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
        _attend(queries, keys, key_scales, values, value_scales, softcap, low, high, group, max(key_lo, c * CHUNK),
                min(key_hi, (c + 1) * CHUNK), key_buf, value_buf, scores, correction, acc, m, l)
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
