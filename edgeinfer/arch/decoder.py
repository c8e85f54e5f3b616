"""The pre-norm decoder family that llama, qwen2 and gemma3 are variants of.

`DecoderConfig` holds the hyper-parameters (read from `{arch}.*` GGUF keys) and the variant switches (biases, Q/K
norms, post-norms, activation, sliding window, RoPE style). `read_weights` maps GGUF's standard tensor names
(`blk.N.attn_q.weight`, ...) to canonical per-layer fields; weights stay views into the memory map.
An architecture module only builds a `DecoderConfig`; the engine executes any config of the family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeinfer.errors import GGUFError, UnsupportedError
from edgeinfer.gguf_reader import GGUFFile, TensorInfo
from kernels_cpu.formats import SUPPORTED_TYPES
from kernels_cpu.ops_reference import ROPE_NEOX, ROPE_NORMAL

__all__ = ["DecoderConfig", "DecoderWeights", "LayerWeights", "QuantMatrix", "read_common_hparams",
           "read_weights", "ROPE_NEOX", "ROPE_NORMAL"]


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters and variant switches of one decoder model."""

    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # key (and query) length per head
    value_dim: int  # value length per head
    d_ff: int
    n_vocab: int
    context_length: int  # the trained context
    norm_eps: float
    rope_base: float
    rope_dims: int  # leading dims of each head that RoPE rotates
    rope_style: int  # ROPE_NORMAL (pairs 2i, 2i+1) or ROPE_NEOX (pairs i, i + n/2)
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm of each query/key head before RoPE
    post_norms: bool = False  # RMSNorm of the attention and FFN outputs before the residual add
    embedding_scale: float = 1.0
    attention_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    sliding_window: int = 0  # keys a local layer sees (0: none)
    local_layers: tuple[bool, ...] = ()  # per layer: uses the sliding window
    rope_base_local: float = 0.0  # RoPE base on local layers (0: same as rope_base)
    final_logit_softcap: float = 0.0

    def layer_window(self, layer: int) -> int:
        return self.sliding_window if self.local_layers and self.local_layers[layer] else 0

    def layer_rope_base(self, layer: int) -> float:
        if self.local_layers and self.local_layers[layer] and self.rope_base_local:
            return self.rope_base_local
        return self.rope_base

    @property
    def scale(self) -> float:
        return self.attention_scale or 1.0 / math.sqrt(self.head_dim)

    def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        """KV-cache bytes one position costs across all layers."""
        return self.n_layers * self.n_kv_heads * (self.head_dim + self.value_dim) * bytes_per_value


