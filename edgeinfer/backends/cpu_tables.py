"""The tables the compiled CPU forward (`kernels_cpu.forward`) reads, built from an architecture's config and weights.

This is the one place where the variant switches of `DecoderConfig` become what compiled code sees (`Hyper`), and
where each weight's bytes are located (`MATRIX` records: the repacked buffer where `Repacked` says a matrix has the
kernels' layout, else the memory-mapped file).
"""
from __future__ import annotations

import numpy as np

from edgeinfer.arch.decoder import DecoderConfig, DecoderWeights, QuantMatrix
from edgeinfer.backends.cpu_repack import Repacked
from kernels_cpu import forward as fw
from kernels_cpu.matvec_q8 import weight_rows

_NO_PACKED = np.zeros(64, np.uint8)  # stands in for the repacked buffer of a model that has none
_NO_PACKED.flags.writeable = False
NO_REPACKING = Repacked(None, {})  # every matrix read in its file layout

# per-layer vector roles -> LayerWeights field names
VECTOR_FIELDS = {fw.V_ATTN_NORM: "attn_norm", fw.V_FFN_NORM: "ffn_norm", fw.V_Q_BIAS: "attn_q_bias",
                 fw.V_K_BIAS: "attn_k_bias", fw.V_V_BIAS: "attn_v_bias", fw.V_Q_NORM: "attn_q_norm",
                 fw.V_K_NORM: "attn_k_norm", fw.V_POST_ATTN: "post_attention_norm", fw.V_POST_FFN: "post_ffw_norm"}
# per-layer matrix roles -> LayerWeights field names (the fused roles are built from these)
MATRIX_FIELDS = {fw.M_Q: "attn_q", fw.M_K: "attn_k", fw.M_V: "attn_v", fw.M_O: "attn_output", fw.M_GATE: "ffn_gate",
                 fw.M_UP: "ffn_up", fw.M_DOWN: "ffn_down"}


def hyper(cfg: DecoderConfig) -> fw.Hyper:
    """The hyper-parameters and variant switches compiled code reads."""
    return fw.Hyper(
        d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        value_dim=cfg.value_dim, d_ff=cfg.d_ff, n_vocab=cfg.n_vocab, rope_dims=cfg.rope_dims,
        rope_style=cfg.rope_style, qkv_bias=bool(cfg.qkv_bias), qk_norm=bool(cfg.qk_norm),
        post_norms=bool(cfg.post_norms), gelu=cfg.activation == "gelu_tanh", pre_norms=bool(cfg.pre_norms),
        qk_norm_whole=bool(cfg.qk_norm_whole), norm_eps=float(cfg.norm_eps),
        embedding_scale=float(cfg.embedding_scale), attention_scale=float(cfg.scale),
        logit_softcap=float(cfg.final_logit_softcap), attn_softcap=float(cfg.attn_logit_softcap),
        residual_scale=float(cfg.residual_scale), logit_scale=float(cfg.logit_scale),
        n_layers=int(cfg.n_layers))


NO_MATRIX = (0, 0, 0, 0, 0, fw.IN_FILE)


def _record(m: QuantMatrix | None, repacked: Repacked) -> tuple:
    if m is None:  # a matrix this variant lacks (stored fused, or not at all)
        return NO_MATRIX
    p = repacked.get(m)
    if p is not None:  # the kernels' layout, in the repacked buffer
        return (p.offset, p.type_id, m.n_rows, m.n_cols, p.row_bytes, fw.IN_PACKED)
    return (m.offset, m.ggml_type, m.n_rows, m.n_cols, m.raw.shape[1], fw.IN_FILE)


def _fused(repacked: Repacked, *ms: QuantMatrix) -> tuple:
    """One record for matrices that lie one after another in the repacked buffer with one type and width, so one
    matvec computes them all; NO_MATRIX otherwise."""
    if any(m is None for m in ms):
        return NO_MATRIX
    ps = [repacked.get(m) for m in ms]
    first, p0 = ms[0], ps[0]
    if all(p is not None and p.type_id == p0.type_id and m.n_cols == first.n_cols for m, p in zip(ms, ps)):
        if all(p.offset == before.offset + before.nbytes for before, p in zip(ps, ps[1:])):
            return (p0.offset, p0.type_id, sum(m.n_rows for m in ms), first.n_cols, p0.row_bytes, fw.IN_PACKED)
    return NO_MATRIX


