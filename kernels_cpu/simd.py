"""SIMD building blocks for the int8-activation kernels: LLVM vector values as Numba types, and intrinsics on them.

Numba has no SIMD types, and its own loops over 32 bytes are unrolled into scalar code (no SLP vectorizer). Here an
LLVM vector (`<32 x i8>`, `<8 x i32>`, `<16 x float>` ...) is a Numba type whose values live in registers, so a kernel
written in plain Numba keeps vector accumulators across its loops and calls these intrinsics for each step:
load and unpack weight bits, integer dot products (4 lanes of bytes -> 1 int32 lane), int -> float with per-lane
scales, horizontal sums. Offsets are in elements of the array passed (bytes for the uint8 / int8 arrays).

Lane layout of a dot product: int32 lane i sums bytes 4i..4i+3, on every path. So in a 32-byte dot lanes 0-3 cover
elements 0-15 and lanes 4-7 elements 16-31 (how 16-wide K-quant sub-blocks get their own scales); a 64-byte dot covers
two 32-element blocks, 8 lanes each.

One instruction path is chosen at import, from the CPU Numba compiles for and $EDGEINFER_KERNELS:
  avx512vnni  vpdpbusd on 256- and 512-bit vectors (Intel Ice Lake / Sapphire Rapids and later, AMD Zen 4)
  avxvnni     VEX vpdpbusd, 256-bit (Intel Alder Lake and later without AVX-512)
  avx2        vpmaddubsw + vpmaddwd (x86 since 2013)
  portable    plain LLVM IR (zext/sext, mul, add) that LLVM lowers for any CPU, ARM included
EDGEINFER_KERNELS=portable (or any name above the CPU supports) forces a path, e.g. to test the fallback; a forced
path compiles into its own Numba cache directory, because Numba's cache key does not see which path was compiled.
"""
import os
import platform

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, overload, register_model

from kernels_cpu._fp16 import native_half_conversion

def available_paths() -> tuple:
    """The instruction paths the compile target supports, fastest first ('portable' always)."""
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm.get_host_cpu_features().flatten()
    features = set(features.split(","))
    found = []
    if platform.machine().lower() in ("x86_64", "amd64"):
        if {"+avx512vnni", "+avx512vl", "+avx512bw"} <= features:
            found.append("avx512vnni")
        if "+avxvnni" in features:
            found.append("avxvnni")
        if "+avx2" in features:
            found.append("avx2")
    return tuple(found) + ("portable",)


def _select_path() -> str:
    forced = os.environ.get("EDGEINFER_KERNELS", "auto").strip().lower() or "auto"
    paths = available_paths()
    if forced == "auto":
        return paths[0]
    if forced not in paths:
        raise ValueError(f"EDGEINFER_KERNELS={forced}: this CPU supports {', '.join(paths)} (or auto)")
    # Numba's cache index keys on bytecode, signature and CPU, not on our path: keep forced paths apart.
    base = config.CACHE_DIR or os.path.join(os.path.expanduser("~"), ".cache", "edgeinfer", "numba")
    config.CACHE_DIR = os.path.join(base, f"path-{forced}")
    return forced


PATH = _select_path()
# what dot_i8_biased adds to each weight byte (see there)
I8_DOT_BIAS = 0 if PATH == "avx2" else 128
_NATIVE_HALF = native_half_conversion()

# ---------------------------------------------------------------- vector types


class SimdVector(types.Type):
    """An LLVM vector held in registers: `kind` is 'i8', 'i32' or 'f32', `lanes` its length."""

    def __init__(self, kind: str, lanes: int):
        self.kind, self.lanes = kind, lanes
        super().__init__(name=f"{kind}x{lanes}")


_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_F64 = ir.DoubleType()
_ELEMENT = {"i8": _I8, "i32": _I32, "f32": _F32, "f64": _F64}


@register_model(SimdVector)
class _SimdVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_ELEMENT[fe_type.kind], fe_type.lanes))


i8x32, i8x64 = SimdVector("i8", 32), SimdVector("i8", 64)
i32x8, i32x16 = SimdVector("i32", 8), SimdVector("i32", 16)
f32x8, f32x16 = SimdVector("f32", 8), SimdVector("f32", 16)
f64x16 = SimdVector("f64", 16)  # sums of float32 lanes kept in double (attention's softmax normalizer)
_BYTES = {32: i8x32, 64: i8x64}
_INTS = {8: i32x8, 16: i32x16}
_FLOATS = {8: f32x8, 16: f32x16}

# ---------------------------------------------------------------- IR helpers


def _vec(element, n):
    return ir.VectorType(element, n)


def _const(element, values):
    return ir.Constant(_vec(element, len(values)), values)


def _splat_const(element, n, value):
    return ir.Constant(_vec(element, n), [value] * n)


def _splat(builder, value, n):
    vector = builder.insert_element(ir.Constant(_vec(value.type, n), ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vector, vector, _splat_const(_I32, n, 0))


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, _const(_I32, list(mask)))


def _call(builder, name, return_type, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, [a.type for a in args]), name)
    return builder.call(fn, args)


def _element_ptr(context, builder, array_type, array, offset, element):
    """Pointer to `element` (an LLVM type) at element `offset` of a contiguous array (strides are not looked at)."""
    if not (isinstance(array_type, types.Array) and array_type.layout == "C"):
        raise TypeError(f"SIMD loads and stores need a C-contiguous array, got {array_type}")
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [offset]), element.as_pointer())


def _load(context, builder, array_type, array, offset, element):
    return builder.load(_element_ptr(context, builder, array_type, array, offset, element), align=1)


