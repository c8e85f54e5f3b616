"""The engine: a static KV cache and the forward pass of the decoder family, as prefill and decode steps.

`prefill(tokens)` evaluates a block of prompt tokens with matrix-matrix kernels (in batches of `n_batch`);
`decode(token)` evaluates one token with matrix-vector kernels. Both append to the preallocated cache, whose
`n_past` says how many positions it holds; `truncate(n)` forgets positions from n on (for prefix reuse).
"""
from __future__ import annotations

import os

import numba
import numpy as np

from edgeinfer.arch.decoder import DecoderConfig, DecoderWeights, LayerWeights, QuantMatrix
from edgeinfer.errors import EdgeInferError
from kernels_cpu import decode_step as step
from kernels_cpu.activation import gelu_tanh_mul_inplace, silu_mul_inplace
from kernels_cpu.attention import attention_cached
from kernels_cpu.dequant import dequantize
from kernels_cpu.matmul_q8 import matmul_q8
from kernels_cpu.norm import rms_norm
from kernels_cpu.rope import rope_inplace
from kernels_cpu.specialize import compile_in_background, decode_step_for, is_compiled


class ContextFull(EdgeInferError):
    """The tokens to evaluate do not fit in the KV cache's remaining positions."""


class LayerKVCache:
    """Keys and values of one layer by position: k (n_ctx, n_kv_heads, head_dim), v (n_ctx, n_kv_heads, value_dim).

    Views into the whole model's cache arrays, so a compiled step can take all layers as one array."""

    def __init__(self, k: np.ndarray, v: np.ndarray):
        self.k, self.v = k, v

    def store(self, start: int, k: np.ndarray, v: np.ndarray) -> None:
        self.k[start:start + len(k)] = k
        self.v[start:start + len(v)] = v


class KVCache:
    """The whole model's static cache, k (n_layers, n_ctx, n_kv_heads, head_dim) and v likewise, filled up to
    `n_past` positions; `layers[i]` is layer i's view."""

    def __init__(self, cfg: DecoderConfig, n_ctx: int):
        self.n_ctx = n_ctx
        self.k = np.zeros((cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim), dtype=np.float32)
        self.v = np.zeros((cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.value_dim), dtype=np.float32)
        self.layers = [LayerKVCache(self.k[i], self.v[i]) for i in range(cfg.n_layers)]
        self.n_past = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def nbytes_for(cfg: DecoderConfig, n_ctx: int) -> int:
        """Bytes a cache of n_ctx positions allocates for this model (the budget manager plans with this)."""
        return n_ctx * cfg.kv_bytes_per_token(np.dtype(np.float32).itemsize)


