"""The CUDA backend: weights uploaded once in kernels_cuda's layout, the forward pass as kernel launches on the GPU.

`CUDABackend.prepare` decodes and uploads a model's weights (edgeinfer.backends.cuda_weights) and returns a
`CUDARunner`; `allocate_cache` a CUDAKVCache (edgeinfer.backends.cuda_cache), whose K/V lie on the device. A forward
call uploads only the batch (tokens, positions, sequences, logit rows), launches every layer's kernels on device
arrays, and copies back only the logits of the rows asked for. It computes what kernels_cpu.forward computes, in the
same order (norms, biases, Q/K norms, RoPE, K/V store, attention, post-norms, residual scale; final norm, LM head,
logit scale and soft-cap), for every DecoderConfig switch that function honours.

numba.cuda is imported only when a backend is made: importing edgeinfer never loads it. Without numba-cuda,
`CUDABackend()` raises UnsupportedError naming the extra to install; without a GPU (and not in numba-cuda's
simulator, NUMBA_ENABLE_CUDASIM=1) it says there is none.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, DecoderWeights
from edgeinfer.errors import UnsupportedError
from edgeinfer.kv_cache import check_kv_type

__all__ = ["CUDABackend", "CUDARunner"]

INSTALL_HINT = "pip install 'edgeinfer[cuda]'"


def _import_kernels():
    """kernels_cuda's modules, or UnsupportedError when numba-cuda is not installed."""
    try:
        from numba import cuda  # noqa: F401  (numba-cuda replaces numba.cuda when installed)

        import numba_cuda  # noqa: F401
    except ImportError as e:
        raise UnsupportedError(f"the CUDA backend needs numba-cuda ({INSTALL_HINT}): {e}") from None
    from kernels_cuda import attention, launch, linear, ops

    return attention, launch, linear, ops


class CUDABackend:
    """Runs the decoder family on an NVIDIA GPU through numba-cuda (see edgeinfer.backends for the interface)."""

    name = "cuda"
    max_threads = 1  # host threads only launch kernels

    def __init__(self, geometry=None):
        self._attention, self._launch, self._linear, self._ops = _import_kernels()
        from numba import cuda

        if not self._launch.simulated() and not cuda.is_available():
            raise UnsupportedError("no CUDA GPU is available (no device, or no driver); use --device cpu")
        self.geometry = geometry or self._launch.default_geometry()

    def prepare(self, cfg: DecoderConfig, weights: DecoderWeights, model_path: str | os.PathLike,
                use_cache: bool = True) -> CUDARunner:
        """The model's weights decoded and uploaded (nothing is cached on disk: decoding takes seconds)."""
        return CUDARunner(cfg, weights, self.geometry)

    def allocate_cache(self, cfg: DecoderConfig, n_ctx: int, n_seq: int, kv_type: str):
        """n_seq sequences sharing n_ctx positions, in GPU memory, stored as kv_type."""
        from edgeinfer.backends.cuda_cache import CUDAKVCache

        return CUDAKVCache(cfg, n_ctx, n_seq, check_kv_type(kv_type, cfg))


