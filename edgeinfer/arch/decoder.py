"""The pre-norm decoder family that llama, qwen2 and gemma3 are variants of.

`DecoderConfig` holds the hyper-parameters (read from `{arch}.*` GGUF keys) and the variant switches (biases, Q/K
norms, post-norms, activation, sliding window, RoPE style). `read_weights` maps GGUF's standard tensor names
(`blk.N.attn_q.weight`, ...) to canonical per-layer fields; weights stay views into the memory map.
An architecture module only builds a `DecoderConfig`; a backend (edgeinfer.backends) executes any config of the
family, keeping whatever layout its kernels prefer to itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from edgeinfer.errors import GGUFError, UnsupportedError
from edgeinfer.gguf_reader import GGUFFile, TensorInfo
from kernels_cpu.formats import SUPPORTED_TYPES
from kernels_cpu.ops_reference import ROPE_NEOX, ROPE_NORMAL, rope_frequencies

__all__ = ["DecoderConfig", "DecoderWeights", "LayerWeights", "QuantMatrix", "read_common_hparams",
           "read_rope_factors", "read_weights", "ROPE_NEOX", "ROPE_NORMAL"]


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
    rope_scaling: str = "none"  # rope.scaling.type as llama.cpp reads it: none, linear, yarn or longrope
    rope_freq_scale: float = 1.0  # linear RoPE scaling: 1 / rope.scaling.factor (llama.cpp's freq_scale)
    rope_freq_scale_local: float = 0.0  # on local layers (0: same as rope_freq_scale)
    rope_freq_factors: tuple[float, ...] = ()  # per rotated pair, divides its frequency (Llama 3's rope_freqs)
    rope_orig_context: int = 0  # rope.scaling.original_context_length (default: context_length): YaRN's
    # correction dims and the context above which long-rope takes its long factors (llama.cpp's n_ctx_orig_yarn)
    rope_ext_factor: float = 0.0  # YaRN's extrapolation mix (llama.cpp's ext_factor): 1 for yarn, else 0
    rope_beta_fast: float = 32.0  # YaRN's correction range, in rotations over the original context (llama.cpp's
    rope_beta_slow: float = 1.0  # defaults: it reads no yarn_beta_* key for these families)
    rope_attn_factor: float = 1.0  # llama.cpp's attn_factor: cos and sin times it (and YaRN's 1 + 0.1 ln(factor))
    rope_factors_long: tuple[float, ...] = ()  # long-rope per-pair divisors (Phi-3 128k's rope_factors_long), used
    rope_factors_short: tuple[float, ...] = ()  # when the context exceeds rope_orig_context; else the short ones
    rope_context: int = 0  # positions per sequence the long/short choice was made for (for_context); 0: not yet
    rope_layers: tuple[bool, ...] = ()  # per layer: applies RoPE (SmolLM3's NoPE layers do not); () all do
    final_logit_softcap: float = 0.0
    attn_logit_softcap: float = 0.0  # soft-cap of the attention scores (Gemma 2)
    pre_norms: bool = True  # RMSNorm of each block's input (OLMo 2: False, only post-norms)
    qk_norm_whole: bool = False  # Q/K norms over the whole projection (OLMo 2), not per head
    residual_scale: float = 1.0  # block outputs scaled before the residual add (Granite's residual_multiplier)
    logit_scale: float = 1.0  # logits divided by this (Granite's logits_scaling)
    fused_qkv: bool = False  # Q, K and V stored as one attn_qkv matrix (Phi-3)
    fused_gate_up: bool = False  # gate and up stored as one ffn_up matrix of 2 * d_ff rows, gate first (Phi-3)
    ignored_keys: tuple[str, ...] = ()  # keys llama.cpp reads and deliberately does not apply (Phi-3's window)

    def layer_window(self, layer: int) -> int:
        return self.sliding_window if self.local_layers and self.local_layers[layer] else 0

    def layer_rope_base(self, layer: int) -> float:
        if self.local_layers and self.local_layers[layer] and self.rope_base_local:
            return self.rope_base_local
        return self.rope_base

    def layer_rope_freq_scale(self, layer: int) -> float:
        local = self.local_layers and self.local_layers[layer]
        return self.rope_freq_scale_local if local and self.rope_freq_scale_local else self.rope_freq_scale

    @property
    def long_rope(self) -> bool:
        """Whether the RoPE factors depend on the context (long-rope: rope_factors_long/short.weight)."""
        return bool(self.rope_factors_long or self.rope_factors_short)

    def for_context(self, n_ctx: int) -> DecoderConfig:
        """This config for n_ctx positions per sequence. A long-rope model takes its long factors when n_ctx,
        rounded up to a multiple of 256 as llama.cpp pads its context, exceeds rope_orig_context, else its short
        ones (llama.cpp's get_rope_factors); any other config is returned as it is."""
        return replace(self, rope_context=int(n_ctx)) if self.long_rope else self

    def layer_rope_freqs(self, layer: int) -> np.ndarray:
        """The angle per position of each rotated pair on this layer (float64, rope_dims / 2), RoPE scaling folded
        in; zeros on a layer without RoPE (the rotation by 0 is the identity).

        As llama.cpp's rope_yarn: pair i turns by pos * base^(-2i/rope_dims) / factor_i * (freq_scale * (1 - r_i)
        + r_i), where r_i is YaRN's ramp times ext_factor (0 without YaRN), linear in the position."""
        if self.rope_layers and not self.rope_layers[layer]:
            return np.zeros(self.rope_dims // 2)
        base, scale = self.layer_rope_base(layer), self.layer_rope_freq_scale(layer)
        freqs = rope_frequencies(base, self.rope_dims, self._rope_factors() or None)
        ramp = np.zeros(self.rope_dims // 2)
        if self.rope_ext_factor:
            ramp = yarn_ramp(self.rope_dims, self.rope_orig_context, base, self.rope_beta_fast,
                             self.rope_beta_slow) * self.rope_ext_factor
        return freqs * (scale * (1.0 - ramp) + ramp)

    def _rope_factors(self) -> tuple[float, ...]:
        """rope_freqs.weight's factors where the file has them (they win, as in llama.cpp), else long-rope's for
        the chosen context."""
        if self.rope_freq_factors or not self.long_rope:
            return self.rope_freq_factors
        if not self.rope_context:
            raise ValueError("the long-rope factors depend on the context: choose it with for_context(n_ctx)")
        padded = -(-self.rope_context // 256) * 256  # llama.cpp's GGML_PAD(n_ctx, 256)
        return self.rope_factors_long if padded > self.rope_orig_context else self.rope_factors_short

    def layer_rope_mscale(self, layer: int) -> float:
        """What llama.cpp multiplies cos and sin by on this layer (its attn_factor, times YaRN's magnitude
        correction 1 + 0.1 ln(1 / freq_scale)); 1 on a layer without RoPE. Q and K both turn by it, so the
        attention scores scale by its square: `scale` folds that in."""
        if self.rope_layers and not self.rope_layers[layer]:
            return 1.0
        if self.rope_ext_factor:
            return self.rope_attn_factor * (1.0 + 0.1 * math.log(1.0 / self.layer_rope_freq_scale(layer)))
        return self.rope_attn_factor

    @property
    def scale(self) -> float:
        """The attention scores' scale, RoPE's magnitude (layer_rope_mscale squared) folded in: it is the same on
        every layer (check_implemented refuses a file where it is not)."""
        mscale = self.layer_rope_mscale(0)
        return (self.attention_scale or 1.0 / math.sqrt(self.head_dim)) * mscale * mscale

    def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        """KV-cache bytes one position costs across all layers."""
        return self.n_layers * self.n_kv_heads * (self.head_dim + self.value_dim) * bytes_per_value


# upper bounds far beyond any model this runtime could hold, so a hostile count fails here and not in an allocation
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20  # embedding_length, feed_forward_length, key/value_length
MAX_HEADS = 1 << 14
MAX_CONTEXT = 1 << 30


def read_common_hparams(gguf: GGUFFile, arch: str) -> dict:
    """The hyper-parameters every member of the family stores under `{arch}.*`, as DecoderConfig keyword args.

    Every count is checked to be a positive int in a sane range, every real finite and positive, and the counts
    consistent with each other (head_count_kv divides head_count, RoPE dims even and within a head, vocab_size equal
    to the token list); a bad one is a GGUFError naming the key."""

    def key(name, kind=int, default=None):
        full = f"{arch}.{name}"
        if full not in gguf.metadata and default is not None:
            return default
        value = gguf.require(full, (int, float) if kind is float else kind)
        if isinstance(value, np.ndarray):
            raise UnsupportedError(f"{gguf.path}: {full}: per-layer values are not supported")
        return kind(value)

    def count(name, high, default=None, low=1):
        value = key(name, default=default)
        if not low <= value <= high:
            gguf.fail(f"{arch}.{name}", None, f"{value} is out of range (expected {low} to {high})")
        return value

    def positive_real(name, default=None):
        value = key(name, float, default=default)
        if not (math.isfinite(value) and value > 0):
            gguf.fail(f"{arch}.{name}", None, f"{value} must be a finite number above 0")
        return value

    n_heads = count("attention.head_count", MAX_HEADS)
    d_model = count("embedding_length", MAX_WIDTH)
    if f"{arch}.attention.key_length" not in gguf.metadata and d_model % n_heads:
        gguf.fail(f"{arch}.attention.head_count", None,
                  f"{n_heads} does not divide embedding_length {d_model} (and no key_length is given)")
    head_dim = count("attention.key_length", MAX_WIDTH, default=d_model // n_heads)
    n_kv_heads = count("attention.head_count_kv", n_heads, default=n_heads)
    if n_heads % n_kv_heads:
        gguf.fail(f"{arch}.attention.head_count_kv", None, f"{n_kv_heads} does not divide head_count {n_heads}")
    rope_dims = count("rope.dimension_count", head_dim, default=head_dim, low=2)
    if rope_dims % 2:
        gguf.fail(f"{arch}.rope.dimension_count", None, f"{rope_dims} is odd: RoPE rotates pairs")
    context_length = count("context_length", MAX_CONTEXT)
    return dict(
        arch=arch,
        **_rope_scaling(gguf, arch, context_length),
        n_layers=count("block_count", MAX_LAYERS),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        value_dim=count("attention.value_length", MAX_WIDTH, default=head_dim),
        d_ff=count("feed_forward_length", MAX_WIDTH),
        n_vocab=_vocab_size(gguf, arch, key),
        context_length=context_length,
        norm_eps=positive_real("attention.layer_norm_rms_epsilon"),
        rope_base=positive_real("rope.freq_base", default=10000.0),
        rope_dims=rope_dims,
    )


def optional_number(gguf: GGUFFile, key: str, kind: type, default, low=0, high=math.inf):
    """The metadata value at key: a finite number in [low, high] (default when absent), else a GGUFError naming the
    key. kind int wants an integer; float takes either."""
    if key not in gguf.metadata:
        return default
    value = gguf.require(key, (int, float) if kind is float else int)
    if not (math.isfinite(value) and low <= value <= high):
        gguf.fail(key, None, f"{value} is out of range (a finite number from {low} to {high})")
    return kind(value)


def sliding_window_layers(gguf: GGUFFile, arch: str, n_layers: int, period: int) -> tuple[bool, ...]:
    """Per layer, whether it uses the sliding window, as llama.cpp's load_swa_pattern: the flags stored as the array
    `{arch}.attention.sliding_window_pattern`, else layers i with i % n < n - 1 for the period n stored there or,
    by default, `period` (a period of 1: no local layer)."""
    key = f"{arch}.attention.sliding_window_pattern"
    value = gguf.get(key, period)
    if isinstance(value, np.ndarray):
        if value.shape != (n_layers,):
            gguf.fail(key, None, f"{value.shape[0] if value.ndim == 1 else value.shape} flags for {n_layers} layers")
        return tuple(bool(v) for v in value)
    n = optional_number(gguf, key, int, period, low=0, high=MAX_LAYERS) if key in gguf.metadata else period
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layers))


ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama.cpp's; "linear" where none is stored


def _rope_scaling(gguf: GGUFFile, arch: str, context_length: int) -> dict:
    """RoPE scaling as llama.cpp's hparams and llama_context set it up for the dense families (DecoderConfig fields):
    freq_scale 1 / `rope.scaling.factor` (or the older `rope.scale_linear`; 1 when absent, 0, or the type is none);
    for `rope.scaling.type` yarn, ext_factor 1 and an attn_factor that cancels YaRN's magnitude correction where
    the factor is above 1 (it is applied inside the rotation: together 1 + 0.1 ln(factor)); times
    `rope.scaling.attn_factor` for any type (Phi-3's long-rope). The `rope.scaling.yarn_*` keys are not read: llama.cpp
    reads them for none of these families, so YaRN's beta_fast/beta_slow stay 32 and 1. An unknown type is
    check_implemented's to refuse."""
    meta = gguf.metadata
    kind = meta.get(f"{arch}.rope.scaling.type", "linear")
    kind = kind if isinstance(kind, str) else repr(kind)
    factor = 0.0
    for name in ("rope.scaling.factor", "rope.scale_linear"):
        key = f"{arch}.{name}"
        if key in meta:
            factor = gguf.require(key, (int, float))
            if not (math.isfinite(factor) and factor >= 0):
                gguf.fail(key, None, f"{factor} must be a finite number, 0 or above")
            break
    freq_scale = 1.0 / factor if factor and kind != "none" else 1.0
    orig = optional_number(gguf, f"{arch}.rope.scaling.original_context_length", int, 0, high=MAX_CONTEXT)
    attn_factor = optional_number(gguf, f"{arch}.rope.scaling.attn_factor", float, 1.0, low=1e-30, high=1e30)
    ext_factor = 1.0 if kind == "yarn" else 0.0
    if ext_factor:
        factor = 1.0 / freq_scale
        mscale = 1.0 + 0.1 * math.log(factor) if factor > 1.0 else 1.0  # llama.cpp's get_mscale(factor, 1)
        attn_factor *= mscale / (1.0 + 0.1 * math.log(factor))
    return dict(rope_scaling=kind, rope_freq_scale=freq_scale, rope_orig_context=orig or context_length,
                rope_ext_factor=ext_factor, rope_attn_factor=attn_factor)


def yarn_ramp(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float) -> np.ndarray:
    """YaRN's ramp per rotated pair (float64, n_dims / 2), as llama.cpp's ggml_rope_yarn_corr_dims and
    rope_yarn_ramp (in float32, so the correction dims round alike): 1 for the pairs that turn more than beta_fast
    times over the original context (kept as trained), 0 for those turning fewer than beta_slow times (interpolated
    by freq_scale), linear between."""
    f32 = np.float32

    def corr_dim(n_rot: float) -> np.float32:  # the pair that turns n_rot times over n_ctx_orig positions
        return (f32(n_dims) * np.log(f32(n_ctx_orig) / (f32(n_rot) * f32(2) * f32(math.pi)))
                / (f32(2) * np.log(f32(base))))

    low = max(f32(0), np.floor(corr_dim(beta_fast)))
    high = min(f32(n_dims - 1), np.ceil(corr_dim(beta_slow)))
    y = (np.arange(n_dims // 2, dtype=np.float32) - low) / max(f32(0.001), f32(high - low))
    return (f32(1) - np.clip(y, f32(0), f32(1))).astype(np.float64)


def read_rope_factors(gguf: GGUFFile, rope_dims: int) -> dict:
    """The RoPE factor tensors a llama-like file may carry, as DecoderConfig fields: Llama 3's `rope_freqs.weight`
    (rope_freq_factors) and long-rope's `rope_factors_long/short.weight` (Phi-3 128k: which one applies depends on
    the context, see DecoderConfig.for_context). Absent ones are ()."""
    names = {"rope_freq_factors": "rope_freqs.weight", "rope_factors_long": "rope_factors_long.weight",
             "rope_factors_short": "rope_factors_short.weight"}
    return {field_name: _factor_tensor(gguf, name, rope_dims) for field_name, name in names.items()}


def _factor_tensor(gguf: GGUFFile, name: str, rope_dims: int) -> tuple[float, ...]:
    """RoPE frequency factors (F32, one per rotated pair; llama.cpp divides each pair's frequency by its factor),
    () when the file has none. Each must be finite and above 0."""
    if name not in gguf.tensors:
        return ()
    t = gguf.tensor(name)
    if t.type_name != "F32" or t.shape != (rope_dims // 2,):
        raise GGUFError(gguf.path, name, t.offset,
                        f"expected F32 of shape ({rope_dims // 2},), found {t.type_name} {t.shape}")
    factors = t.array().astype(np.float64)
    if not np.all(np.isfinite(factors) & (factors > 0)):
        raise GGUFError(gguf.path, name, t.offset, "a factor is not a finite number above 0")
    return tuple(factors.tolist())


def _vocab_size(gguf: GGUFFile, arch: str, key) -> int:
    """`{arch}.vocab_size`, which must equal the token list's length (the tokenizer and the LM head share ids)."""
    tokens = gguf.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else None
    default = n_tokens if n_tokens is not None else gguf.tensor("token_embd.weight").shape[0]
    n_vocab = key("vocab_size", default=default)
    if n_vocab < 1:
        gguf.fail(f"{arch}.vocab_size", None, f"{n_vocab} is out of range (expected at least 1)")
    if n_tokens is not None and n_vocab != n_tokens:
        gguf.fail(f"{arch}.vocab_size", None,
                  f"{n_vocab} does not match the {n_tokens} tokens of tokenizer.ggml.tokens")
    return n_vocab


def check_implemented(gguf: GGUFFile, cfg: DecoderConfig) -> None:
    """Refuse, naming the key, a file that asks for something the family's forward pass does not compute (an unknown
    RoPE scaling or one whose magnitude differs between layers, attention soft-capping, mixture of experts, a sliding
    window or final soft-cap that the architecture module did not take up) rather than run it with silently wrong
    results; and check every special token id."""
    arch, meta = cfg.arch, gguf.metadata

    def refuse(key: str, what: str):
        raise UnsupportedError(f"{gguf.path}: {key} = {_short(meta[key])}: {what} is not implemented")

    scaling = f"{arch}.rope.scaling.type"
    if scaling in meta and not _is_one_of(meta[scaling], *ROPE_SCALING_TYPES):
        refuse(scaling, "this RoPE scaling")
    # RoPE's magnitude (cos and sin times it) is folded into the forward's one attention scale: exact only where it
    # is the same on every layer and every dim of the heads is rotated
    mscales = sorted({cfg.layer_rope_mscale(i) for i in range(cfg.n_layers)})
    magnitude_key = scaling if cfg.rope_ext_factor else f"{arch}.rope.scaling.attn_factor"
    if len(mscales) > 1:
        refuse(magnitude_key, f"RoPE scaling whose magnitude differs between layers ({mscales[0]:.4g} to "
                              f"{mscales[-1]:.4g}: layers without RoPE or with their own frequency scale)")
    if mscales != [1.0] and cfg.rope_dims < cfg.head_dim:
        refuse(magnitude_key, f"RoPE scaling with a magnitude ({mscales[0]:.4g}) on partly rotated heads ("
                              f"{cfg.rope_dims} of {cfg.head_dim} dims, e.g. Phi-4 mini's long-rope)")
    features = {  # key -> (what it asks for, whether this config computes it)
        f"{arch}.attn_logit_softcapping": (f"soft-capping of the attention logits for {arch}",
                                           cfg.attn_logit_softcap),
        f"{arch}.final_logit_softcapping": (f"soft-capping of the output logits for {arch}", cfg.final_logit_softcap),
        f"{arch}.attention.sliding_window": (f"sliding-window attention for {arch}", cfg.sliding_window),
        f"{arch}.expert_count": ("mixture of experts", False),
    }
    for key, (what, computed) in features.items():
        if key in meta and not _is_one_of(meta[key], 0) and not computed and key not in cfg.ignored_keys:
            refuse(key, what)
    for key, value in meta.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if not _is_int(value) or not 0 <= value < cfg.n_vocab:
                gguf.fail(key, None, f"{_short(value)} is not a token id of the {cfg.n_vocab}-token vocabulary")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_one_of(value, *allowed) -> bool:
    """value == one of `allowed`, for metadata that may be of any GGUF type (an array is never equal)."""
    return isinstance(value, (int, float, str)) and not isinstance(value, bool) and value in allowed


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class QuantMatrix:
    """A 2-D weight (n_rows outputs x n_cols inputs) kept in its ggml block layout, as a view into the map."""

    name: str
    ggml_type: int
    raw: np.ndarray  # uint8 (n_rows, row_bytes)
    n_rows: int
    n_cols: int
    offset: int  # of the first byte in the file: where compiled code finds it in `DecoderWeights.file_bytes`, and
    # the key a backend files its own copy under (edgeinfer.backends: the CPU one repacks, a GPU one uploads)


@dataclass
class LayerWeights:
    """One block's weights under canonical names; optional ones are None when the variant lacks them (the norms of
    a post-norm-only family; Q, K, V where one fused attn_qkv holds them; gate and up where ffn_gate_up does)."""

    attn_output: QuantMatrix
    ffn_down: QuantMatrix
    attn_norm: np.ndarray | None = None
    ffn_norm: np.ndarray | None = None
    attn_q: QuantMatrix | None = None
    attn_k: QuantMatrix | None = None
    attn_v: QuantMatrix | None = None
    ffn_gate: QuantMatrix | None = None
    ffn_up: QuantMatrix | None = None
    attn_qkv: QuantMatrix | None = None  # Q | K | V rows in one matrix (Phi-3)
    ffn_gate_up: QuantMatrix | None = None  # gate | up rows in one matrix (Phi-3's ffn_up)
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


# tensors a file may carry that this family has no use for, with what they ask for (named in the refusal)
_KNOWN_UNIMPLEMENTED = {"rope_freqs.weight": "Llama 3 RoPE frequency scaling (rope_freqs.weight)",
                        "rope_factors_long.weight": "long-context RoPE scaling (rope_factors_long.weight)",
                        "rope_factors_short.weight": "long-context RoPE scaling (rope_factors_short.weight)"}


class _TensorReader:
    """Reads the weights read_weights asks for, checking shapes and types, and remembers which names it used."""

    def __init__(self, gguf: GGUFFile):
        self.gguf, self.used = gguf, set()

    def matrix(self, name: str, n_rows: int, n_cols: int) -> QuantMatrix:
        t = self._tensor(name)
        if t.shape != (n_rows, n_cols):
            raise GGUFError(self.gguf.path, name, t.offset, f"shape {t.shape}, expected {(n_rows, n_cols)}")
        if t.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedError(f"{self.gguf.path}: tensor {name} has type {t.type_name}, which edgeinfer "
                                   "cannot compute")
        return QuantMatrix(name, t.ggml_type, t.raw, n_rows, n_cols, t.offset)

    def vector(self, name: str, n: int) -> np.ndarray:
        t = self._tensor(name)
        if t.type_name != "F32" or t.shape != (n,):
            raise GGUFError(self.gguf.path, name, t.offset,
                            f"expected F32 of shape ({n},), found {t.type_name} {t.shape}")
        return t.array()

    def _tensor(self, name: str) -> TensorInfo:
        self.used.add(name)
        return self.gguf.tensor(name)

    def check_all_used(self) -> None:
        """Refuse a file with tensors the forward pass would ignore (a block's extra bias, RoPE factors, ...)."""
        unused = sorted(set(self.gguf.tensors) - self.used)
        if not unused:
            return
        known = [_KNOWN_UNIMPLEMENTED[n] for n in unused if n in _KNOWN_UNIMPLEMENTED]
        what = known[0] if known else f"the tensor {unused[0]}"
        more = f" ({len(unused)} unused tensors: {', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})"
        raise UnsupportedError(f"{self.gguf.path}: {what} is not implemented for {self.gguf.architecture}"
                               f"{more if len(unused) > 1 else ''}")


def read_weights(gguf: GGUFFile, cfg: DecoderConfig) -> DecoderWeights:
    """Map the GGUF's standard tensor names onto canonical weights, checking every shape against `cfg`; a tensor
    left over (one the forward pass would ignore) is refused by name."""
    r = _TensorReader(gguf)
    d, q_dim = cfg.d_model, cfg.n_heads * cfg.head_dim
    k_dim, v_dim = cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.value_dim
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        lw = LayerWeights(
            attn_output=r.matrix(p + "attn_output.weight", d, cfg.n_heads * cfg.value_dim),
            ffn_down=r.matrix(p + "ffn_down.weight", d, cfg.d_ff),
        )
        if cfg.pre_norms:
            lw.attn_norm = r.vector(p + "attn_norm.weight", d)
            lw.ffn_norm = r.vector(p + "ffn_norm.weight", d)
        if cfg.fused_qkv:
            lw.attn_qkv = r.matrix(p + "attn_qkv.weight", q_dim + k_dim + v_dim, d)
        else:
            lw.attn_q = r.matrix(p + "attn_q.weight", q_dim, d)
            lw.attn_k = r.matrix(p + "attn_k.weight", k_dim, d)
            lw.attn_v = r.matrix(p + "attn_v.weight", v_dim, d)
        if cfg.fused_gate_up:
            lw.ffn_gate_up = r.matrix(p + "ffn_up.weight", 2 * cfg.d_ff, d)
        else:
            lw.ffn_gate = r.matrix(p + "ffn_gate.weight", cfg.d_ff, d)
            lw.ffn_up = r.matrix(p + "ffn_up.weight", cfg.d_ff, d)
        if cfg.qkv_bias:
            lw.attn_q_bias = r.vector(p + "attn_q.bias", q_dim)
            lw.attn_k_bias = r.vector(p + "attn_k.bias", k_dim)
            lw.attn_v_bias = r.vector(p + "attn_v.bias", v_dim)
        if cfg.qk_norm:
            lw.attn_q_norm = r.vector(p + "attn_q_norm.weight", q_dim if cfg.qk_norm_whole else cfg.head_dim)
            lw.attn_k_norm = r.vector(p + "attn_k_norm.weight", k_dim if cfg.qk_norm_whole else cfg.head_dim)
        if cfg.post_norms:
            lw.post_attention_norm = r.vector(p + "post_attention_norm.weight", d)
            lw.post_ffw_norm = r.vector(p + "post_ffw_norm.weight", d)
        layers.append(lw)
    embd = r.matrix("token_embd.weight", cfg.n_vocab, d)
    output = r.matrix("output.weight", cfg.n_vocab, d) if "output.weight" in gguf.tensors else embd
    output_norm = r.vector("output_norm.weight", d)
    for name, factors in (("rope_freqs.weight", cfg.rope_freq_factors), ("rope_factors_long.weight",
                          cfg.rope_factors_long), ("rope_factors_short.weight", cfg.rope_factors_short)):
        if factors:
            r.used.add(name)  # read into the config (read_rope_factors)
    r.check_all_used()
    return DecoderWeights(embd, output_norm, output, layers, gguf.file_bytes)
