"""Y = X @ W.T for a block of tokens with int8 activations: the prefill counterpart of matvec_q8.

Repacked weights (16 rows interleaved, repack.repack) go through tile kernels: each thread takes a group of 16
rows and runs it against the tokens 4 at a time (1 or 2 left over: a tile of 2), so a weight block is loaded and
unpacked once per 4 tokens and stays in L1 for the rest. Each token's accumulation is exactly matvec_q8's (the same
per-block steps, in the same order), so a prompt evaluated in one block gives the same logits as the same tokens
decoded one at a time (as in llama.cpp). Raw ggml blocks (types without a repacked layout, or shapes that do not split into groups of 16) loop
matvec_q8 over the tokens.
"""
import numpy as np
from numba import literally, njit, prange

from kernels_cpu.activations_q8 import quantize_activations_rows
from kernels_cpu.borrow import borrowed
from kernels_cpu.formats import check_out
from kernels_cpu.kernel_thread import call_parallel
from kernels_cpu.matvec_q8 import (Q6_SUPER, PREFETCH_GROUPS, add_block16, add_block_k4_16, add_block_q6_16,
                                   check_weights, matvec_q8_dispatch, super_k4_16)
from kernels_cpu.q8_layouts import (FASTMATH, GROUP, Q4_0_R, Q4_1_R, Q4_K_R, Q5_0_R, Q5_1_R, Q5_K_R, Q6_K_R, Q8_0_R,
                                    half_block_sums)
from kernels_cpu.simd import PATH, halves_f32x16, hint_l2_part, hint_share, store_f32x16, zero_f32x16

TILE = 4  # tokens per tile: 4 float accumulators of 16 rows
# On AVX-512 (32 vector registers) batches of 8 or more of Q8_0 (every LM head here) take 8 tokens per tile: each
# 512-byte block is loaded once per 8 tokens and a group is read once, in order, by a decode step of 8 sequences.
# Measured on Qwen2.5's head (151936 x 896, 2 threads, streamed from DRAM): 8 rows 6.25 -> 4.2-4.6 ms. The formats
# that unpack their weights (Q4/Q5/Q6, K-quants) gained nothing measurable from 8 (their unpacked block and 8
# accumulators crowd the registers), so they keep 4 and compile no 8-token code.
WIDE_TILE = PATH == "avx512vnni"


# A group's first tile reads its weights from DRAM and computes on them for 4 tokens, so it hints the same block of
# the group PREFETCH_GROUPS ahead into L2 at each block (simd.hint_l2_part; `ahead` None: no hints); its other tiles
# find the group in L1. (Into L1, as matvec_q8's hints, they made the tiles slower: 5-7% over SmolLM2's matrices.
# Into L2, Qwen2.5's matrices for 8 rows at 2 threads took 20.3 ms instead of 25.5, for 13 rows 34.0 instead of
# 41.5. A run-time switch in the block loop instead of None cost prompts 3.6%.)


@njit(cache=True)
def _tiles_and_last(n_tokens):
    """(tiles of 4 tokens, tokens left for a tile of 2): the last tile of 4 may hold 3 (one repeated: 4 tokens'
    arithmetic for 3 costs less than a tile of 2 and one of 1), 1 or 2 left go to a tile of 2."""
    n_tiles = (n_tokens + 1) // TILE
    return n_tiles, max(0, n_tokens - TILE * n_tiles)


