"""Round trips on the real models: SmolLM2 exported to a sharded F16 Hugging Face checkpoint and converted back,
and Qwen2.5 re-quantized GGUF -> GGUF; each loads in the runtime (and in llama.cpp when llama-cpp-python is there)."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import model_path

import edgeinfer
from edgeinfer.gguf_reader import GGUFFile
from kernels_cpu import formats as F
from tools.convert import convert
from tools.export_hf import export_hf
from tools.perplexity import log_softmax

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return",
           "Once upon a time, in a small village by the sea, there lived"]


def mean_kl(base: edgeinfer.Model, other: edgeinfer.Model, tokens: list[int]) -> float:
    """Mean over positions of KL(base || other) of the next-token distributions."""
    p, q = log_softmax(base.logits(tokens)), log_softmax(other.logits(tokens))
    return float((np.exp(p) * (p - q)).sum(axis=1).mean())


@pytest.fixture(scope="module")
def smollm_checkpoint(tmp_path_factory):
    """The real SmolLM2 as a Hugging Face checkpoint: F16 weights in 2 shards plus an index, tokenizer.json,
    tokenizer_config.json with the chat template."""
    out = tmp_path_factory.mktemp("smollm_hf")
    export_hf(model_path("smollm2-135m-instruct"), out, "F16", n_shards=2)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00002.safetensors",
                                                                 "model-00002-of-00002.safetensors"]
    return out


def test_smollm_checkpoint_to_q8_0_matches_the_original(smollm_checkpoint, tmp_path):
    out = tmp_path / "smollm-q8_0.gguf"
    convert(smollm_checkpoint, out, "Q8_0")
    original = model_path("smollm2-135m-instruct")
    with GGUFFile(original) as a, GGUFFile(out) as b:  # everything llama.cpp and the runtime read is identical
        for key in a.metadata:
            if key.startswith(("tokenizer.", "llama.")):
                assert np.array_equal(a.metadata[key], b.metadata[key]), key
                assert a.metadata_types[key] == b.metadata_types[key], key
        assert b.metadata["tokenizer.ggml.pre"] == "smollm"  # recognized by llama.cpp's pre-tokenizer hash
        assert {t.type_name for n, t in b.tensors.items() if t.raw.ndim and len(t.shape) == 2} == {"Q8_0"}
    with edgeinfer.load(original, n_ctx=128) as base, edgeinfer.load(out, n_ctx=128) as converted:
        for prompt in PROMPTS:
            tokens = base.tokenize(prompt)
            assert converted.tokenize(prompt) == tokens
            # Q8_0's rounding of the Q4_1 weights: 0.003-0.011 measured per prompt; a wrong tensor gives > 1
            assert mean_kl(base, converted, tokens) < 0.02, prompt


def test_smollm_checkpoint_to_q4_k_m_loads_and_chats(smollm_checkpoint, tmp_path):
    out = tmp_path / "smollm-q4_k_m.gguf"
    result = convert(smollm_checkpoint, out, "Q4_K_M")
    types = {p.name: F.type_name(p.dst_type) for p in result.plans}
    # 576-wide rows cannot hold Q4_K / Q6_K blocks: llama.cpp's fallbacks Q5_0 / Q8_0; 1536-wide ffn_down can
    assert types["blk.5.attn_q.weight"] == "Q5_0" and types["blk.0.attn_v.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.4.ffn_down.weight"] == "Q4_K"
    assert types["token_embd.weight"] == "Q8_0"  # tied to the output head: Q6_K would be wanted, rows fall back
    with edgeinfer.load(out, n_ctx=256) as model:
        reply = model.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                           max_tokens=16)
        tokens = model.tokenize(PROMPTS[0])
    assert reply.strip()
    check_in_llama_cpp(out, model_path("smollm2-135m-instruct"), PROMPTS[0], tokens)


LLAMA_CPP_SCRIPT = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
print(json.dumps({"tokens": llm.tokenize(sys.argv[2].encode(), add_bos=False)}), flush=True)
out = llm(sys.argv[2], max_tokens=4, temperature=0)
print(json.dumps({"text": out["choices"][0]["text"]}), flush=True)
"""


def run_llama_cpp(path, prompt: str) -> tuple[list[int] | None, str | None]:
    """Load `path` in llama.cpp (llama-cpp-python) in a child process, since a crash there must not take the test
    run down: (the prompt's tokens or None if it did not load, the generated text or None if evaluation failed)."""
    proc = subprocess.run([sys.executable, "-c", LLAMA_CPP_SCRIPT, str(path), prompt], capture_output=True,
                          text=True, timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    tokens = lines[0]["tokens"] if lines else None
    return tokens, (lines[1]["text"] if len(lines) > 1 else None)


def check_in_llama_cpp(path, original, prompt: str, expected_tokens: list[int]) -> None:
    """Where llama-cpp-python is installed, llama.cpp loads the file and tokenizes as the runtime does; and it
    evaluates the file whenever it can evaluate the original (a llama.cpp build that crashes on every model is
    an environment problem, not the file's)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return
    tokens, text = run_llama_cpp(path, prompt)
    assert tokens == expected_tokens, "llama.cpp did not load the converted file"
    if text is None:
        assert run_llama_cpp(original, prompt)[1] is None, "llama.cpp evaluates the original but not the conversion"


@pytest.mark.parametrize("type_name,max_kl", [("Q8_0", 0.005), ("Q4_0", 0.1)])
def test_qwen_requantized_loads_and_stays_close(tmp_path, type_name, max_kl):
    original = model_path("qwen2.5-coder-0.5b-instruct")
    out = tmp_path / f"qwen-{type_name}.gguf"
    result = convert(original, out, type_name)
    with GGUFFile(original) as a, GGUFFile(out) as b:
        assert b.get("general.file_type") == {"Q8_0": 7, "Q4_0": 2}[type_name]
        assert all(np.array_equal(v, b.metadata[k]) for k, v in a.metadata.items() if k.startswith("tokenizer."))
        assert b.tensors["blk.0.attn_q.weight"].type_name == type_name
        assert b.tensors["output.weight"].type_name == "Q8_0"  # Q6_K wanted; 896-wide rows fall back
    assert out.stat().st_size == result.nbytes
    prompt = "def add(a, b):\n    return"
    with edgeinfer.load(original, n_ctx=64) as base, edgeinfer.load(out, n_ctx=64) as converted:
        tokens = base.tokenize(prompt)
        assert mean_kl(base, converted, tokens) < max_kl
    check_in_llama_cpp(out, original, prompt, tokens)
