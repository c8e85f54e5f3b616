"""A model's weights on the device, in kernels_cuda's layout, uploaded once by CUDABackend.prepare.

Every matrix is decoded on the host into the exact int8 + scale/offset layout (kernels_cuda.layout; F16 kept as
float16) and uploaded; the small vectors (norms, biases) as float32; each layer's RoPE frequencies (scaling and
per-pair factors folded in, DecoderConfig.layer_rope_freqs) as float64. Q, K and V biases are joined into one vector
because the projections lie side by side in one activation buffer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeinfer.arch.decoder import DecoderConfig, DecoderWeights, QuantMatrix


@dataclass
class DeviceLayer:
    """One block's weights on the device; None where the variant lacks them."""

    qkv: list  # [fused Q|K|V] or [Q, K, V] DeviceMatrix
    gate_up: list  # [fused gate|up] or [gate, up]
    attn_output: object
    ffn_down: object
    attn_norm: object = None
    ffn_norm: object = None
    qkv_bias: object = None  # Q|K|V biases joined
    q_norm: object = None
    k_norm: object = None
    post_attention_norm: object = None
    post_ffw_norm: object = None
    rope_freqs: object = None  # float64 (rope_dims / 2,); None on a layer without RoPE
    window: int = 0


class DeviceWeights:
    """Every weight of one model on the device (see the module docstring)."""

    def __init__(self, cfg: DecoderConfig, w: DecoderWeights):
        from numba import cuda

        from kernels_cuda.layout import host_layout
        from kernels_cuda.linear import DeviceMatrix

        uploaded: dict[int, DeviceMatrix] = {}  # by file offset: a tied LM head is the embedding's upload

        def matrix(m: QuantMatrix | None):
            if m is None:
                return None
            if m.offset not in uploaded:
                uploaded[m.offset] = DeviceMatrix(host_layout(m.ggml_type, m.raw, m.n_cols))
            return uploaded[m.offset]

        def vector(v):
            return None if v is None else cuda.to_device(np.ascontiguousarray(v, dtype=np.float32))

        self.layers = []
        for i, lw in enumerate(w.layers):
            bias = None
            if cfg.qkv_bias:
                bias = np.concatenate([lw.attn_q_bias, lw.attn_k_bias, lw.attn_v_bias])
            freqs = cfg.layer_rope_freqs(i)
            self.layers.append(DeviceLayer(
                qkv=[matrix(lw.attn_qkv)] if lw.attn_qkv is not None else [matrix(lw.attn_q), matrix(lw.attn_k),
                                                                          matrix(lw.attn_v)],
                gate_up=[matrix(lw.ffn_gate_up)] if lw.ffn_gate_up is not None else [matrix(lw.ffn_gate),
                                                                                     matrix(lw.ffn_up)],
                attn_output=matrix(lw.attn_output), ffn_down=matrix(lw.ffn_down),
                attn_norm=vector(lw.attn_norm), ffn_norm=vector(lw.ffn_norm), qkv_bias=vector(bias),
                q_norm=vector(lw.attn_q_norm), k_norm=vector(lw.attn_k_norm),
                post_attention_norm=vector(lw.post_attention_norm), post_ffw_norm=vector(lw.post_ffw_norm),
                rope_freqs=cuda.to_device(np.ascontiguousarray(freqs, np.float64)) if np.any(freqs) else None,
                window=cfg.layer_window(i)))
        self.token_embd = matrix(w.token_embd)
        self.output = matrix(w.output)
        self.output_norm = vector(w.output_norm)
        self.nbytes = sum(m.nbytes for m in uploaded.values())
        self._step_bytes = self.nbytes - (self.token_embd.nbytes if self.output is not self.token_embd else 0)

    def weight_bytes_per_step(self) -> int:
        """Bytes of matrices one forward reads whatever its batch: all but an untied embedding (rows looked up)."""
        return self._step_bytes