def _halves_to_float(builder, bits):
    """<n x i16> IEEE half bit patterns -> <n x float>: fpext where the CPU converts halves, else integer ops
    (as _fp16.half_bits_to_f32_portable; fpext would call a runtime function Numba's JIT cannot resolve)."""
    n = bits.type.count
    if _NATIVE_HALF:
        return builder.fpext(builder.bitcast(bits, _vec(ir.HalfType(), n)), _vec(_F32, n))
    h = builder.zext(bits, _vec(_I32, n))
    sign = builder.shl(builder.and_(h, _splat_const(_I32, n, 0x8000)), _splat_const(_I32, n, 16))
    em = builder.and_(h, _splat_const(_I32, n, 0x7FFF))
    shifted = builder.shl(em, _splat_const(_I32, n, 13))
    normal = builder.add(shifted, _splat_const(_I32, n, 112 << 23))  # rebias the exponent from 15 to 127
    special = builder.or_(shifted, _splat_const(_I32, n, 0x7F800000))  # inf / nan
    tiny = builder.fmul(builder.sitofp(em, _vec(_F32, n)), _splat_const(_F32, n, 2.0 ** -24))  # subnormal
    is_special = builder.icmp_unsigned(">=", em, _splat_const(_I32, n, 0x7C00))
    is_normal = builder.icmp_unsigned(">=", em, _splat_const(_I32, n, 0x0400))
    magnitude = builder.select(is_special, special,
                               builder.select(is_normal, normal, builder.bitcast(tiny, _vec(_I32, n))))
    return builder.bitcast(builder.or_(magnitude, sign), _vec(_F32, n))


def _sum_quads(builder, products):
    """<4n x i32> -> <n x i32>, lane i = products[4i] + ... + products[4i + 3] (the vpdpbusd lane layout)."""
    n = products.type.count // 4
    parts = [_shuffle(builder, products, products, range(k, 4 * n, 4)) for k in range(4)]
    return builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))


def _to_i32(builder, value):
    width = value.type.width
    return value if width == 32 else builder.trunc(value, _I32) if width > 32 else builder.sext(value, _I32)


def _halves(builder, v):
    n = v.type.count // 2
    return _shuffle(builder, v, v, range(n)), _shuffle(builder, v, v, range(n, 2 * n))


def _concat(builder, a, b):
    return _shuffle(builder, a, b, range(2 * a.type.count))


def _dpbusd(builder, acc, unsigned, signed):
    """acc + per-lane sums of 4 u8 x s8 products, with the chosen path's instructions (0 <= unsigned <= 128 on avx2,
    where vpmaddubsw's int16 pair sums would saturate above)."""
    n = acc.type.count
    if PATH == "portable" or n not in (8, 16):
        wide = _vec(_I32, 4 * n)
        products = builder.mul(builder.zext(unsigned, wide), builder.sext(signed, wide))
        return builder.add(acc, _sum_quads(builder, products))
    if n == 8 and PATH in ("avx512vnni", "avxvnni") or n == 16 and PATH == "avx512vnni":
        # one intrinsic for both: LLVM picks the VEX (AVX-VNNI) or EVEX encoding
        v = _vec(_I32, n)
        return _call(builder, f"llvm.x86.avx512.vpdpbusd.{32 * n}", v,
                     [acc, builder.bitcast(unsigned, v), builder.bitcast(signed, v)])
    if n == 16:  # two 256-bit halves
        (a0, a1), (u0, u1), (s0, s1) = _halves(builder, acc), _halves(builder, unsigned), _halves(builder, signed)
        return _concat(builder, _dpbusd(builder, a0, u0, s0), _dpbusd(builder, a1, u1, s1))
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [unsigned, signed])
    quads = _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [pairs, _splat_const(_I16, 16, 1)])
    return builder.add(acc, quads)


# ---------------------------------------------------------------- constructors and loads


def _zero(vector_type):
    @intrinsic
    def zero(typingctx):
        def codegen(context, builder, signature, args):
            value = 0.0 if vector_type.kind == "f32" else 0
            return _splat_const(_ELEMENT[vector_type.kind], vector_type.lanes, value)

        return vector_type(), codegen

    return zero


zero_i32x8, zero_i32x16 = _zero(i32x8), _zero(i32x16)
zero_f32x8, zero_f32x16 = _zero(f32x8), _zero(f32x16)
zero_f64x16 = _zero(f64x16)


def _loader(vector_type):
    @intrinsic
    def load(typingctx, buf, offset):
        """The vector stored at buf[offset:] (any 1-D contiguous array; offset in its elements)."""
        def codegen(context, builder, signature, args):
            element = _vec(_ELEMENT[vector_type.kind], vector_type.lanes)
            return _load(context, builder, signature.args[0], args[0], args[1], element)

        return vector_type(buf, types.intp), codegen

    return load


load_i8x32, load_i8x64 = _loader(i8x32), _loader(i8x64)
load_i32x16, load_f32x8, load_f32x16 = _loader(i32x16), _loader(f32x8), _loader(f32x16)


def _prefetch_codegen(locality):
    """Code for a read hint of buf[offset]'s cache line with LLVM's locality (2: into L2; 0: non-temporal)."""
    def codegen(context, builder, signature, args):
        ptr = _element_ptr(context, builder, signature.args[0], args[0], args[1], _I8)
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, locality),
                                                           ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return codegen


