"""The type ids and block layouts of the int8 matvec and matmul kernels (matvec_q8, matvec_q8_raw, matmul_q8, and
repack, which writes the repacked layouts): a raw ggml type id, or REPACKED + it for the 16-row interleaved layout."""
import numpy as np
from numba import njit

from kernels_cpu.formats import Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from kernels_cpu.simd import I8_DOT_BIAS

FASTMATH = {"reassoc", "contract", "nsz"}
REPACKED = 1000  # type id of a repacked layout = REPACKED + ggml type
Q4_0_R, Q4_1_R, Q5_0_R, Q5_1_R, Q8_0_R = (REPACKED + t for t in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0))
Q4_K_R, Q5_K_R, Q6_K_R = (REPACKED + t for t in (Q4_K, Q5_K, Q6_K))
GROUP = 16  # rows per group of a repacked layout


@njit(cache=True)
def block_layout(ggml_type):
    """(bytes per block (repacked: per block of the 16 rows), bytes of quants before the block's scales, offset of
    the stored quants, has a minimum) of a type id. Called inside a parallel loop with a constant type id it folds to
    constants; computed before the loop it would reach the loop body (a separate function) as a run-time argument."""
    if ggml_type == Q4_0:
        return 18, 16, -8, False
    if ggml_type == Q4_1:
        return 20, 16, 0, True
    if ggml_type == Q5_0:
        return 22, 16, -16, False
    if ggml_type == Q5_1:
        return 24, 16, 0, True
    if ggml_type == Q8_0:
        return 34, 32, -128, False
    if ggml_type == Q4_K:
        return 144, 128, 0, True
    if ggml_type == Q5_K:
        return 176, 160, 0, True
    if ggml_type == Q6_K:
        return 210, 192, -32, False
    if ggml_type == Q3_K:
        return 110, 96, -4, False
    if ggml_type == Q2_K:
        return 84, 64, 0, True
    if ggml_type == Q4_0_R:
        return 288, 256, -8, False
    if ggml_type == Q4_1_R:
        return 320, 256, 0, True
    if ggml_type == Q5_0_R:
        return 352, 320, -16, False
    if ggml_type == Q5_1_R:
        return 384, 320, 0, True
    if ggml_type == Q8_0_R:
        return 544, 512, -I8_DOT_BIAS, False
    if ggml_type == Q4_K_R:
        return 288, 256, 0, True
    return 352, 320, 0, True  # Q5_K_R


@njit(cache=True)
def half_block_sums(xq):
    """Sums of xq over each 16 elements (int32): the x side of offsets and minimums of 16-element sub-blocks."""
    sums = np.zeros(xq.shape[0] // 16, np.int32)
    for i in range(xq.shape[0]):
        sums[i // 16] += xq[i]
    return sums
