"""The KV cache of the CUDA backend: edgeinfer.kv_cache.KVCache's record of sequences, its K/V arrays on the device.

The arrays have the host cache's shape and element types (f32; f16 as the device's float16; q8_0 as int8 values and
float32 scales per 32), so what the record keeping does (length, record, truncate, allocate, free) is KVCache's own;
only where the arrays live is here: allocation and the three storage hooks KVCache calls (copy positions on the
device, write them from the host, read them to the host), which copy_prefix, export and restore go through.
"""
from __future__ import annotations

import numpy as np

from edgeinfer.arch.decoder import DecoderConfig
from edgeinfer.kv_cache import DEFAULT_KV_TYPE, KVCache

# the device dtype of each cache type's values (f16: float16 there, where the host cache keeps half bits in uint16)
DEVICE_DTYPES = {"f32": np.float32, "f16": np.float16, "q8_0": np.int8}


class CUDAKVCache(KVCache):
    """n_seq sequences of up to n_ctx positions in GPU memory (see the module docstring)."""

    def __init__(self, cfg: DecoderConfig, n_ctx: int, n_seq: int = 1, kv_type: str = DEFAULT_KV_TYPE):
        from kernels_cuda import cache_ops

        self._ops = cache_ops
        super().__init__(cfg, n_ctx, n_seq, kv_type)

    key_block = None  # the device kernels read keys by rows

    def _allocate(self, shape: tuple[int, ...], scale_shape: tuple[int, ...]):
        """(values, scales) on the device, zeroed; scales (..., dim / 32) for q8_0, a one-element stand-in else."""
        return self._ops.zeros(shape, DEVICE_DTYPES[self.kv_type]), self._ops.zeros(scale_shape, np.float32)

    def map_pages(self, n_threads: int = 1) -> None:
        """Nothing to do: device memory is allocated whole."""

    def _copy_positions(self, a, src: int, dst: int, n: int) -> None:
        self._ops.copy_positions(a, src, dst, n)

    def _write_positions(self, a, seq: int, host: np.ndarray) -> None:
        if host.dtype == np.uint16:  # half bits, as the host cache holds them: the device array is float16
            host = host.view(np.float16)
        self._ops.write_positions(a, seq, np.ascontiguousarray(host))

    def _host_arrays(self, pair) -> tuple[np.ndarray, np.ndarray]:
        values, scales = (a.copy_to_host() for a in pair)
        if self.kv_type == "f16":
            values = values.view(np.uint16)  # decode() reads half bits, as the host cache holds them
        return values, scales
