"""The KV cache of the CUDA backend: edgeinfer.kv_cache.KVCache's record of sequences, its K/V arrays on the device.

The arrays have the host cache's shape and element types (f32; f16 as the device's float16; q8_0 as int8 values and
float32 scales per 32), so what the record keeping does (length, record, truncate, allocate, free) is KVCache's own;
only what touches storage is here: allocation, copy_prefix (a device copy), export and restore (through the host).
"""
from __future__ import annotations

import numpy as np

from edgeinfer.arch.decoder import DecoderConfig
from edgeinfer.kv_cache import DEFAULT_KV_TYPE, QK, KVCache, decode, encode

# the device dtype of each cache type's values (f16: float16 there, where the host cache keeps half bits in uint16)
DEVICE_DTYPES = {"f32": np.float32, "f16": np.float16, "q8_0": np.int8}


class CUDAKVCache(KVCache):
    """n_seq sequences of up to n_ctx positions in GPU memory (see the module docstring)."""

    def __init__(self, cfg: DecoderConfig, n_ctx: int, n_seq: int = 1, kv_type: str = DEFAULT_KV_TYPE):
        from kernels_cuda import cache_ops

        self._ops = cache_ops
        super().__init__(cfg, n_ctx, n_seq, kv_type)

    def _allocate(self, shape: tuple[int, ...]):
        """(values, scales) on the device, zeroed; scales (..., dim / 32) for q8_0, a (1, 1, 1, 1, 1) stand-in else."""
        values = self._ops.zeros(shape, DEVICE_DTYPES[self.kv_type])
        scale_shape = shape[:-1] + (shape[-1] // QK,) if self.kv_type == "q8_0" else (1,) * len(shape)
        return values, self._ops.zeros(scale_shape, np.float32)

    def copy_prefix(self, src: int, dst: int, n: int | None = None) -> None:
        """Make sequence dst hold the first n positions of sequence src (all of them if n is None)."""
        n = self.length(src) if n is None else min(int(n), self.length(src))
        self._check(dst)
        if src != dst and n > 0:
            for a in self._stored_arrays():
                self._ops.copy_positions(a, src, dst, n)
        self._tokens[dst] = self._tokens[src][:n]

    def _read(self, pair, seq: int, n: int) -> np.ndarray:
        values, scales = (a.copy_to_host() for a in pair)
        if self.kv_type == "f16":
            values = values.view(np.uint16)  # decode() reads half bits, as the host cache holds them
        x = decode(self.kv_type, values[:, seq, :, :n], scales[:, seq, :, :n] if self.kv_type == "q8_0" else scales)
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3))

    def restore(self, seq: int, tokens, k: np.ndarray, v: np.ndarray) -> bool:
        """Make sequence seq hold what `export` gave; False (nothing changed) if the arrays do not fit this cache."""
        n = len(tokens)
        shape_k = (self.k[0].shape[0], n, self.k[0].shape[2], self.k[0].shape[4])
        shape_v = (self.v[0].shape[0], n, self.v[0].shape[2], self.v[0].shape[4])
        if n > self.n_ctx or k.shape != shape_k or v.shape != shape_v:
            return False
        self._check(seq)
        for pair, x in ((self.k, k), (self.v, v)):
            values, scales = encode(self.kv_type, x.transpose(0, 2, 1, 3))
            if self.kv_type == "f16":
                values = values.view(np.float16)
            self._ops.write_positions(pair[0], seq, np.ascontiguousarray(values))
            if self.kv_type == "q8_0":
                self._ops.write_positions(pair[1], seq, np.ascontiguousarray(scales))
        self._tokens[seq] = [int(t) for t in tokens]
        return True