def read_common_hparams(gguf: GGUFFile, arch: str) -> dict:
    """The hyper-parameters every member of the family stores under `{arch}.*`, as DecoderConfig keyword args."""

    def key(name, kind=int, default=None):
        full = f"{arch}.{name}"
        if full not in gguf.metadata and default is not None:
            return default
        value = gguf.require(full, (int, float) if kind is float else kind)
        if isinstance(value, np.ndarray):
            raise UnsupportedError(f"{gguf.path}: {full}: per-layer values are not supported")
        return kind(value)

    n_heads = key("attention.head_count")
    d_model = key("embedding_length")
    head_dim = key("attention.key_length", default=d_model // max(n_heads, 1))
    tokens = gguf.get("tokenizer.ggml.tokens")
    n_vocab = key("vocab_size", default=len(tokens) if tokens is not None else gguf.tensor("token_embd.weight").shape[0])
    hp = dict(
        arch=arch,
        n_layers=key("block_count"),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", default=n_heads),
        head_dim=head_dim,
        value_dim=key("attention.value_length", default=head_dim),
        d_ff=key("feed_forward_length"),
        n_vocab=n_vocab,
        context_length=key("context_length"),
        norm_eps=key("attention.layer_norm_rms_epsilon", float),
        rope_base=key("rope.freq_base", float, default=10000.0),
        rope_dims=key("rope.dimension_count", default=head_dim),
    )
    if hp["n_heads"] % hp["n_kv_heads"]:
        raise GGUFError(gguf.path, f"{arch}.attention.head_count_kv", None,
                        f"{hp['n_kv_heads']} does not divide head_count {hp['n_heads']}")
    return hp


@dataclass(frozen=True)
class QuantMatrix:
    """A 2-D weight (n_rows outputs x n_cols inputs) kept in its ggml block layout, as a view into the map."""

    name: str
    ggml_type: int
    raw: np.ndarray  # uint8 (n_rows, row_bytes)
    n_rows: int
    n_cols: int
    offset: int  # of the first byte in the file, so compiled code can find it in `DecoderWeights.file_bytes`
    # the kernels' own layout where one exists (edgeinfer.repacked): type id, array, offset in `packed_bytes`
    packed_type: int = -1
    packed: np.ndarray | None = None
    packed_offset: int = 0

    @property
    def kernel_type(self) -> int:
        """Type id of the layout the matvec kernels should read (repacked if there is one, else the ggml type)."""
        return self.packed_type if self.packed is not None else self.ggml_type

    @property
    def kernel_data(self) -> np.ndarray:
        return self.packed if self.packed is not None else self.raw


@dataclass
class LayerWeights:
    """One block's weights under canonical names; optional ones are None when the variant lacks them."""

    attn_norm: np.ndarray
    attn_q: QuantMatrix
    attn_k: QuantMatrix
    attn_v: QuantMatrix
    attn_output: QuantMatrix
    ffn_norm: np.ndarray
    ffn_gate: QuantMatrix
    ffn_up: QuantMatrix
    ffn_down: QuantMatrix
    attn_q_bias: np.ndarray | None = None
    attn_k_bias: np.ndarray | None = None
    attn_v_bias: np.ndarray | None = None
    attn_q_norm: np.ndarray | None = None
    attn_k_norm: np.ndarray | None = None
    post_attention_norm: np.ndarray | None = None
    post_ffw_norm: np.ndarray | None = None


@dataclass
class DecoderWeights:
    token_embd: QuantMatrix
    output_norm: np.ndarray
    output: QuantMatrix  # the LM head; the embedding itself when tied
    layers: list[LayerWeights] = field(default_factory=list)
    file_bytes: np.ndarray | None = None  # the whole memory-mapped file (read-only uint8), which all views share
    packed_bytes: np.ndarray | None = None  # all repacked matrices (read-only uint8; edgeinfer.repacked)


def _matrix(gguf: GGUFFile, name: str, n_rows: int, n_cols: int) -> QuantMatrix:
    t = gguf.tensor(name)
    if t.shape != (n_rows, n_cols):
        raise GGUFError(gguf.path, name, t.offset, f"shape {t.shape}, expected {(n_rows, n_cols)}")
    _check_type(gguf, t)
    return QuantMatrix(name, t.ggml_type, t.raw, n_rows, n_cols, t.offset)


def _vector(gguf: GGUFFile, name: str, n: int) -> np.ndarray:
    t = gguf.tensor(name)
    if t.type_name != "F32" or t.shape != (n,):
        raise GGUFError(gguf.path, name, t.offset, f"expected F32 of shape ({n},), found {t.type_name} {t.shape}")
    return t.array()


def _check_type(gguf: GGUFFile, t: TensorInfo) -> None:
    if t.ggml_type not in SUPPORTED_TYPES:
        raise UnsupportedError(f"{gguf.path}: tensor {t.name} has type {t.type_name}, which edgeinfer cannot compute")


def read_weights(gguf: GGUFFile, cfg: DecoderConfig) -> DecoderWeights:
    """Map the GGUF's standard tensor names onto canonical weights, checking every shape against `cfg`."""
    d, q_dim = cfg.d_model, cfg.n_heads * cfg.head_dim
    k_dim, v_dim = cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.value_dim
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        lw = LayerWeights(
            attn_norm=_vector(gguf, p + "attn_norm.weight", d),
            attn_q=_matrix(gguf, p + "attn_q.weight", q_dim, d),
            attn_k=_matrix(gguf, p + "attn_k.weight", k_dim, d),
            attn_v=_matrix(gguf, p + "attn_v.weight", v_dim, d),
            attn_output=_matrix(gguf, p + "attn_output.weight", d, cfg.n_heads * cfg.value_dim),
            ffn_norm=_vector(gguf, p + "ffn_norm.weight", d),
            ffn_gate=_matrix(gguf, p + "ffn_gate.weight", cfg.d_ff, d),
            ffn_up=_matrix(gguf, p + "ffn_up.weight", cfg.d_ff, d),
            ffn_down=_matrix(gguf, p + "ffn_down.weight", d, cfg.d_ff),
        )
        if cfg.qkv_bias:
            lw.attn_q_bias = _vector(gguf, p + "attn_q.bias", q_dim)
            lw.attn_k_bias = _vector(gguf, p + "attn_k.bias", k_dim)
            lw.attn_v_bias = _vector(gguf, p + "attn_v.bias", v_dim)
        if cfg.qk_norm:
            lw.attn_q_norm = _vector(gguf, p + "attn_q_norm.weight", cfg.head_dim)
            lw.attn_k_norm = _vector(gguf, p + "attn_k_norm.weight", cfg.head_dim)
        if cfg.post_norms:
            lw.post_attention_norm = _vector(gguf, p + "post_attention_norm.weight", d)
            lw.post_ffw_norm = _vector(gguf, p + "post_ffw_norm.weight", d)
        layers.append(lw)
    embd = _matrix(gguf, "token_embd.weight", cfg.n_vocab, d)
    output = _matrix(gguf, "output.weight", cfg.n_vocab, d) if "output.weight" in gguf.tensors else embd
    return DecoderWeights(embd, _vector(gguf, "output_norm.weight", d), output, layers, gguf.file_bytes)
