"""Scalar bit conversions for Numba kernels: IEEE half and bfloat16 bit patterns -> float32.

Numba has no float16 scalar on the CPU. We use an LLVM intrinsic (bitcast i16 -> half, fpext -> float) rather than a
65536-entry lookup table: it compiles to one `vcvtph2ps` (x86 F16C) or `fcvt` (AArch64), needs no table argument
threaded through every kernel, and keeps 256 KB of table out of the cache next to the weights. Where the compile
target has no native conversion (x86 without F16C, or NUMBA_CPU_NAME=generic), LLVM would emit a call to
`__extendhfsf2`, which Numba's JIT cannot resolve (the process crashes), so there we decode the bits by hand.
"""
import platform

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic


def native_half_conversion() -> bool:
    """True if the code Numba generates for this process converts half -> float in hardware."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    # Numba compiles for config.CPU_FEATURES when set ("" for NUMBA_CPU_NAME=generic), else for the host.
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm.get_host_cpu_features().flatten()
    return "+f16c" in features.split(",")


def _low_bits(builder, value, from_width: int, to_width: int):
    """The low `to_width` bits of an LLVM integer of `from_width` bits (zero-extended if narrower)."""
    if from_width > to_width:
        return builder.trunc(value, ir.IntType(to_width))
    if from_width < to_width:
        return builder.zext(value, ir.IntType(to_width))
    return value


@intrinsic
def bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (no conversion)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(_low_bits(builder, args[0], bits.bitwidth, 32), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _half_bits_to_f32_native(typingctx, bits):
    """IEEE half bits (low 16 bits of an integer) -> float32 via LLVM's half type: one instruction where native."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(_low_bits(builder, args[0], bits.bitwidth, 16), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def f32_to_half_bits_native(typingctx, x):
    """A float -> its IEEE half bits (uint16), rounded to nearest even, via LLVM's half type: one `vcvtps2ph` where
    native_half_conversion() (elsewhere LLVM would call a helper Numba cannot link: use quantize.f32_to_half_bits).
    The same bits as quantize.f32_to_half_bits for every float32 but NaNs (both give a NaN; payloads may differ).
    A KV cache store converts every key and value it writes; the portable one's branches cost a decode step of 8
    SmolLM2 sequences 0.26 ms."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        value = args[0] if x.bitwidth == 32 else builder.fptrunc(args[0], ir.FloatType())
        return builder.bitcast(builder.fptrunc(value, ir.HalfType()), ir.IntType(16))
    return types.uint16(x), codegen


@njit(cache=True)
def half_bits_to_f32_portable(bits):
    """IEEE half bits (low 16 bits of an int) -> float32, integer arithmetic only; exact for every input."""
    h = np.int64(bits) & 0xFFFF
    sign = (h & 0x8000) << 16
    em = h & 0x7FFF
    if em >= 0x7C00:  # inf / nan: all-ones exponent, payload moved up 13 bits
        return bits_to_f32(sign | 0x7F800000 | ((em & 0x3FF) << 13))
    if em >= 0x0400:  # normal: rebias the exponent from 15 to 127 (112 << 23)
        return bits_to_f32(sign | ((em << 13) + (112 << 23)))
    magnitude = np.float32(em) * np.float32(5.9604644775390625e-08)  # subnormal: mantissa * 2**-24, exact
    return -magnitude if sign else magnitude


half_bits_to_f32 = _half_bits_to_f32_native if native_half_conversion() else half_bits_to_f32_portable


@njit(cache=True)
def f16_at(buf, offset):
    """The little-endian IEEE half stored at buf[offset:offset + 2] (uint8 array) as float32."""
    return half_bits_to_f32(np.int64(buf[offset]) | (np.int64(buf[offset + 1]) << 8))


@njit(cache=True)
def bf16_bits_to_f32(bits):
    """bfloat16 bits -> float32: they are the upper 16 bits of the float32."""
    return bits_to_f32((np.int64(bits) & 0xFFFF) << 16)