def linear(w: QuantMatrix, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x (n, n_cols) @ W.T -> (n, n_rows) for a block of tokens (prefill), with the decode step's int8 arithmetic."""
    y = matmul_q8(w.kernel_type, w.kernel_data, x)
    if bias is not None:
        y += bias
    return y


_NO_PACKED = np.zeros(64, np.uint8)  # stands in for the repacked buffer of weights that have none
_NO_PACKED.flags.writeable = False


class CompiledStep:
    """The arguments of `kernels_cpu.decode_step.decode_step` for one model: where each weight lies in the file,
    the small vectors copied into one table, the variant switches, and preallocated scratch buffers."""

    def __init__(self, cfg: DecoderConfig, w: DecoderWeights):
        def row(m: QuantMatrix):
            if m.packed is not None:  # the kernels' layout, in the repacked buffer
                return (m.packed_offset, m.packed_type, m.n_rows, m.n_cols, m.packed.shape[1], step.IN_PACKED)
            return (m.offset, m.ggml_type, m.n_rows, m.n_cols, m.raw.shape[1], step.IN_FILE)

        def fused(*ms: QuantMatrix):
            """One table row for matrices that lie one after another in the repacked buffer with one type and
            width, so one matvec computes them all; zeros otherwise."""
            first = ms[0]
            if all(m.packed is not None and m.packed_type == first.packed_type and m.n_cols == first.n_cols
                   for m in ms):
                ends = [m.packed_offset + m.packed.nbytes for m in ms]
                if all(m.packed_offset == end for m, end in zip(ms[1:], ends)):
                    return (first.packed_offset, first.packed_type, sum(m.n_rows for m in ms), first.n_cols,
                            first.packed.shape[1], step.IN_PACKED)
            return (0, 0, 0, 0, 0, 0)

        self.layer_mats = np.array([[row(getattr(lw, name)) for name in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                          "ffn_gate", "ffn_up", "ffn_down")]
                                    + [fused(lw.attn_q, lw.attn_k, lw.attn_v), fused(lw.ffn_gate, lw.ffn_up)]
                                    for lw in w.layers], dtype=np.int64)
        self.head_mats = np.array([row(w.token_embd), row(w.output)], dtype=np.int64)
        width = max(cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.value_dim)
        self.vecs = np.zeros((cfg.n_layers, step.N_VEC, width), dtype=np.float32)
        roles = {step.V_ATTN_NORM: "attn_norm", step.V_FFN_NORM: "ffn_norm", step.V_Q_BIAS: "attn_q_bias",
                 step.V_K_BIAS: "attn_k_bias", step.V_V_BIAS: "attn_v_bias", step.V_Q_NORM: "attn_q_norm",
                 step.V_K_NORM: "attn_k_norm", step.V_POST_ATTN: "post_attention_norm", step.V_POST_FFN: "post_ffw_norm"}
        for i, lw in enumerate(w.layers):
            for role, name in roles.items():
                vec = getattr(lw, name)
                if vec is not None:
                    self.vecs[i, role, :len(vec)] = vec
        self.output_norm = np.ascontiguousarray(w.output_norm)
        self.windows = np.array([cfg.layer_window(i) for i in range(cfg.n_layers)], dtype=np.int64)
        self.rope_bases = np.array([cfg.layer_rope_base(i) for i in range(cfg.n_layers)], dtype=np.float64)
        dims = np.zeros(step.N_DIMS, dtype=np.int64)
        dims[[step.D_MODEL, step.D_HEADS, step.D_KV_HEADS, step.D_HEAD_DIM, step.D_VALUE_DIM, step.D_FF,
              step.D_ROPE_DIMS, step.D_ROPE_STYLE, step.D_QKV_BIAS, step.D_QK_NORM, step.D_POST_NORMS, step.D_GELU,
              step.D_VOCAB]] = [cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.value_dim, cfg.d_ff,
                                cfg.rope_dims, cfg.rope_style, cfg.qkv_bias, cfg.qk_norm, cfg.post_norms,
                                cfg.activation == "gelu_tanh", cfg.n_vocab]
        self.dims = dims
        self.reals = np.array([cfg.norm_eps, cfg.embedding_scale, cfg.scale, cfg.final_logit_softcap], np.float64)
        self.weights = w.file_bytes
        self.packed = w.packed_bytes if w.packed_bytes is not None else _NO_PACKED
        self.buffers = step.StepBuffers(dims).as_tuple()
        self.logits = np.zeros(cfg.n_vocab, dtype=np.float32)
        # the step compiled with only this model's matvec kernels (a first run compiles those alone)
        used = self.layer_mats[:, :, 2] > 0
        self.type_ids = sorted(set(self.layer_mats[:, :, 1][used].tolist()) | {int(self.head_mats[1, 1])})
        self.decode_step = decode_step_for(self.type_ids, int(self.head_mats[0, 1]))

    def arguments(self, token: int, pos: int, cache: "KVCache") -> tuple:
        return (token, pos, self.weights, self.packed, self.layer_mats, self.head_mats, self.vecs, self.output_norm,
                self.windows, self.rope_bases, self.dims, self.reals, cache.k, cache.v, self.buffers, self.logits)

    def __call__(self, token: int, pos: int, cache: "KVCache") -> np.ndarray:
        self.decode_step(*self.arguments(token, pos, cache))
        return self.logits.copy()

    def compile_in_background(self, cache: "KVCache"):
        """A child process compiling this step into Numba's cache (see kernels_cpu.specialize), or None when the
        cache has it already or this machine has one core."""
        if is_compiled(self.decode_step) or (os.cpu_count() or 1) < 2:
            return None
        return compile_in_background(self.type_ids, int(self.head_mats[0, 1]), self.arguments(0, 0, cache))


