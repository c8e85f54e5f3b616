"""`edgeinfer perplexity`: perplexity of a model on a text file, computed the way llama.cpp's llama-perplexity does.

As in tools/perplexity/perplexity.cpp (the non-strided path): the whole text is tokenized once (with BOS if the
model's tokenizer adds one, special tokens not parsed); it is cut into floor(n_tokens / n_ctx) non-overlapping chunks
of n_ctx tokens; each chunk is evaluated on a fresh context, with its first token replaced by BOS when the model
adds BOS; only the second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 predicting the tokens at
n_ctx/2 + 1 .. n_ctx-1 (n_ctx - 1 - n_ctx/2 tokens per chunk). PPL = exp(mean NLL), reported with llama.cpp's
uncertainty sqrt(var(NLL) / (count - 1)) * PPL. With a base model, the mean KL divergence KL(base || model) of the
next-token distributions at the same positions, and how often both put the same token first, llama.cpp's
--kl-divergence figures (computed here from full-precision base logits instead of its 16-bit log-probability file).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeinfer.errors import EdgeInferError


MIN_CTX = 4  # smallest chunk with at least 2 context positions before its scored half (n_ctx/2 >= 2)


class PerplexityError(EdgeInferError):
    """The text is too short for the context, or the base model does not match."""


@dataclass
class Estimate:
    mean: float
    err: float  # one standard error


@dataclass
class PerplexityResult:
    ppl: Estimate
    n_ctx: int
    n_chunks: int
    n_scored: int  # tokens whose prediction was scored
    kld: Estimate | None = None  # mean KL(base || model), nats
    same_top: Estimate | None = None  # fraction of positions where both models rank the same token first
    base_ppl: Estimate | None = None

    def report(self) -> str:
        lines = [f"Final estimate: PPL = {self.ppl.mean:.4f} +/- {self.ppl.err:.5f}  "
                 f"({self.n_chunks} chunks of {self.n_ctx} tokens, {self.n_scored} scored)"]
        if self.kld is not None:
            lines.append(f"Base PPL = {self.base_ppl.mean:.4f} +/- {self.base_ppl.err:.5f}")
            lines.append(f"Mean KLD: {self.kld.mean:10.6f} +/- {self.kld.err:10.6f}")
            lines.append(f"Same top p: {100 * self.same_top.mean:6.3f} +/- {100 * self.same_top.err:5.3f} %")
        return "\n".join(lines)


def mean_and_error(total: float, total_sq: float, count: int) -> Estimate:
    """llama.cpp's mean and standard error from a sum and a sum of squares."""
    mean = total / count
    var = total_sq / count - mean * mean
    return Estimate(mean, math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def chunk_tokens(tokens: list[int], n_ctx: int, add_bos: bool, bos_id: int | None) -> list[np.ndarray]:
    """The non-overlapping chunks llama.cpp evaluates, first token replaced by BOS when the model adds BOS."""
    if len(tokens) < 2 * n_ctx:
        raise PerplexityError(f"the text tokenizes to {len(tokens)} tokens; perplexity with a context of {n_ctx} "
                              f"needs at least {2 * n_ctx}")
    chunks = []
    for i in range(len(tokens) // n_ctx):
        chunk = np.array(tokens[i * n_ctx:(i + 1) * n_ctx], dtype=np.int64)
        if add_bos and bos_id is not None:
            chunk[0] = bos_id
        chunks.append(chunk)
    return chunks


def perplexity(model_path: str, text: str, n_ctx: int = 512, kl_base: str | None = None,
               n_chunks: int | None = None, n_threads: int | None = None,
               on_chunk: Callable[[int, int, float], None] | None = None,
               kv_type: str | None = None) -> PerplexityResult:
    """Perplexity of MODEL on `text` (and KL divergence against `kl_base` if given), as llama-perplexity computes it.

    kv_type: MODEL's KV cache type (None: the default, and the base runs with the same default, so a model against
    itself gives KL 0); an explicit kv_type runs the base with an f32 cache, the full-precision reference, so
    `perplexity(m, text, kv_type="q8_0", kl_base=m)` measures what the compact cache costs.
    on_chunk(i, n_chunks, running_ppl) is called after each chunk."""
    from edgeinfer.api import load
    from models.fetch import resolve_model

    if n_ctx < MIN_CTX:
        raise PerplexityError(f"--ctx must be at least {MIN_CTX}, got {n_ctx}")
    if n_chunks is not None and n_chunks < 1:
        raise PerplexityError(f"--chunks must be at least 1, got {n_chunks}")
    kl_base = resolve_model(kl_base) if kl_base else None  # a bad BASE is refused before the model loads
    with load(model_path, n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type) as model:
        tokens = model.tokenize(text, add_special=True, parse_special=False)
        chunks = chunk_tokens(tokens, n_ctx, model.tokenizer.add_bos, model.tokenizer.bos_id)[:n_chunks]
        base_kv_type = None if kv_type is None else "f32"
        base = load(kl_base, n_ctx=n_ctx, n_threads=n_threads, kv_type=base_kv_type) if kl_base else None
        try:
            if base is not None and base.tokenize(text, add_special=True, parse_special=False) != tokens:
                raise PerplexityError(f"{kl_base} tokenizes the text differently from {model_path}: KL divergence "
                                      f"needs the same vocabulary")
            return _score(model, base, chunks, n_ctx, on_chunk)
        finally:
            if base is not None:
                base.close()


def _score(model, base, chunks, n_ctx, on_chunk) -> PerplexityResult:
    first = n_ctx // 2
    nll = nll2 = base_nll = base_nll2 = kld = kld2 = 0.0
    same_top = count = 0
    for i, chunk in enumerate(chunks):
        logp = log_softmax(model.logits(chunk)[first:n_ctx - 1])
        targets = chunk[first + 1:]
        token_nll = -logp[np.arange(len(targets)), targets]
        nll, nll2, count = nll + token_nll.sum(), nll2 + (token_nll ** 2).sum(), count + len(targets)
        if base is not None:
            base_logp = log_softmax(base.logits(chunk)[first:n_ctx - 1])
            base_token_nll = -base_logp[np.arange(len(targets)), targets]
            base_nll, base_nll2 = base_nll + base_token_nll.sum(), base_nll2 + (base_token_nll ** 2).sum()
            kl = (np.exp(base_logp) * (base_logp - logp)).sum(axis=1)
            kld, kld2 = kld + kl.sum(), kld2 + (kl ** 2).sum()
            same_top += int((base_logp.argmax(axis=1) == logp.argmax(axis=1)).sum())
        if on_chunk is not None:
            on_chunk(i, len(chunks), math.exp(nll / count))
    mean_nll = mean_and_error(nll, nll2, count)
    result = PerplexityResult(Estimate(math.exp(mean_nll.mean), mean_nll.err * math.exp(mean_nll.mean)), n_ctx,
                              len(chunks), count)
    if base is not None:
        b = mean_and_error(base_nll, base_nll2, count)
        result.base_ppl = Estimate(math.exp(b.mean), b.err * math.exp(b.mean))
        result.kld = mean_and_error(kld, kld2, count)
        p = same_top / count
        result.same_top = Estimate(p, math.sqrt(p * (1 - p) / (count - 1)) if count > 1 else 0.0)
    return result


def run_perplexity(model: str, text_file: str, n_ctx: int = 512, kl_base: str | None = None,
                   n_chunks: int | None = None, n_threads: int | None = None, echo: Callable[[str], None] = print,
                   kv_type: str | None = None):
    """The `edgeinfer perplexity` command: llama.cpp's running "[i]ppl," line, then the final estimate."""
    try:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PerplexityError(f"{text_file}: cannot read the text ({e})") from None

    def on_chunk(i, n, ppl):
        echo(f"[{i + 1}]{ppl:.4f},", end="" if i + 1 < n else "\n", flush=True)

    result = perplexity(model, text, n_ctx=n_ctx, kl_base=kl_base, n_chunks=n_chunks, n_threads=n_threads,
                        on_chunk=on_chunk, kv_type=kv_type)
    echo(result.report())
    return result