class _Buffers:
    """Device activations for batches of up to n rows."""

    def __init__(self, cfg: DecoderConfig, n: int):
        from numba import cuda

        f32 = np.float32
        qd, kd, vd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.value_dim
        self.n = n
        self.x = cuda.device_array((n, cfg.d_model), f32)
        self.h = cuda.device_array((n, cfg.d_model), f32)
        self.qkv = cuda.device_array((n, qd + kd + vd), f32)
        self.attn = cuda.device_array((n, cfg.n_heads * cfg.value_dim), f32)
        self.gate_up = cuda.device_array((n, 2 * cfg.d_ff), f32)
        self.out = cuda.device_array((n, cfg.d_model), f32)
        self.logits = cuda.device_array((n, cfg.n_vocab), f32)
        self.widest = max(cfg.d_model, cfg.n_heads * cfg.value_dim, cfg.d_ff)
        # int8 activations: one buffer per width, so that the first rows of one are C-contiguous (the linear
        # kernel reads them as int32s, four at a time)
        self.xq = {width: cuda.device_array((n, width), np.int8)
                   for width in {cfg.d_model, cfg.n_heads * cfg.value_dim, cfg.d_ff}}
        self.xd = cuda.device_array((n, self.widest // 32), f32)
        self.xs = cuda.device_array((n, self.widest // 16), np.int32)

    def quantized(self, rows: int, width: int):
        """(xq, xd, xs) views for `rows` activations of `width` values."""
        return self.xq[width][:rows], self.xd[:rows, :width // 32], self.xs[:rows, :width // 16]


class CUDARunner:
    """One model on the GPU: its weights, and the forward pass as launches over device buffers."""

    def __init__(self, cfg: DecoderConfig, weights: DecoderWeights, geometry):
        self._attention, self._launch, self._linear, self._ops = _import_kernels()
        _check_supported(cfg)
        from edgeinfer.backends.cuda_weights import DeviceWeights

        self.cfg, self.geometry = cfg, geometry
        self.weights = DeviceWeights(cfg, weights)
        self._free: list[_Buffers] = []  # returned by finished calls (list.pop/append are atomic)
        self._lock = threading.Lock()  # one forward at a time: launches of two calls would interleave their buffers

    def weight_bytes_per_step(self) -> int:
        return self.weights.weight_bytes_per_step()

    def forward(self, tokens: np.ndarray, positions: np.ndarray, seqs: np.ndarray, logit_rows: np.ndarray,
                cache, logits: np.ndarray, n_threads: int) -> None:
        """Evaluate tokens[i] (int64) at positions[i] of sequence seqs[i], storing each row's K/V in cache; write the
        float32 logits of rows logit_rows into the host array logits (len(logit_rows), n_vocab)."""
        from numba import cuda

        n = len(tokens)
        with self._lock:
            buf = self._borrow(n)
            try:
                batch = [cuda.to_device(np.ascontiguousarray(a, dtype=np.int64))
                         for a in (tokens, positions, seqs, logit_rows)]
                self._forward(n, *batch, cache, buf)
                m = len(logit_rows)
                if m:
                    logits[...] = buf.logits[:m].copy_to_host()
            finally:
                self._free.append(buf)

    def _borrow(self, n: int) -> _Buffers:
        buf = self._free.pop() if self._free else None
        if buf is None or buf.n < n:
            buf = _Buffers(self.cfg, max(n, 1 << max(0, n - 1).bit_length()))  # rounded up: few sizes ever made
        return buf

    def _forward(self, n, tokens, positions, seqs, logit_rows, cache, buf: _Buffers) -> None:
        cfg, geo, ops, w = self.cfg, self.geometry, self._ops, self.weights
        x = buf.x[:n]
        ops.embed(w.token_embd, tokens, cfg.embedding_scale, x, geo)
        for layer, lw in enumerate(w.layers):
            self._attention_block(layer, lw, n, positions, seqs, cache, buf)
            ops.add_scaled(x, buf.out[:n], cfg.residual_scale, geo)
            self._feed_forward_block(lw, n, buf)
            ops.add_scaled(x, buf.out[:n], cfg.residual_scale, geo)
        m = logit_rows.shape[0]
        if m == 0:  # a prompt chunk before the last one: its keys and values are all that is wanted
            return
        head_in = buf.h[:m]
        ops.gather_rows(x, logit_rows, head_in, geo)
        ops.rms_norm(head_in, w.output_norm, cfg.norm_eps, geo)
        self._matmul(w.output, head_in, buf.logits[:m], buf)
        ops.finish_logits(buf.logits[:m], cfg.logit_scale, cfg.final_logit_softcap, geo)

    def _matmul(self, matrix, x, out, buf: _Buffers) -> None:
        """out = x @ W.T with x quantized to int8 blocks first (the CPU's int8 path)."""
        xq, xd, xs = buf.quantized(x.shape[0], x.shape[1])
        self._linear.quantize(x, xq, xd, xs, self.geometry)
        self._linear.linear(matrix, xq, xd, xs, out, self.geometry)

    def _matmuls(self, matrices, x, out, buf: _Buffers) -> None:
        """Matrices whose outputs lie side by side in out (Q|K|V, gate|up), x quantized once."""
        xq, xd, xs = buf.quantized(x.shape[0], x.shape[1])
        self._linear.quantize(x, xq, xd, xs, self.geometry)
        col = 0
        for matrix in matrices:
            self._linear.linear(matrix, xq, xd, xs, out[:, col:col + matrix.n_rows], self.geometry)
            col += matrix.n_rows

    def _block_input(self, norm, n, buf: _Buffers):
        """The normed block input (pre-norm), or x itself for a post-norm-only family (OLMo 2)."""
        if not self.cfg.pre_norms:
            return buf.x[:n]
        self._ops.rms_norm(buf.x[:n], norm, self.cfg.norm_eps, self.geometry, out=buf.h[:n])
        return buf.h[:n]

    def _attention_block(self, layer, lw, n, positions, seqs, cache, buf: _Buffers) -> None:
        """buf.out[:n] = the attention block's output for buf.x[:n] (its K/V rows stored into the cache first)."""
        cfg, geo, ops = self.cfg, self.geometry, self._ops
        heads, kv_heads, hd, vd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.value_dim
        qd, kd = heads * hd, kv_heads * hd
        qkv = buf.qkv[:n]
        self._matmuls(lw.qkv, self._block_input(lw.attn_norm, n, buf), qkv, buf)
        if lw.qkv_bias is not None:
            ops.add_vector(qkv, lw.qkv_bias, geo)
        if cfg.qk_norm and cfg.qk_norm_whole:
            ops.rms_norm(qkv, lw.q_norm, cfg.norm_eps, geo, col0=0, n_sub=1, width=qd)
            ops.rms_norm(qkv, lw.k_norm, cfg.norm_eps, geo, col0=qd, n_sub=1, width=kd)
        elif cfg.qk_norm:
            ops.rms_norm(qkv, lw.q_norm, cfg.norm_eps, geo, col0=0, n_sub=heads, width=hd)
            ops.rms_norm(qkv, lw.k_norm, cfg.norm_eps, geo, col0=qd, n_sub=kv_heads, width=hd)
        if lw.rope_freqs is not None:  # Q's heads then K's lie one after another: one launch rotates both
            ops.rope(qkv, heads + kv_heads, hd, positions, lw.rope_freqs, cfg.rope_style == ROPE_NEOX, geo)
        self._attention.store_kv(qkv, qd, kv_heads, hd, layer, seqs, positions, cache.k, geo)
        self._attention.store_kv(qkv, qd + kd, kv_heads, vd, layer, seqs, positions, cache.v, geo)
        attn = buf.attn[:n]
        self._attention.attention(qkv, heads, kv_heads, hd, vd, positions, seqs, cache.k, cache.v, layer, cfg.scale,
                                  cfg.attn_logit_softcap, lw.window, attn, geo)
        out = buf.out[:n]
        self._matmul(lw.attn_output, attn, out, buf)
        if cfg.post_norms:
            ops.rms_norm(out, lw.post_attention_norm, cfg.norm_eps, geo)

    def _feed_forward_block(self, lw, n, buf: _Buffers) -> None:
        """buf.out[:n] = the feed-forward block's output for buf.x[:n]."""
        cfg, geo, ops = self.cfg, self.geometry, self._ops
        gate_up = buf.gate_up[:n]
        self._matmuls(lw.gate_up, self._block_input(lw.ffn_norm, n, buf), gate_up, buf)
        ops.gated(gate_up, cfg.d_ff, cfg.activation == "gelu_tanh", geo)
        out = buf.out[:n]
        self._matmul(lw.ffn_down, gate_up[:, :cfg.d_ff], out, buf)
        if cfg.post_norms:
            ops.rms_norm(out, lw.post_ffw_norm, cfg.norm_eps, geo)


def _check_supported(cfg: DecoderConfig) -> None:
    """Refuse by name what the CUDA kernels do not compute (everything kernels_cpu.forward does is computed)."""
    if cfg.activation not in ("silu", "gelu_tanh"):
        raise UnsupportedError(f"the CUDA backend has no {cfg.activation!r} activation")
    from kernels_cuda.launch import MAX_HEAD_DIM

    if cfg.head_dim > MAX_HEAD_DIM or cfg.value_dim > MAX_HEAD_DIM:
        raise UnsupportedError(f"the CUDA backend takes heads of at most {MAX_HEAD_DIM} values "
                               f"(this model's: {cfg.head_dim} and {cfg.value_dim})")
    if cfg.d_model % 32 or cfg.d_ff % 32 or (cfg.n_heads * cfg.value_dim) % 32:
        raise UnsupportedError("the CUDA backend needs widths that are multiples of 32 (int8 activation blocks)")