class Engine:
    """Runs a decoder (config + weight views) over a static KV cache of n_ctx positions."""

    def __init__(self, cfg: DecoderConfig, weights: DecoderWeights, n_ctx: int, n_batch: int = 256,
                 n_threads: int | None = None):
        self.cfg, self.weights = cfg, weights
        self.n_ctx, self.n_batch = int(n_ctx), int(n_batch)
        self.n_threads = int(n_threads or numba.config.NUMBA_NUM_THREADS)
        if not 1 <= self.n_threads <= numba.config.NUMBA_NUM_THREADS:
            raise EdgeInferError(f"n_threads={self.n_threads}: this machine runs 1 to "
                                 f"{numba.config.NUMBA_NUM_THREADS} compute threads")
        self.cache = KVCache(cfg, self.n_ctx)
        self.step = CompiledStep(cfg, weights)

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    def reset(self) -> None:
        self.cache.n_past = 0

    def truncate(self, n: int) -> None:
        """Keep only the first n cached positions (the rest is overwritten by the next evaluation)."""
        self.cache.n_past = max(0, min(n, self.cache.n_past))

    # -- the two entry points ---------------------------------------------------------------------------------
    def prefill(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Evaluate prompt tokens after the cached ones; logits of the last token (n_vocab,), or of all (n, n_vocab)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) == 0:
            raise ValueError("prefill needs at least one token")
        self._check_room(len(tokens))
        out = []
        for start in range(0, len(tokens), self.n_batch):
            batch = tokens[start:start + self.n_batch]
            hidden = self._forward(batch)
            last = start + self.n_batch >= len(tokens)
            if all_logits:
                out.append(self._logits(hidden))
            elif last:
                out.append(self._logits(hidden[-1:])[0])
        return np.concatenate(out) if all_logits else out[-1]

    def decode(self, token: int) -> np.ndarray:
        """Evaluate one generated token; its logits (n_vocab,)."""
        self._check_room(1)
        numba.set_num_threads(self.n_threads)
        logits = self.step(int(token), self.cache.n_past, self.cache)
        self.cache.n_past += 1
        return logits

    def warm_up(self) -> None:
        """Compile (on a first run: about a minute) or load from Numba's cache the prefill and decode kernels, by
        evaluating a throw-away token after the cached ones; the cache is left as it was."""
        n_past = self.cache.n_past
        if n_past + 2 <= self.n_ctx:
            helper = self.step.compile_in_background(self.cache)  # first run: the decode step compiles meanwhile
            self.prefill([0])
            if helper is not None:
                helper.wait()
            self.decode(0)
            self.truncate(n_past)

    def _check_room(self, n: int) -> None:
        if self.cache.n_past + n > self.n_ctx:
            raise ContextFull(f"{n} more tokens do not fit: {self.cache.n_past} of {self.n_ctx} context positions "
                              f"are used")

    # -- the forward pass --------------------------------------------------------------------------------------
    def _forward(self, tokens: np.ndarray) -> np.ndarray:
        """Hidden states (n, d_model) after the last layer for tokens at positions n_past..n_past+n-1."""
        numba.set_num_threads(self.n_threads)
        cfg, w = self.cfg, self.weights
        start = self.cache.n_past
        positions = np.arange(start, start + len(tokens), dtype=np.int64)
        x = dequantize(w.token_embd.ggml_type, w.token_embd.raw[tokens], cfg.d_model)
        if cfg.embedding_scale != 1.0:
            x *= np.float32(cfg.embedding_scale)
        for i, layer in enumerate(w.layers):
            x += self._attention(i, layer, x, positions)
            x += self._feed_forward(layer, x)
        self.cache.n_past = start + len(tokens)
        return rms_norm(x, w.output_norm, cfg.norm_eps)

    def _attention(self, i: int, lw: LayerWeights, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        cfg, n = self.cfg, len(x)
        h = rms_norm(x, lw.attn_norm, cfg.norm_eps)
        q = linear(lw.attn_q, h, lw.attn_q_bias).reshape(n, cfg.n_heads, cfg.head_dim)
        k = linear(lw.attn_k, h, lw.attn_k_bias).reshape(n, cfg.n_kv_heads, cfg.head_dim)
        v = linear(lw.attn_v, h, lw.attn_v_bias).reshape(n, cfg.n_kv_heads, cfg.value_dim)
        if cfg.qk_norm:
            rms_norm(q, lw.attn_q_norm, cfg.norm_eps, out=q)
            rms_norm(k, lw.attn_k_norm, cfg.norm_eps, out=k)
        base = cfg.layer_rope_base(i)
        rope_inplace(q, positions, base, cfg.rope_dims, cfg.rope_style)
        rope_inplace(k, positions, base, cfg.rope_dims, cfg.rope_style)
        cache = self.cache.layers[i]
        cache.store(int(positions[0]), k, v)
        attn = np.empty((n, cfg.n_heads, cfg.value_dim), dtype=np.float32)
        attention_cached(q, positions, cache.k, cache.v, cfg.scale, cfg.layer_window(i), attn)
        out = linear(lw.attn_output, attn.reshape(n, -1))
        if cfg.post_norms:
            rms_norm(out, lw.post_attention_norm, cfg.norm_eps, out=out)
        return out

    def _feed_forward(self, lw: LayerWeights, x: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        h = rms_norm(x, lw.ffn_norm, cfg.norm_eps)
        gate, up = linear(lw.ffn_gate, h), linear(lw.ffn_up, h)
        if cfg.activation == "gelu_tanh":
            gelu_tanh_mul_inplace(gate, up)
        else:
            silu_mul_inplace(gate, up)
        out = linear(lw.ffn_down, gate)
        if cfg.post_norms:
            rms_norm(out, lw.post_ffw_norm, cfg.norm_eps, out=out)
        return out

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        logits = linear(self.weights.output, hidden)
        cap = self.cfg.final_logit_softcap
        if cap:
            logits = np.tanh(logits / cap) * cap
        return logits