class ForwardTables:
    """Everything `kernels_cpu.forward.forward` needs about one model, apart from the batch, cache and scratch."""

    def __init__(self, cfg: DecoderConfig, w: DecoderWeights, repacked: Repacked = NO_REPACKING):
        self.hyper = hyper(cfg)
        self.layer_mats = np.zeros((cfg.n_layers, fw.N_MAT), fw.MATRIX)
        for i, lw in enumerate(w.layers):
            for role, name in MATRIX_FIELDS.items():
                self.layer_mats[i, role] = _record(getattr(lw, name), repacked)
            # stored as one matrix (Phi-3), or apart but adjacent in the repacked buffer
            self.layer_mats[i, fw.M_QKV] = (_record(lw.attn_qkv, repacked) if lw.attn_qkv is not None
                                            else _fused(repacked, lw.attn_q, lw.attn_k, lw.attn_v))
            self.layer_mats[i, fw.M_GATE_UP] = (_record(lw.ffn_gate_up, repacked) if lw.ffn_gate_up is not None
                                                else _fused(repacked, lw.ffn_gate, lw.ffn_up))
        self.head_mats = np.zeros(2, fw.MATRIX)
        # embedding rows are looked up in the file's own layout, even where a tied LM head shares them repacked
        self.head_mats[fw.H_EMBED] = _record(w.token_embd, NO_REPACKING)
        self.head_mats[fw.H_OUTPUT] = _record(w.output, repacked)
        width = max(cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.value_dim)
        self.vecs = np.zeros((cfg.n_layers, fw.N_VEC, width), dtype=np.float32)
        for i, lw in enumerate(w.layers):
            for role, name in VECTOR_FIELDS.items():
                vec = getattr(lw, name)
                if vec is not None:
                    self.vecs[i, role, :len(vec)] = vec
        self.output_norm = np.ascontiguousarray(w.output_norm)
        self.windows = np.array([cfg.layer_window(i) for i in range(cfg.n_layers)], dtype=np.int64)
        self.rope_freqs = np.stack([cfg.layer_rope_freqs(i) for i in range(cfg.n_layers)])  # (layers, rope_dims/2)
        self.weights = w.file_bytes
        self.packed = repacked.buffer if repacked.buffer is not None else _NO_PACKED
        used = self.layer_mats["n_rows"] > 0
        # the type ids whose kernels this model needs (the forward is compiled with only those)
        self.type_ids = sorted(set(self.layer_mats["type_id"][used].tolist())
                               | {int(self.head_mats[fw.H_OUTPUT]["type_id"])})
        self.embedding_type = int(self.head_mats[fw.H_EMBED]["type_id"])

    def weight_bytes_per_step(self) -> int:
        """Bytes of matrices one forward step reads, whatever its batch: every layer matrix and the LM head
        (embedding rows and norm vectors are too few to count)."""
        def nbytes(m) -> int:
            return int(weight_rows(int(m["type_id"]), int(m["n_rows"])) * m["row_bytes"])

        layers = 0
        for mats in self.layer_mats:  # a fused record and its parts' own records describe the same bytes
            qkv = [fw.M_QKV] if mats[fw.M_QKV]["n_rows"] else [fw.M_Q, fw.M_K, fw.M_V]
            gate_up = [fw.M_GATE_UP] if mats[fw.M_GATE_UP]["n_rows"] else [fw.M_GATE, fw.M_UP]
            layers += sum(nbytes(mats[role]) for role in qkv + gate_up + [fw.M_O, fw.M_DOWN])
        return layers + nbytes(self.head_mats[fw.H_OUTPUT])

    def arguments(self, tokens, positions, seqs, logit_rows, k_cache, v_cache, scratch, logits) -> tuple:
        """The argument tuple of `forward` for one batch."""
        return (tokens, positions, seqs, logit_rows, self.weights, self.packed, self.layer_mats, self.head_mats,
                self.vecs, self.output_norm, self.windows, self.rope_freqs, self.hyper, k_cache, v_cache, scratch,
                logits)