@intrinsic
def prefetch(typingctx, buf, offset):
    """Hint: bring the cache line of buf[offset] in for one read soon (prefetchnta), e.g. the next rows of a large
    matrix that a decode step streams once. (As prefetcht0, one SmolLM2 decode step at 1 thread took 6% longer, the
    LM head's stream 12%. The KV cache's hints and the tile kernels' stay prefetch_l2: non-temporal there, 8-row
    steps and decode at depth 4096 were slower.)"""
    return types.none(buf, types.intp), _prefetch_codegen(0)


@intrinsic
def prefetch_l2(typingctx, buf, offset):
    """Hint: bring the cache line of buf[offset] into L2 (prefetcht1), e.g. a tile of a long KV cache that code busy
    with arithmetic will read next. (Into L1 (prefetcht0), such hints held the core's few L1 miss buffers and
    streaming stalled; into L2 a decode attention layer read its cache from DRAM as fast as from L3.)"""
    return types.none(buf, types.intp), _prefetch_codegen(2)


def hint_share(ahead, n):
    """How many elements of `ahead` each of n steps hints (hint_l2_part's `share`): computed once, before the loop,
    since a division in the loop (n known only at run time) cost as much as the loop's arithmetic. 0 for None."""


@overload(hint_share, inline="always")
def _hint_share_impl(ahead, n):
    if isinstance(ahead, types.NoneType):
        return lambda ahead, n: 0
    return lambda ahead, n: ahead.size // n


def hint_l2_part(ahead, i, share):
    """Hint part i of the array `ahead` (contiguous, any type and shape), `share` elements from i * share
    (hint_share), into L2 (prefetch_l2): called at each of the n steps of a loop over the current piece of data, the
    next piece's lines arrive while this one is worked on. (All of a piece's hints at once held the loads up as long
    as the misses they replaced.) ahead None: nothing, compiled to nothing, for the calls that need no hints."""


@overload(hint_l2_part, inline="always")
def _hint_l2_part_impl(ahead, i, share):
    if isinstance(ahead, types.NoneType):
        return lambda ahead, i, share: None

    line = 64 // (ahead.dtype.bitwidth // 8)  # elements per cache line: a constant (ahead.itemsize is read at run
                                              # time, and the range's trip count was a division per call)

    def hint(ahead, i, share):
        for e in range(i * share, (i + 1) * share, line):
            prefetch_l2(ahead, e)
    return hint


@intrinsic
def splat4_i8x64(typingctx, buf, offset):
    """The 4 bytes at buf[offset:offset + 4] repeated 16 times (x of 16 interleaved rows)."""
    def codegen(context, builder, signature, args):
        word = _load(context, builder, signature.args[0], args[0], args[1], _I32)
        return builder.bitcast(_splat(builder, word, 16), _vec(_I8, 64))

    return i8x64(buf, types.intp), codegen


# output byte 4j + i <- input byte 16i + j: 4 rows of 16 bytes become 16 lanes of 4
_QUADS_OF_ROWS = [16 * i + j for j in range(16) for i in range(4)]


@intrinsic
def key_quads_i8x64(typingctx, buf, offset):
    """The 64 bytes at buf[offset:] taken as 4 rows of 16 (dimensions c..c+3 of 16 keys, as a key block stores
    them) and transposed, so that int32 lane j holds key j's 4 bytes: what a dot product with splat4_i8x64's
    query bytes wants (one vpermb where the CPU has AVX512-VBMI)."""
    def codegen(context, builder, signature, args):
        rows = _load(context, builder, signature.args[0], args[0], args[1], _vec(_I8, 64))
        return _shuffle(builder, rows, rows, _QUADS_OF_ROWS)

    return i8x64(buf, types.intp), codegen


@intrinsic
def store_f32x16(typingctx, buf, offset, v):
    """buf[offset:offset + 16] = v (float32 array)."""
    if v != f32x16:
        return None

    def codegen(context, builder, signature, args):
        builder.store(args[2], _element_ptr(context, builder, signature.args[0], args[0], args[1], _vec(_F32, 16)),
                      align=4)
        return context.get_dummy_value()

    return types.none(buf, types.intp, v), codegen


@intrinsic
def splat_i32x16(typingctx, value):
    """An integer repeated in 16 int32 lanes."""
    if not isinstance(value, types.Integer):
        return None
    return i32x16(value), lambda context, builder, signature, args: _splat(builder, _to_i32(builder, args[0]), 16)


@intrinsic
def splat_f32x16(typingctx, value):
    """A float repeated in 16 float32 lanes (a float64 is rounded to float32 first)."""
    if not isinstance(value, types.Float):
        return None
    return f32x16(value), lambda context, builder, signature, args: _splat(
        builder, _f32_value(builder, args[0], value), 16)


@intrinsic
def fma_f32x16(typingctx, a, b, acc):
    """a * b + acc lane by lane, always fused (one rounding), so the same lanes give the same bits in any kernel."""
    if not (a == b == acc == f32x16):
        return None

    def codegen(context, builder, signature, args):
        return _call(builder, "llvm.fma.v16f32", _vec(_F32, 16), list(args))

    return f32x16(a, b, acc), codegen


