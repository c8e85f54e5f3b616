"""Perplexity and KL divergence as llama.cpp's llama-perplexity computes them: chunking, BOS, scored positions,
error estimates; checked by hand on a tiny synthetic model, and end to end on SmolLM2 (slow)."""
import math

import numpy as np
import pytest
from conftest import model_path
from test_convert import make_checkpoint

import edgeinfer
from edgeinfer.cli import main
from tools.convert import convert
from tools.perplexity import PerplexityError, chunk_tokens, log_softmax, mean_and_error, perplexity

SUBJECTS = ["The old miller", "A young sailor", "The village teacher", "Her grandmother", "The tired traveller",
            "A clever fox", "The baker's son", "An honest farmer", "The lighthouse keeper", "My neighbour"]
VERBS = ["walked slowly to", "looked across", "remembered", "wrote a letter about", "dreamed of", "returned to",
         "spoke quietly of", "painted", "cleaned", "sang about"]
OBJECTS = ["the river in the valley", "the market on a cold morning", "the long road to the city",
           "the small house near the forest", "the garden behind the church", "the harbour at dusk",
           "the mountains in early spring", "the fields after the rain", "the bridge over the stream",
           "the school at the end of the street"]
CLAUSES = ["because the day was quiet.", "while the bells were ringing.", "and nobody said a word.",
           "before the sun went down.", "as the wind grew stronger.", "and the children laughed.",
           "although it had started to snow.", "when the first lamps were lit."]


def corpus(n_chars: int, seed: int = 0) -> str:
    """Deterministic plain English prose (simple narrative sentences in paragraphs) of about n_chars characters."""
    rng = np.random.default_rng(seed)
    paragraphs, length = [], 0
    while length < n_chars:
        sentences = [" ".join([SUBJECTS[rng.integers(len(SUBJECTS))], VERBS[rng.integers(len(VERBS))],
                               OBJECTS[rng.integers(len(OBJECTS))], CLAUSES[rng.integers(len(CLAUSES))]])
                     for _ in range(int(rng.integers(3, 7)))]
        paragraphs.append(" ".join(sentences))
        length += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs)


def test_chunks_replace_the_first_token_with_bos_only_when_the_model_adds_bos():
    tokens = list(range(10, 30))
    chunks = chunk_tokens(tokens, 8, add_bos=True, bos_id=1)
    assert [c.tolist() for c in chunks] == [[1] + list(range(11, 18)), [1] + list(range(19, 26))]
    assert chunk_tokens(tokens, 8, add_bos=False, bos_id=1)[1].tolist() == list(range(18, 26))
    with pytest.raises(PerplexityError, match="needs at least 22"):
        chunk_tokens(tokens, 11, add_bos=False, bos_id=None)


def test_mean_and_error_is_llama_cpps_estimate():
    values = np.array([1.0, 2.0, 4.0, 7.0])
    est = mean_and_error(values.sum(), (values ** 2).sum(), len(values))
    assert est.mean == pytest.approx(3.5)
    assert est.err == pytest.approx(np.sqrt(np.var(values) / (len(values) - 1)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path / "ckpt", "llama", n_layers=2)
    convert(path / "ckpt", path / "tiny-f32.gguf", "F32")
    convert(path / "ckpt", path / "tiny-q4_0.gguf", "Q4_0")
    return path / "tiny-f32.gguf", path / "tiny-q4_0.gguf"


def test_perplexity_matches_a_direct_computation(tiny_model):
    f32, q4 = tiny_model
    text, n_ctx = corpus(600), 32
    result = perplexity(str(f32), text, n_ctx=n_ctx, kl_base=str(q4))
    with edgeinfer.load(f32, n_ctx=n_ctx) as m, edgeinfer.load(q4, n_ctx=n_ctx) as base:
        tokens = m.tokenize(text)
        assert tokens[0] == 1  # this vocabulary adds BOS, so every chunk starts with it
        nll, kl, same = [], [], 0
        for i in range(len(tokens) // n_ctx):
            chunk = [1] + tokens[i * n_ctx + 1:(i + 1) * n_ctx]
            lp, lb = log_softmax(m.logits(chunk)), log_softmax(base.logits(chunk))
            for j in range(n_ctx // 2, n_ctx - 1):
                nll.append(-lp[j, chunk[j + 1]])
                kl.append(float((np.exp(lb[j]) * (lb[j] - lp[j])).sum()))
                same += int(lb[j].argmax() == lp[j].argmax())
    assert result.n_chunks == len(tokens) // n_ctx and result.n_scored == len(nll)
    assert result.ppl.mean == pytest.approx(math.exp(np.mean(nll)), rel=1e-9)
    assert result.ppl.err == pytest.approx(np.std(nll) / np.sqrt(len(nll) - 1) * result.ppl.mean, rel=1e-6)
    assert result.kld.mean == pytest.approx(np.mean(kl), rel=1e-9) and result.kld.mean > 0
    assert result.same_top.mean == pytest.approx(same / len(nll))


def test_perplexity_cli_reports_llama_cpp_style(tiny_model, tmp_path, capsys):
    f32, _ = tiny_model
    text_file = tmp_path / "text.txt"
    text_file.write_text(corpus(600))
    main(["perplexity", str(f32), str(text_file), "--ctx", "32", "--kl-base", str(f32)])
    out = capsys.readouterr().out
    assert out.startswith("[1]") and "Final estimate: PPL = " in out and "+/-" in out
    assert "Mean KLD:   0.000000" in out and "Same top p: 100.000" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["perplexity", str(f32), str(text_file), "--ctx", "4096"])
    assert exit_info.value.code == 1 and "error: the text tokenizes to" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm_perplexity_on_prose():
    result = perplexity(str(model_path("smollm2-135m-instruct")), corpus(2000), n_ctx=128, n_chunks=2)
    assert result.n_chunks == 2 and result.n_scored == 2 * 63
    assert 1.0 < result.ppl.mean < 30.0 and result.ppl.err > 0