@njit(cache=True)
def _tile_tokens(tile, n_tokens):
    """Tokens 4 tile .. 4 tile + 3, the last one repeated past the end (its row is written twice, same values)."""
    last = n_tokens - 1
    t = TILE * tile
    return min(t, last), min(t + 1, last), min(t + 2, last), min(t + 3, last)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _group_tile4(w, g, t0, t1, t2, t3, xq, xd, xs, sums16, out, n_blocks, type_id, ahead):
    """out[t, 16 g:16 g + 16] for the 4 tokens t0..t3 of group g (w: its weights), hinting the same bytes of
    `ahead` (a later group; None: no hints) as the loop goes."""
    a0 = a1 = a2 = a3 = zero_f32x16()
    if type_id == Q6_K_R:
        share = hint_share(ahead, n_blocks // 8)
        for sb in range(n_blocks // 8):
            o = Q6_SUPER * sb
            hint_l2_part(ahead, sb, share)
            d = halves_f32x16(w, o)
            for j in range(8):
                b = 8 * sb + j
                a0 = add_block_q6_16(a0, w, o, d, j, b, xq[t0], xd[t0], sums16[t0])
                a1 = add_block_q6_16(a1, w, o, d, j, b, xq[t1], xd[t1], sums16[t1])
                a2 = add_block_q6_16(a2, w, o, d, j, b, xq[t2], xd[t2], sums16[t2])
                a3 = add_block_q6_16(a3, w, o, d, j, b, xq[t3], xd[t3], sums16[t3])
    elif type_id == Q4_K_R or type_id == Q5_K_R:
        share = hint_share(ahead, n_blocks // 8)
        for sb in range(n_blocks // 8):
            o, d, dmin = super_k4_16(w, sb, type_id)
            hint_l2_part(ahead, sb, share)
            for j in range(8):
                b = 8 * sb + j
                a0 = add_block_k4_16(a0, w, o, d, dmin, j, b, xq[t0], xd[t0], xs[t0], type_id)
                a1 = add_block_k4_16(a1, w, o, d, dmin, j, b, xq[t1], xd[t1], xs[t1], type_id)
                a2 = add_block_k4_16(a2, w, o, d, dmin, j, b, xq[t2], xd[t2], xs[t2], type_id)
                a3 = add_block_k4_16(a3, w, o, d, dmin, j, b, xq[t3], xd[t3], xs[t3], type_id)
    else:
        share = hint_share(ahead, n_blocks)
        for b in range(n_blocks):
            hint_l2_part(ahead, b, share)
            a0 = add_block16(a0, w, b, xq[t0], xd[t0], xs[t0], type_id)
            a1 = add_block16(a1, w, b, xq[t1], xd[t1], xs[t1], type_id)
            a2 = add_block16(a2, w, b, xq[t2], xd[t2], xs[t2], type_id)
            a3 = add_block16(a3, w, b, xq[t3], xd[t3], xs[t3], type_id)
    store_f32x16(out[t3], GROUP * g, a3)
    store_f32x16(out[t2], GROUP * g, a2)
    store_f32x16(out[t1], GROUP * g, a1)
    store_f32x16(out[t0], GROUP * g, a0)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _group_tile2(w, g, t0, t1, xq, xd, xs, sums16, out, n_blocks, type_id):
    """_group_tile4 for the last 1 or 2 tokens of a batch (t1 = t0 for one): a batch of 2 (two sequences decoding,
    one guess to verify) or 4k + 1, 4k + 2 rows no longer pays 4 tokens' arithmetic for its last tile."""
    a0 = a1 = zero_f32x16()
    if type_id == Q6_K_R:
        for sb in range(n_blocks // 8):
            o = Q6_SUPER * sb
            d = halves_f32x16(w, o)
            for j in range(8):
                b = 8 * sb + j
                a0 = add_block_q6_16(a0, w, o, d, j, b, xq[t0], xd[t0], sums16[t0])
                a1 = add_block_q6_16(a1, w, o, d, j, b, xq[t1], xd[t1], sums16[t1])
    elif type_id == Q4_K_R or type_id == Q5_K_R:
        for sb in range(n_blocks // 8):
            o, d, dmin = super_k4_16(w, sb, type_id)
            for j in range(8):
                b = 8 * sb + j
                a0 = add_block_k4_16(a0, w, o, d, dmin, j, b, xq[t0], xd[t0], xs[t0], type_id)
                a1 = add_block_k4_16(a1, w, o, d, dmin, j, b, xq[t1], xd[t1], xs[t1], type_id)
    else:
        for b in range(n_blocks):
            a0 = add_block16(a0, w, b, xq[t0], xd[t0], xs[t0], type_id)
            a1 = add_block16(a1, w, b, xq[t1], xd[t1], xs[t1], type_id)
    store_f32x16(out[t1], GROUP * g, a1)
    store_f32x16(out[t0], GROUP * g, a0)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _group_tile8_q8_0(w, g, t, xq, xd, xs, out, n_blocks, ahead):
    """out[t:t + 8, 16 g:16 g + 16] for group g of repacked Q8_0 (w: its weights): _group_tile4's steps for 8
    tokens at once."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero_f32x16()
    x0, x1, x2, x3, x4, x5, x6, x7 = xq[t], xq[t + 1], xq[t + 2], xq[t + 3], xq[t + 4], xq[t + 5], xq[t + 6], xq[t + 7]
    d0, d1, d2, d3, d4, d5, d6, d7 = xd[t], xd[t + 1], xd[t + 2], xd[t + 3], xd[t + 4], xd[t + 5], xd[t + 6], xd[t + 7]
    share = hint_share(ahead, n_blocks)
    for b in range(n_blocks):
        hint_l2_part(ahead, b, share)
        a0 = add_block16(a0, w, b, x0, d0, xs[t], Q8_0_R)
        a1 = add_block16(a1, w, b, x1, d1, xs[t + 1], Q8_0_R)
        a2 = add_block16(a2, w, b, x2, d2, xs[t + 2], Q8_0_R)
        a3 = add_block16(a3, w, b, x3, d3, xs[t + 3], Q8_0_R)
        a4 = add_block16(a4, w, b, x4, d4, xs[t + 4], Q8_0_R)
        a5 = add_block16(a5, w, b, x5, d5, xs[t + 5], Q8_0_R)
        a6 = add_block16(a6, w, b, x6, d6, xs[t + 6], Q8_0_R)
        a7 = add_block16(a7, w, b, x7, d7, xs[t + 7], Q8_0_R)
    store_f32x16(out[t], GROUP * g, a0)
    store_f32x16(out[t + 1], GROUP * g, a1)
    store_f32x16(out[t + 2], GROUP * g, a2)
    store_f32x16(out[t + 3], GROUP * g, a3)
    store_f32x16(out[t + 4], GROUP * g, a4)
    store_f32x16(out[t + 5], GROUP * g, a5)
    store_f32x16(out[t + 6], GROUP * g, a6)
    store_f32x16(out[t + 7], GROUP * g, a7)


@njit(cache=True, inline="always")
def _sums16(xq, type_id):
    """Q6_K's offsets need x's sums per 16 elements (the other layouts: none, an empty array)."""
    n_tokens = xq.shape[0]
    sums16 = np.zeros((n_tokens, xq.shape[1] // 16 if type_id == Q6_K_R else 0), np.int32)
    if type_id == Q6_K_R:
        for t in range(n_tokens):
            sums16[t] = half_block_sums(xq[t])
    return sums16


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matmul_tiles16(packed, xq, xd, xs, out, type_id):
    """out[t, 16 g:16 g + 16] for every token t and group g of a repacked layout (type_id a constant);
    xq (n_tokens, n), xd/xs (n_tokens, n // 32), out (n_tokens, n_rows). Each token's sums are the same whichever
    tile it is in."""
    literally(type_id)
    sums16 = _sums16(xq, type_id)
    # without reference counting (kernels_cpu.borrow): both threads take views of these arrays for every group
    packed, xq, xd, xs, out = borrowed(packed), borrowed(xq), borrowed(xd), borrowed(xs), borrowed(out)
    for g in prange(packed.shape[0]):
        _tiles16_group(packed, g, xq, xd, xs, sums16, out, type_id)


@njit(cache=True, fastmath=FASTMATH)
def matmul_tiles16_part(packed, xq, xd, xs, out, type_id, g0, g1):
    """matmul_tiles16's groups g0..g1-1 on the calling thread: a share of a team's matrix product (the caller's
    arrays borrowed: kernels_cpu.borrow)."""
    literally(type_id)
    sums16 = _sums16(xq, type_id)
    packed, xq, xd, xs, out = borrowed(packed), borrowed(xq), borrowed(xd), borrowed(xs), borrowed(out)
    for g in range(g0, g1):
        _tiles16_group(packed, g, xq, xd, xs, sums16, out, type_id)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _tiles16_group(packed, g, xq, xd, xs, sums16, out, type_id):
    n_tokens, n_blocks = xd.shape
    n_tiles, last = _tiles_and_last(n_tokens)
    w, ahead = packed[g], packed[min(g + PREFETCH_GROUPS, packed.shape[0] - 1)]
    for tile in range(n_tiles):
        t0, t1, t2, t3 = _tile_tokens(tile, n_tokens)
        if tile == 0 and n_tokens >= TILE:  # (a tile of repeated tokens hinting: 3-9% slower)
            _group_tile4(w, g, t0, t1, t2, t3, xq, xd, xs, sums16, out, n_blocks, type_id, ahead)
        else:
            _group_tile4(w, g, t0, t1, t2, t3, xq, xd, xs, sums16, out, n_blocks, type_id, None)
    if last > 0:
        t = TILE * n_tiles
        _group_tile2(w, g, t, t + last - 1, xq, xd, xs, sums16, out, n_blocks, type_id)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matmul_tiles16_q8_0_wide(packed, xq, xd, xs, out):
    """matmul_tiles16 for repacked Q8_0 with the tokens in tiles of 8, the rest in tiles of 4 (AVX-512 only: the 8
    accumulators and a block's 8 vectors of weights need its 32 registers)."""
    no_sums16 = np.zeros((xq.shape[0], 0), np.int32)
    # without reference counting (kernels_cpu.borrow): both threads take views of these arrays for every group
    packed, xq, xd, xs, out = borrowed(packed), borrowed(xq), borrowed(xd), borrowed(xs), borrowed(out)
    for g in prange(packed.shape[0]):
        _wide_group(packed, g, xq, xd, xs, no_sums16, out)


@njit(cache=True, fastmath=FASTMATH)
def matmul_tiles16_q8_0_wide_part(packed, xq, xd, xs, out, g0, g1):
    """matmul_tiles16_q8_0_wide's groups g0..g1-1 on the calling thread."""
    no_sums16 = np.zeros((xq.shape[0], 0), np.int32)
    packed, xq, xd, xs, out = borrowed(packed), borrowed(xq), borrowed(xd), borrowed(xs), borrowed(out)
    for g in range(g0, g1):
        _wide_group(packed, g, xq, xd, xs, no_sums16, out)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _wide_group(packed, g, xq, xd, xs, no_sums16, out):
    n_tokens, n_blocks = xd.shape
    wide = n_tokens // 8 * 8
    rest = n_tokens - wide
    n_tiles, last = _tiles_and_last(rest)
    w, ahead = packed[g], packed[min(g + PREFETCH_GROUPS, packed.shape[0] - 1)]
    for t in range(0, wide, 8):  # the first tile hints
        if t == 0:
            _group_tile8_q8_0(w, g, t, xq, xd, xs, out, n_blocks, ahead)
        else:
            _group_tile8_q8_0(w, g, t, xq, xd, xs, out, n_blocks, None)
    for tile in range(n_tiles):
        t0, t1, t2, t3 = _tile_tokens(tile, rest)
        if wide == 0 and tile == 0 and rest >= TILE:
            _group_tile4(w, g, t0, t1, t2, t3, xq, xd, xs, no_sums16, out, n_blocks, Q8_0_R, ahead)
        else:
            _group_tile4(w, g, wide + t0, wide + t1, wide + t2, wide + t3, xq, xd, xs, no_sums16, out,
                         n_blocks, Q8_0_R, None)
    if last > 0:
        t = wide + TILE * n_tiles
        _group_tile2(w, g, t, t + last - 1, xq, xd, xs, no_sums16, out, n_blocks, Q8_0_R)


# One small compiled entry per repacked type, picked in Python: a compiled if-chain over all types would compile every
# tile kernel (minutes on a first run) where a model needs two to four of them.
@njit(cache=True)
def _tiles_q4_0(w, xq, xd, xs, out):
    matmul_tiles16(w, xq, xd, xs, out, Q4_0_R)


@njit(cache=True)
def _tiles_q4_1(w, xq, xd, xs, out):
    matmul_tiles16(w, xq, xd, xs, out, Q4_1_R)


@njit(cache=True)
def _tiles_q5_0(w, xq, xd, xs, out):
    matmul_tiles16(w, xq, xd, xs, out, Q5_0_R)


@njit(cache=True)
def _tiles_q5_1(w, xq, xd, xs, out):
    matmul_tiles16(w, xq, xd, xs, out, Q5_1_R)


@njit(cache=True)
def _tiles_q8_0(w, xq, xd, xs, out):
    if WIDE_TILE:
        matmul_tiles16_q8_0_wide(w, xq, xd, xs, out)
    else:
        matmul_tiles16(w, xq, xd, xs, out, Q8_0_R)


@njit(cache=True)
def _tiles_q4_k(w, xq, xd, xs, out):
    matmul_tiles16(w, xq, xd, xs, out, Q4_K_R)


@njit(cache=True)
def _tiles_q5_k(w, xq, xd, xs, out):
    matmul_tiles16(w, xq, xd, xs, out, Q5_K_R)


@njit(cache=True)
def _tiles_q6_k(w, xq, xd, xs, out):
    matmul_tiles16(w, xq, xd, xs, out, Q6_K_R)


TILE_KERNELS = {Q4_0_R: _tiles_q4_0, Q4_1_R: _tiles_q4_1, Q5_0_R: _tiles_q5_0, Q5_1_R: _tiles_q5_1,
                Q8_0_R: _tiles_q8_0, Q4_K_R: _tiles_q4_k, Q5_K_R: _tiles_q5_k, Q6_K_R: _tiles_q6_k}


@njit(cache=True)
def matmul_rows(type_id, weights, xq, xd, xs, out):
    """out[t] = W @ x_t by one matvec per token: layouts without a tile kernel (raw ggml blocks)."""
    for t in range(xq.shape[0]):
        matvec_q8_dispatch(type_id, weights, xq[t], xd[t], xs[t], out[t])


def matmul_q8(type_id: int, weights: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x float32 (n_tokens, n_cols) -> (n_tokens, n_rows): x quantized to int8 blocks, then integer dot products.
    weights: raw ggml blocks (type_id the ggml type) or a repacked layout (type_id from repack.repack)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tokens, n_cols = x.shape
    weights, n_rows = check_weights(type_id, weights, n_cols)
    out = check_out(out, (n_tokens, n_rows))
    xq = np.empty((n_tokens, n_cols), np.int8)
    xd = np.empty((n_tokens, n_cols // 32), np.float32)
    xs = np.empty((n_tokens, n_cols // 32), np.int32)
    quantize_activations_rows(x, xq, xd, xs)
    kernel = TILE_KERNELS.get(int(type_id))
    if kernel is not None:
        call_parallel(kernel, weights, xq, xd, xs, out)
    else:
        call_parallel(matmul_rows, int(type_id), weights, xq, xd, xs, out)
    return out


@njit(cache=True)
def matmul_tiles_part(type_id, w, xq, xd, xs, out, g0, g1):
    """Groups g0..g1-1 of any repacked layout's tile kernel on the calling thread (a share of a team's matrix
    product): an if-chain over the repacked layouts (kernels_cpu.specialize keeps only a model's branches). An unknown
    id leaves out as it is."""
    if type_id == Q4_1_R:
        matmul_tiles16_part(w, xq, xd, xs, out, Q4_1_R, g0, g1)
    elif type_id == Q8_0_R:
        _tiles_q8_0_part(w, xq, xd, xs, out, g0, g1)
    elif type_id == Q4_K_R:
        matmul_tiles16_part(w, xq, xd, xs, out, Q4_K_R, g0, g1)
    elif type_id == Q6_K_R:
        matmul_tiles16_part(w, xq, xd, xs, out, Q6_K_R, g0, g1)
    elif type_id == Q5_0_R:
        matmul_tiles16_part(w, xq, xd, xs, out, Q5_0_R, g0, g1)
    elif type_id == Q4_0_R:
        matmul_tiles16_part(w, xq, xd, xs, out, Q4_0_R, g0, g1)
    elif type_id == Q5_1_R:
        matmul_tiles16_part(w, xq, xd, xs, out, Q5_1_R, g0, g1)
    elif type_id == Q5_K_R:
        matmul_tiles16_part(w, xq, xd, xs, out, Q5_K_R, g0, g1)


@njit(cache=True)
def _tiles_q8_0_part(w, xq, xd, xs, out, g0, g1):
    if WIDE_TILE:
        matmul_tiles16_q8_0_wide_part(w, xq, xd, xs, out, g0, g1)
    else:
        matmul_tiles16_part(w, xq, xd, xs, out, Q8_0_R, g0, g1)