@intrinsic
def vmax(typingctx, a, b):
    """The larger of a and b, lane by lane (no NaNs expected: -inf marks 'nothing yet')."""
    if not (a == b == f32x16):
        return None

    def codegen(context, builder, signature, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return f32x16(a, b), codegen


@intrinsic
def where_seen(typingctx, x, low, high, offset, position, fill):
    """x in the lanes i whose low[offset + i] <= position <= high[offset + i] (int64 arrays: the keys each query
    vector sees), fill elsewhere."""
    if not (x == f32x16 and isinstance(position, types.Integer) and isinstance(fill, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        lo = _load(context, builder, signature.args[1], args[1], args[3], _vec(_I64, 16))
        hi = _load(context, builder, signature.args[2], args[2], args[3], _vec(_I64, 16))
        p = _splat(builder, builder.sext(args[4], _I64) if args[4].type.width < 64 else args[4], 16)
        seen = builder.and_(builder.icmp_signed("<=", lo, p), builder.icmp_signed("<=", p, hi))
        return builder.select(seen, args[0], _splat(builder, _f32_value(builder, args[5], fill), 16))

    return f32x16(x, low, high, types.intp, position, fill), codegen


@intrinsic
def where_in_range(typingctx, x, position, low, high, fill):
    """x in the lanes i whose key position + i lies in [low, high] (the keys one query vector sees), fill elsewhere."""
    if not (x == f32x16 and all(isinstance(a, types.Integer) for a in (position, low, high))
            and isinstance(fill, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        def wide(value):
            return builder.sext(value, _I64) if value.type.width < 64 else value

        p = builder.add(_splat(builder, wide(args[1]), 16), _const(_I64, list(range(16))))
        seen = builder.and_(builder.icmp_signed("<=", _splat(builder, wide(args[2]), 16), p),
                            builder.icmp_signed("<=", p, _splat(builder, wide(args[3]), 16)))
        return builder.select(seen, args[0], _splat(builder, _f32_value(builder, args[4], fill), 16))

    return f32x16(x, position, low, high, fill), codegen


@intrinsic
def hmax(typingctx, x):
    """The largest lane of an f32x16 (exact in any order; no NaNs expected)."""
    if x != f32x16:
        return None

    def codegen(context, builder, signature, args):
        return _call(builder, "llvm.vector.reduce.fmax.v16f32", _F32, [args[0]])

    return types.float32(x), codegen


@intrinsic
def tree_sum(typingctx, x):
    """The sum of an f64x16's lanes in one fixed order: lanes i and i + 8 first, then i and i + 4, i and i + 2, and
    the last two (no reassociation: the same bits on every path)."""
    if x != f64x16:
        return None

    def codegen(context, builder, signature, args):
        v, width = args[0], 16
        while width > 1:
            width //= 2
            v = builder.fadd(_shuffle(builder, v, v, range(width)), _shuffle(builder, v, v, range(width, 2 * width)))
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return types.float64(x), codegen


@intrinsic
def exp_f32x16(typingctx, x):
    """e**x lane by lane within 2 ulp: the vector form of attention.exp_f32 (Cephes' expf: x = n ln 2 + r, a
    degree-6 polynomial in r, times 2**n), every multiply-add fused, so each lane's bits are the same in any kernel.
    Inputs are clamped to [-87, 88]."""
    if x != f32x16:
        return None

    def codegen(context, builder, signature, args):
        def c(value):
            return _splat_const(_F32, 16, value)

        def fma(a, b, acc):
            return _call(builder, "llvm.fma.v16f32", _vec(_F32, 16), [a, b, acc])

        v = args[0]
        v = builder.select(builder.fcmp_ordered(">", v, c(88.0)), c(88.0), v)
        v = builder.select(builder.fcmp_ordered("<", v, c(-87.0)), c(-87.0), v)
        n = _call(builder, "llvm.floor.v16f32", _vec(_F32, 16), [fma(v, c(1.4426950408889634), c(0.5))])
        r = fma(n, c(-0.693359375), v)
        r = fma(n, c(2.12194440e-4), r)
        p = c(1.9875691500e-4)
        for coefficient in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = fma(p, r, c(coefficient))
        y = builder.fadd(fma(p, builder.fmul(r, r), r), c(1.0))
        bits = builder.shl(builder.add(builder.fptosi(n, _vec(_I32, 16)), _splat_const(_I32, 16, 127)),
                           _splat_const(_I32, 16, 23))
        return builder.fmul(y, builder.bitcast(bits, _vec(_F32, 16)))

    return f32x16(x), codegen


@intrinsic
def add_widened(typingctx, total, x):
    """total + x lane by lane in double (f64x16 total, f32x16 x)."""
    if not (total == f64x16 and x == f32x16):
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], builder.fpext(args[1], _vec(_F64, 16)))

    return f64x16(total, x), codegen


@intrinsic
def store_f64x16(typingctx, buf, offset, v):
    """buf[offset:offset + 16] = v (float64 array)."""
    if v != f64x16:
        return None

    def codegen(context, builder, signature, args):
        builder.store(args[2], _element_ptr(context, builder, signature.args[0], args[0], args[1], _vec(_F64, 16)),
                      align=8)
        return context.get_dummy_value()

    return types.none(buf, types.intp, v), codegen


# ---------------------------------------------------------------- weight bits -> unsigned bytes


@intrinsic
def nibbles_i8x32(typingctx, buf, offset):
    """16 bytes of packed 4-bit values (ggml Q4_0/Q4_1/Q5 layout) -> 32 bytes: low nibbles, then high nibbles."""
    def codegen(context, builder, signature, args):
        packed = _load(context, builder, signature.args[0], args[0], args[1], _vec(_I8, 16))
        twice = builder.bitcast(_shuffle(builder, packed, packed, list(range(16)) * 2), _vec(_I32, 8))
        shifted = builder.lshr(twice, _const(_I32, [0] * 4 + [4] * 4))  # upper half: high nibbles
        return builder.and_(builder.bitcast(shifted, _vec(_I8, 32)), _splat_const(_I8, 32, 15))

    return i8x32(buf, types.intp), codegen


def _bits_loader(lanes):
    bytes_type = _BYTES[lanes]

    @intrinsic
    def bits(typingctx, buf, offset, value):
        """The little-endian bit mask at buf[offset:offset + lanes / 8] -> lanes bytes: `value` where bit e is set,
        else 0 (the 5th bits of Q5_0/Q5_1)."""
        def codegen(context, builder, signature, args):
            mask = builder.bitcast(_load(context, builder, signature.args[0], args[0], args[1], ir.IntType(lanes)),
                                   _vec(ir.IntType(1), lanes))
            fill = _splat(builder, builder.trunc(args[2], _I8), lanes)
            return builder.select(mask, fill, _splat_const(_I8, lanes, 0))

        return bytes_type(buf, types.intp, types.intp), codegen

    return bits


bits_i8x32, bits_i8x64 = _bits_loader(32), _bits_loader(64)


@intrinsic
def bitfields_i8x64(typingctx, buf, offset, shift, step, mask, out_shift):
    """32 bytes b at buf[offset:] -> 64: byte l = ((b[l] >> shift) & mask) << out_shift, byte 32 + l the same with
    shift + step. Fields must lie inside a byte. This one shape unpacks every K-quant: Q4_K nibbles (0, 4, 15, 0),
    Q5_K high bits (j, 1, 1, 4), Q6_K high pairs (s, 2, 3, 4), Q3_K/Q2_K pairs (s, 2, 3, 0), Q3_K high bits
    (j, 1, 1, 2).
    """
    def codegen(context, builder, signature, args):
        packed = _load(context, builder, signature.args[0], args[0], args[1], _vec(_I8, 32))
        twice = builder.bitcast(_shuffle(builder, packed, packed, list(range(32)) * 2), _vec(_I64, 8))
        shift_, step_, mask_, out_ = args[2:6]
        # rotate each 64-bit lane right by (shift - out_shift) mod 64: the field lands at out_shift, and bits that
        # cross byte (or lane) boundaries end up outside the field, where the mask below drops them
        low = builder.sub(shift_, out_)
        high = builder.add(low, step_)
        amounts = builder.shuffle_vector(_splat(builder, low, 8), _splat(builder, high, 8),
                                         _const(_I32, [0, 1, 2, 3, 12, 13, 14, 15]))
        rotated = _call(builder, "llvm.fshr.v8i64", _vec(_I64, 8), [twice, twice, amounts])
        field = _splat(builder, builder.trunc(builder.shl(mask_, out_), _I8), 64)
        return builder.and_(builder.bitcast(rotated, _vec(_I8, 64)), field)

    return i8x64(buf, types.intp, types.intp, types.intp, types.intp, types.intp), codegen


@intrinsic
def fields_i8x64(typingctx, v, rotate, mask):
    """Each 64-bit lane of v rotated right by `rotate` bits, then & mask in every byte: with rotate and mask
    constants, one instruction picks a bit field of each byte (rotate 4, mask 15: high nibbles; rotate 60, mask 0x30:
    bits 0-1 moved to 4-5). Bits crossing bytes land outside the field as long as it lies inside the byte."""
    if v != i8x64:
        return None

    def codegen(context, builder, signature, args):
        lanes = builder.bitcast(args[0], _vec(_I64, 8))
        amount = _splat(builder, args[1], 8)
        rotated = _call(builder, "llvm.fshr.v8i64", _vec(_I64, 8), [lanes, lanes, amount])
        return builder.and_(builder.bitcast(rotated, _vec(_I8, 64)), _splat(builder, builder.trunc(args[2], _I8), 64))

    return i8x64(v, types.intp, types.intp), codegen


def _byte_op(name, fn):
    @intrinsic
    def op(typingctx, a, b):
        if not (isinstance(a, SimdVector) and a == b and a.kind == "i8"):
            return None
        return a(a, b), lambda context, builder, signature, args: fn(builder, *args)

    op.__name__ = name
    return op


bytes_or = _byte_op("bytes_or", lambda builder, a, b: builder.or_(a, b))


# ---------------------------------------------------------------- integer dot products


@intrinsic
def dot_u8(typingctx, acc, u, x):
    """acc + per-lane sums of 4 products u * x: u unsigned bytes in 0..127, x int8 (i32x8 from 32 bytes, i32x16
    from 64). The workhorse: 4-bit and 5-bit weights are unsigned, a signed format shifts by its offset (see
    lane_sums)."""
    if not (isinstance(acc, SimdVector) and acc.kind == "i32" and u == x == _BYTES.get(4 * acc.lanes)):
        return None

    def codegen(context, builder, signature, args):
        return _dpbusd(builder, args[0], args[1], args[2])

    return acc(acc, u, x), codegen


@intrinsic
def dot_i8(typingctx, acc, w, x, x_sums):
    """acc + per-lane sums of 4 products w * x, both int8 (Q8_0). x_sums = lane_sums(x): with VNNI the weight's
    sign bit is flipped (w + 128 is unsigned) and 128 * x_sums subtracted; avx2 uses |w| and x * sign(w) instead."""
    if not (isinstance(acc, SimdVector) and acc.kind == "i32" and w == x == _BYTES.get(4 * acc.lanes)
            and x_sums == acc):
        return None

    def codegen(context, builder, signature, args):
        acc_, w_, x_, sums = args
        n = w_.type.count
        if PATH == "portable":
            wide = _vec(_I32, n)
            return builder.add(acc_, _sum_quads(builder, builder.mul(builder.sext(w_, wide), builder.sext(x_, wide))))
        if PATH == "avx2":
            parts = []
            for w_half, x_half in zip(*(_halves(builder, v) if n == 64 else (v,) for v in (w_, x_))):
                magnitude = _call(builder, "llvm.abs.v32i8", _vec(_I8, 32), [w_half, ir.Constant(ir.IntType(1), 0)])
                signed = _call(builder, "llvm.x86.avx2.psign.b", _vec(_I8, 32), [x_half, w_half])
                parts.append(_dpbusd(builder, _splat_const(_I32, 8, 0), magnitude, signed))
            return builder.add(acc_, parts[0] if n == 32 else _concat(builder, *parts))
        shifted = builder.sub(acc_, builder.shl(sums, _splat_const(_I32, n // 4, 7)))
        return _dpbusd(builder, shifted, builder.xor(w_, _splat_const(_I8, n, -128)), x_)

    return acc(acc, w, x, x_sums), codegen


@intrinsic
def dot_i8_biased(typingctx, acc, w, x):
    """acc + per-lane sums of 4 products (w + I8_DOT_BIAS) * x, w and x int8 (Q8_0 in 16-row groups: the caller
    starts acc at -I8_DOT_BIAS * sum(x)). VNNI multiplies unsigned by signed bytes, so w + 128 (w with its sign bit
    flipped) goes in and the bias is 128; avx2 takes |w| and x * sign(w), exact as it is, so its bias is 0 (adding
    128 * sum(x) back per step cost ~40% of the Q8_0 tile kernel)."""
    if not (isinstance(acc, SimdVector) and acc.kind == "i32" and w == x == _BYTES.get(4 * acc.lanes)):
        return None

    def codegen(context, builder, signature, args):
        acc_, w_, x_ = args
        n = w_.type.count
        if PATH != "avx2":
            return _dpbusd(builder, acc_, builder.xor(w_, _splat_const(_I8, n, -128)), x_)
        parts = []
        for w_half, x_half in zip(*(_halves(builder, v) if n == 64 else (v,) for v in (w_, x_))):
            magnitude = _call(builder, "llvm.abs.v32i8", _vec(_I8, 32), [w_half, ir.Constant(ir.IntType(1), 0)])
            signed = _call(builder, "llvm.x86.avx2.psign.b", _vec(_I8, 32), [x_half, w_half])
            parts.append(_dpbusd(builder, _splat_const(_I32, 8, 0), magnitude, signed))
        return builder.add(acc_, parts[0] if n == 32 else _concat(builder, *parts))

    return acc(acc, w, x), codegen


@intrinsic
def lane_sums(typingctx, x):
    """Per-lane sums of 4 int8 of x (the dot-product lane layout): a format storing q = w + k computes
    dot_u8(-k * lane_sums(x), q, x) = sum w * x."""
    if not (isinstance(x, SimdVector) and x.kind == "i8" and x.lanes in (32, 64)):
        return None

    def codegen(context, builder, signature, args):
        n = x.lanes
        return _dpbusd(builder, _splat_const(_I32, n // 4, 0), _splat_const(_I8, n, 1), args[0])

    return _INTS[x.lanes // 4](x), codegen


@intrinsic
def times(typingctx, v, k):
    """Integer vector times a scalar integer (offsets: times(lane_sums(x), -16))."""
    if not (isinstance(v, SimdVector) and v.kind == "i32" and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.mul(args[0], _splat(builder, _to_i32(builder, args[1]), v.lanes))

    return v(v, k), codegen


# ---------------------------------------------------------------- float side


def _f32_value(builder, value, type_):
    return builder.fptrunc(value, _F32) if type_ == types.float64 else value


@intrinsic
def fma_splat(typingctx, acc, dp, scale):
    """acc + float(dp) * scale (a scalar, the same for every lane)."""
    if not (isinstance(acc, SimdVector) and acc.kind == "f32" and dp == _INTS.get(acc.lanes)
            and isinstance(scale, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        n = acc.lanes
        factor = _splat(builder, _f32_value(builder, args[2], scale), n)
        return _call(builder, f"llvm.fmuladd.v{n}f32", _vec(_F32, n),
                     [builder.sitofp(args[1], _vec(_F32, n)), factor, args[0]])

    return acc(acc, dp, scale), codegen


@intrinsic
def fma_lanes(typingctx, acc, dp, scales):
    """acc + float(dp) * scales, lane by lane."""
    if not (isinstance(acc, SimdVector) and acc.kind == "f32" and dp == _INTS.get(acc.lanes) and scales == acc):
        return None

    def codegen(context, builder, signature, args):
        n = acc.lanes
        return _call(builder, f"llvm.fmuladd.v{n}f32", _vec(_F32, n),
                     [builder.sitofp(args[1], _vec(_F32, n)), args[2], args[0]])

    return acc(acc, dp, scales), codegen


def _float_op(name, fn):
    @intrinsic
    def op(typingctx, a, b):
        if not (isinstance(a, SimdVector) and a.kind == "f32" and a == b):
            return None
        return a(a, b), lambda context, builder, signature, args: fn(builder, *args)

    op.__name__ = name
    return op


_CONTRACT = ("contract",)  # lets LLVM fuse a multiply and an add into an FMA
vadd = _float_op("vadd", lambda builder, a, b: builder.fadd(a, b, flags=_CONTRACT))
vsub = _float_op("vsub", lambda builder, a, b: builder.fsub(a, b, flags=_CONTRACT))
vmul = _float_op("vmul", lambda builder, a, b: builder.fmul(a, b, flags=_CONTRACT))


@intrinsic
def iadd(typingctx, a, b):
    """Integer vector sum, lane by lane."""
    if not (isinstance(a, SimdVector) and a.kind == "i32" and a == b):
        return None
    return a(a, b), lambda context, builder, signature, args: builder.add(args[0], args[1])


@intrinsic
def scaled(typingctx, v, s):
    """v * s for a scalar s."""
    if not (isinstance(v, SimdVector) and v.kind == "f32" and isinstance(s, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], _splat(builder, _f32_value(builder, args[1], s), v.lanes), flags=_CONTRACT)

    return v(v, s), codegen


@intrinsic
def to_float(typingctx, v):
    """int32 lanes -> float32 lanes."""
    if not (isinstance(v, SimdVector) and v.kind == "i32"):
        return None
    return _FLOATS[v.lanes](v), lambda context, builder, signature, args: builder.sitofp(args[0], _vec(_F32, v.lanes))


@intrinsic
def hsum(typingctx, v):
    """Sum of all lanes (float32), in any order."""
    if not (isinstance(v, SimdVector) and v.kind == "f32"):
        return None

    def codegen(context, builder, signature, args):
        n = v.lanes
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _vec(_F32, n)]),
                                            f"llvm.vector.reduce.fadd.v{n}f32")
        return builder.call(fn, [ir.Constant(_F32, 0.0), args[0]], fastmath=("reassoc",))

    return types.float32(v), codegen


@intrinsic
def upper_half(typingctx, v):
    """Lanes 8..15 of an f32x16."""
    if v != f32x16:
        return None
    return f32x8(v), lambda context, builder, signature, args: _halves(builder, args[0])[1]


@intrinsic
def join(typingctx, low, high):
    """[low, high]: two f32x8 -> f32x16."""
    if not (low == high == f32x8):
        return None
    return f32x16(low, high), lambda context, builder, signature, args: _concat(builder, *args)


@intrinsic
def pick_pairs(typingctx, v, k):
    """[v[2k] x 8, v[2k + 1] x 8]: per-lane scales of the 64-byte dot of blocks 2k, 2k + 1. Without AVX-512, k should
    be a constant after inlining and unrolling (LLVM then emits shuffles, else it goes through memory)."""
    if not (isinstance(v, SimdVector) and v.kind == "f32" and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        k2 = builder.mul(_to_i32(builder, args[1]), ir.Constant(_I32, 2))
        if PATH == "avx512vnni" and v.lanes == 16:  # one vpermps, also when k is not a constant
            index = builder.add(_splat(builder, k2, 16), _const(_I32, [0] * 8 + [1] * 8))
            return _call(builder, "llvm.x86.avx512.permvar.sf.512", _vec(_F32, 16), [args[0], index])
        first = builder.extract_element(args[0], k2)
        second = builder.extract_element(args[0], builder.add(k2, ir.Constant(_I32, 1)))
        return _shuffle(builder, _splat(builder, first, 16), _splat(builder, second, 16), [0] * 8 + [16] * 8)

    return f32x16(v, k), codegen


@intrinsic
def pick_quads(typingctx, v, i):
    """[v[i] x 4, v[i + 1] x 4, v[i + 2] x 4, v[i + 3] x 4]: per-lane scales of a 64-byte dot over four 16-element
    sub-blocks (Q6_K, Q3_K, Q2_K). i should be a constant after inlining."""
    if not (v == f32x16 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        i_ = _to_i32(builder, args[1])
        result = ir.Constant(_vec(_F32, 16), ir.Undefined)
        for q in range(4):
            value = builder.extract_element(args[0], builder.add(i_, ir.Constant(_I32, q)))
            for lane in range(4 * q, 4 * q + 4):
                result = builder.insert_element(result, value, ir.Constant(_I32, lane))
        return result

    return f32x16(v, i), codegen


@intrinsic
def spread_pairs(typingctx, buf, offset):
    """[b0, b0, b1, b1, ..., b7, b7] for the 8 floats b at buf[offset:]: x scales per 16-wide sub-block."""
    def codegen(context, builder, signature, args):
        values = _load(context, builder, signature.args[0], args[0], args[1], _vec(_F32, 8))
        return _shuffle(builder, values, values, [j // 2 for j in range(16)])

    return f32x16(buf, types.intp), codegen


# ---------------------------------------------------------------- block scales -> float lanes


@intrinsic
def halves_f32x16(typingctx, buf, offset):
    """16 IEEE halves at buf[offset:offset + 32] (bytes) -> f32x16."""
    def codegen(context, builder, signature, args):
        return _halves_to_float(builder, _load(context, builder, signature.args[0], args[0], args[1], _vec(_I16, 16)))

    return f32x16(buf, types.intp), codegen


@intrinsic
def halves_pair_splat(typingctx, buf, offset):
    """[h0 x 8, h1 x 8] for the IEEE halves h0, h1 at buf[offset:offset + 4] (bytes): a K-quant's (d, dmin)."""
    def codegen(context, builder, signature, args):
        pair = _halves_to_float(builder, _load(context, builder, signature.args[0], args[0], args[1], _vec(_I16, 2)))
        return _shuffle(builder, pair, pair, [0] * 8 + [1] * 8)

    return f32x16(buf, types.intp), codegen


@intrinsic
def int8s_f32x16(typingctx, buf, offset):
    """16 int8 at buf[offset:] -> f32x16 (Q6_K scales)."""
    def codegen(context, builder, signature, args):
        bytes_ = _load(context, builder, signature.args[0], args[0], args[1], _vec(_I8, 16))
        return builder.sitofp(bytes_, _vec(_F32, 16))

    return f32x16(buf, types.intp), codegen


@intrinsic
def uint8s_f32x16(typingctx, buf, offset):
    """16 uint8 at buf[offset:] -> f32x16 (pre-decoded Q4_K/Q5_K scales and mins)."""
    def codegen(context, builder, signature, args):
        bytes_ = _load(context, builder, signature.args[0], args[0], args[1], _vec(_I8, 16))
        return builder.uitofp(bytes_, _vec(_F32, 16))

    return f32x16(buf, types.intp), codegen


@intrinsic
def nibble_scales_f32x16(typingctx, buf, offset, high):
    """16 bytes at buf[offset:] -> f32x16 of their low nibbles (high == 0) or high nibbles (Q2_K scales / mins)."""
    def codegen(context, builder, signature, args):
        bytes_ = builder.zext(_load(context, builder, signature.args[0], args[0], args[1], _vec(_I8, 16)),
                              _vec(_I32, 16))
        shift = _splat(builder, builder.mul(_to_i32(builder, args[2]), ir.Constant(_I32, 4)), 16)
        values = builder.and_(builder.lshr(bytes_, shift), _splat_const(_I32, 16, 15))
        return builder.sitofp(values, _vec(_F32, 16))

    return f32x16(buf, types.intp, types.intp), codegen


@intrinsic
def k4_scales_f32x16(typingctx, buf, offset):
    """The 12 packed bytes of Q4_K/Q5_K 6-bit (scale, min) pairs at buf[offset:] -> [scale 0..7, min 0..7] as floats
    (ggml's get_scale_min_k4: bytes 0-3 scales 0-3, 4-7 mins 0-3, 8-11 low 4 bits of scales/mins 4-7, whose high 2
    bits are the top bits of bytes 0-7)."""
    def codegen(context, builder, signature, args):
        packed = builder.zext(_load(context, builder, signature.args[0], args[0], args[1], _vec(_I8, 12)),
                              _vec(_I32, 12))
        low = _shuffle(builder, packed, packed, [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11])
        low = builder.lshr(low, _const(_I32, [0] * 12 + [4] * 4))
        low = builder.and_(low, _const(_I32, [63] * 4 + [15] * 4 + [63] * 4 + [15] * 4))
        high = _shuffle(builder, packed, packed, [0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 4, 5, 6, 7])
        high = builder.and_(builder.shl(builder.lshr(high, _splat_const(_I32, 16, 6)), _splat_const(_I32, 16, 4)),
                            _const(_I32, [0] * 4 + [48] * 4 + [0] * 4 + [48] * 4))
        return builder.sitofp(builder.or_(low, high), _vec(_F32, 16))

    return f32x16(buf, types.intp), codegen


@intrinsic
def q3k_scales_f32x16(typingctx, buf, offset):
    """The 12 packed bytes of Q3_K's 16 6-bit scales at buf[offset:] -> f32x16 of scale - 32 (as dequant.q3_k_scale:
    low 4 bits from the low (j < 8) or high nibble of byte j % 8, high 2 bits from bits 2 (j // 4) of byte
    8 + j % 4)."""
    def codegen(context, builder, signature, args):
        packed = builder.zext(_load(context, builder, signature.args[0], args[0], args[1], _vec(_I8, 12)),
                              _vec(_I32, 12))
        low = _shuffle(builder, packed, packed, list(range(8)) * 2)
        low = builder.and_(builder.lshr(low, _const(_I32, [0] * 8 + [4] * 8)), _splat_const(_I32, 16, 15))
        high = _shuffle(builder, packed, packed, [8 + j % 4 for j in range(16)])
        high = builder.and_(builder.lshr(high, _const(_I32, [2 * (j // 4) for j in range(16)])),
                            _splat_const(_I32, 16, 3))
        scales = builder.sub(builder.or_(low, builder.shl(high, _splat_const(_I32, 16, 4))), _splat_const(_I32, 16, 32))
        return builder.sitofp(scales, _vec(_F32, 16))

    return f32x16(buf, types.intp), codegen


# ---------------------------------------------------------------- activation quantization (ggml's quantize_row_q8_1)


@intrinsic
def absmax_f32x32(typingctx, x, offset):
    """max |x[offset + l]| over l < 32 (float32 array)."""
    def codegen(context, builder, signature, args):
        # |x| as bits: non-negative floats order like their bit patterns (an integer max reduces as a tree;
        # reduce.fmax would go lane by lane to keep its NaN rules)
        bits = _load(context, builder, signature.args[0], args[0], args[1], _vec(_I32, 32))
        magnitudes = builder.and_(bits, _splat_const(_I32, 32, 0x7FFFFFFF))
        return builder.bitcast(_call(builder, "llvm.vector.reduce.umax.v32i32", _I32, [magnitudes]), _F32)

    return types.float32(x, types.intp), codegen


@intrinsic
def round_store_i8x32(typingctx, x, offset, inverse_scale, xq):
    """xq[offset + l] = round(x[offset + l] * inverse_scale) (float32 product, halves away from zero, as C's
    roundf), l < 32; returns their sum (int32). The caller guarantees |product| <= 127.5."""
    def codegen(context, builder, signature, args):
        values = _load(context, builder, signature.args[0], args[0], args[1], _vec(_F32, 32))
        scaled = builder.fmul(values, _splat(builder, args[2], 32))
        rounded = _call(builder, "llvm.round.v32f32", _vec(_F32, 32), [scaled])
        quantized = builder.fptosi(rounded, _vec(_I8, 32))
        builder.store(quantized, _element_ptr(context, builder, signature.args[3], args[3], args[1], _vec(_I8, 32)),
                      align=1)
        return _call(builder, "llvm.vector.reduce.add.v32i32", _I32, [builder.sext(quantized, _vec(_I32, 32))])

    return types.int32(x, types.intp, types.float32, xq), codegen
