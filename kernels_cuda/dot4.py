"""dot4(a, b, c): c plus the dot product of the four signed bytes packed in a with those in b (int32s), as CUDA's
__dp4a: one instruction on every GPU since Pascal (sm_61), four multiply-adds of int8 weights by int8 activations.

On a GPU it is the PTX instruction `dp4a.s32.s32`, written inline (NVVM takes inline PTX; it does not know LLVM's
llvm.nvvm.idp4a intrinsics, which it would leave as calls to missing functions). numba-cuda's simulator runs kernels
as Python and cannot run PTX, so there dot4 is the same arithmetic in Python (tests check it against numpy).
"""
from __future__ import annotations

import numpy as np

from kernels_cuda.launch import simulated


def dot4_reference(a: int, b: int, c: int) -> np.int32:
    """The arithmetic of dp4a.s32.s32 (the bytes of a and b in little-endian order, each sign-extended)."""
    a_bytes = np.array([int(a) & 0xFFFFFFFF], np.uint32).view(np.int8).astype(np.int64)
    b_bytes = np.array([int(b) & 0xFFFFFFFF], np.uint32).view(np.int8).astype(np.int64)
    return np.int32(int(c) + int((a_bytes * b_bytes).sum()))


if simulated():
    dot4 = dot4_reference
else:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def dot4(typingctx, a, b, c):
        """dp4a.s32.s32 d, a, b, c."""
        signature = types.int32(types.int32, types.int32, types.int32)

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            instruction = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), "dp4a.s32.s32 $0, $1, $2, $3;",
                                       "=r,r,r,r")
            return builder.call(instruction, [context.cast(builder, v, t, types.int32)
                                              for v, t in zip(args, sig.args)])

        return signature, codegen
