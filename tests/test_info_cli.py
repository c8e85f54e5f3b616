"""`edgeinfer info`: the summary of the real models (text and --json), one-line errors for damaged files, and
`model_info.summarize` / `format_summary` on files that are valid GGUF but carry odd values."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from conftest import MODEL_NAMES, model_path
from edgeinfer.cli import main
from edgeinfer.gguf_reader import GGUFFile
from edgeinfer.model_info import format_summary, quantization_label, summarize
from test_gguf_reader import bad_file_params, write_bad_file, write_small_gguf

# What llama.cpp and gguf-py say about the real models (tensor type counts, element sums), written out by hand.
EXPECTED = {
    "smollm2-135m-instruct": {
        "architecture": "llama", "context_length": 8192, "n_vocab": 49152, "parameters": 134_515_008,
        "quantization": "Q4_1", "chat_template": True, "bos": "<|im_start|>", "eos": "<|im_end|>",
        "types": {"Q4_1": 210, "Q8_0": 1, "F32": 61},
    },
    "gemma3-270m": {
        "architecture": "gemma3", "context_length": 32768, "n_vocab": 262144, "parameters": 268_098_176,
        "quantization": "Q4_K_M", "chat_template": False, "bos": "<bos>", "eos": "<eos>",
        "types": {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9},
    },
    "qwen2.5-coder-0.5b-instruct": {
        "architecture": "qwen2", "context_length": 32768, "n_vocab": 151936, "parameters": 630_167_424,
        "quantization": "Q4_K_M", "chat_template": True, "bos": "<|endoftext|>", "eos": "<|im_end|>",
        "types": {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12},
    },
}


def run_edgeinfer(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a fresh interpreter, real exit status and stderr."""
    return subprocess.run([sys.executable, "-m", "edgeinfer.cli", *args], capture_output=True, text=True, timeout=120)


def run_main(capsys, *args: str) -> tuple[int | str, str, str]:
    """The CLI in this process: (exit status, stdout, stderr); an exception escaping main() is returned as the
    status "traceback" rather than raised, so a test fails on it with a short message."""
    try:
        main(list(args))
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - a real run would print a traceback here
        status = f"traceback: {type(e).__name__}: {str(e)[:200]}"
    out, err = capsys.readouterr()
    return status, out, err


# -- the real models --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_info_text_on_real_models(name):
    expected, path = EXPECTED[name], model_path(name)
    result = run_edgeinfer("info", str(path))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    text = result.stdout

    def line(key: str, value: str) -> None:
        assert re.search(rf"^{key}:\s+{re.escape(value)}", text, re.M), f"no '{key}: {value}' in\n{text}"

    line("file", str(path))
    line("architecture", expected["architecture"])
    line("context length", str(expected["context_length"]))
    line("quantization", expected["quantization"])
    line("parameters", f"{expected['parameters']:,}")
    assert f"n_vocab {expected['n_vocab']}" in text
    line("chat template", "yes" if expected["chat_template"] else "no")
    for type_name, count in expected["types"].items():
        assert re.search(rf"^\s+{type_name}\s+{count}\s", text, re.M), f"no {type_name} row in\n{text}"
    assert re.search(r"^\s+block_count:\s+\d+$", text, re.M)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_info_json_on_real_models(name):
    expected, path = EXPECTED[name], model_path(name)
    result = run_edgeinfer("info", "--json", str(path))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    summary = json.loads(result.stdout)
    assert summary["file"] == str(path) and summary["file_size"] == path.stat().st_size
    assert summary["gguf_version"] == 3
    for key in ("architecture", "context_length", "parameters", "quantization", "chat_template"):
        assert summary[key] == expected[key], key
    vocab = summary["vocabulary"]
    assert (vocab["n_vocab"], vocab["bos"], vocab["eos"]) == (expected["n_vocab"], expected["bos"], expected["eos"])
    types = summary["tensor_types"]
    assert {t: row["count"] for t, row in types.items()} == expected["types"]
    assert sum(row["parameters"] for row in types.values()) == summary["parameters"]
    assert sum(row["bytes"] for row in types.values()) < summary["file_size"]
    assert summary["n_tensors"] == sum(expected["types"].values())
    hyper = summary["hyperparameters"]
    assert hyper["context_length"] == expected["context_length"] and hyper["block_count"] > 0
    assert not any(key.startswith(expected["architecture"] + ".") for key in hyper)  # the arch prefix is dropped


# -- damaged files and bad paths --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", bad_file_params())
def test_damaged_file_prints_one_error_line(tmp_path, capsys, case):
    path, field, _ = write_bad_file(tmp_path, case)
    status, out, err = run_main(capsys, "info", str(path))
    assert status == 1 and out == "", (status, out)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"error: {path}: {field}"), err


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing.gguf", lambda tmp: tmp])
def test_missing_file_and_directory_print_one_error_line(tmp_path, capsys, make):
    path = make(tmp_path)
    status, out, err = run_main(capsys, "info", str(path))
    assert status == 1 and out == "" and err.count("\n") == 1, (status, err)
    assert err.startswith(f"error: {path}"), err


def test_damaged_file_end_to_end(tmp_path):
    path, field, offset = write_bad_file(tmp_path, "absurd_string_length")
    result = run_edgeinfer("info", str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.rstrip("\n")]
    assert result.stderr.startswith(f"error: {path}: {field} at offset {offset}: ")


# -- summarize and format_summary on unusual but valid files ---------------------------------------------------------
def test_summary_of_the_small_file(tmp_path):
    write_small_gguf(tmp_path / "small.gguf")
    with GGUFFile(tmp_path / "small.gguf") as f:
        summary = summarize(f)
    assert summary["architecture"] == "llama" and summary["name"] == "tiny" and summary["context_length"] == 64
    assert summary["hyperparameters"] == {"context_length": 64}
    assert summary["parameters"] == 2 * 8 + 4 + 2 * 64
    assert summary["tensor_types"] == {"Q8_0": {"count": 1, "parameters": 128, "bytes": 2 * 2 * 34},
                                       "F32": {"count": 2, "parameters": 20, "bytes": 80}}
    assert summary["vocabulary"] == {"model": None, "pre": None, "n_vocab": 3,
                                     "bos_id": None, "bos": None, "eos_id": None, "eos": None}
    assert summary["quantization"] is None and summary["chat_template"] is False
    text = format_summary(summary)
    assert re.search(r"^parameters:\s+148 ", text, re.M) and re.search(r"^\s+Q8_0\s+1\s+128\s+136 B$", text, re.M)


def test_summary_tolerates_odd_metadata(tmp_path):
    path = tmp_path / "odd.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_name("two\nlines\x1b[31m")
    w.add_string("llama.context_length", "long")
    w.add_uint32("general.file_type", 9999)
    w.add_float32("llama.rope.freq_base", float("nan"))
    w.add_array("llama.per_layer", list(range(100)))
    w.add_array("tokenizer.ggml.tokens", ["<s>"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 10**6)
    w.add_float32("tokenizer.ggml.eos_token_id", 2.0)
    w.add_uint32("tokenizer.chat_template", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as f:
        summary = summarize(f)
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert summary["context_length"] is None and summary["quantization"] == "unknown (9999)"
    assert summary["hyperparameters"]["rope.freq_base"] == "nan"
    assert summary["hyperparameters"]["per_layer"] == {"array": "int32", "length": 100, "first": [0, 1, 2, 3]}
    assert summary["vocabulary"]["bos_id"] == 10**6 and summary["vocabulary"]["bos"] is None
    assert summary["vocabulary"]["eos_id"] is None and summary["chat_template"] is False
    assert summary["parameters"] == 0 and summary["tensor_types"] == {}
    text = format_summary(summary)
    assert all(line.isprintable() for line in text.splitlines())
    assert re.search(r"^name:\s+two\\nlines\\x1b\[31m$", text, re.M), text


def test_summary_survives_random_damage(tmp_path):
    clean = tmp_path / "clean.gguf"
    write_small_gguf(clean)
    data, path = clean.read_bytes(), tmp_path / "fuzzed.gguf"
    rng = np.random.default_rng(7)
    summarized = 0
    for _ in range(300):
        damaged = bytearray(data)
        for position in rng.integers(len(damaged), size=rng.integers(1, 4)):
            damaged[position] = rng.integers(256)
        path.write_bytes(bytes(damaged))
        try:
            f = GGUFFile(path)
        except Exception:  # noqa: BLE001 - the reader's own tests hold it to GGUFError
            continue
        with f:
            summary = summarize(f)
        json.dumps(summary, allow_nan=False)
        format_summary(summary)
        summarized += 1
    assert summarized > 0


def test_quantization_labels_follow_llama_cpp():
    labels = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              32: "BF16"}
    assert {ftype: quantization_label(ftype) for ftype in labels} == labels
    assert quantization_label(1024 | 15) == "Q4_K_M (guessed)"
    assert quantization_label(4) == "unknown (4)" and quantization_label(None) is None
    assert quantization_label("Q4") == "invalid (Q4)"



@pytest.mark.parametrize("family, expected", [
    ("llama3", {"rope_freq_factors": "8 pairs, 1 to 8 (rope_freqs.weight)"}),
    ("mistral", {"sliding_window": "4096 on 4 of 4 layers"}),
    ("gemma2", {"attn_logit_softcap": 2.5, "final_logit_softcap": 15.0, "sliding_window": "48 on 2 of 4 layers",
                "activation": "gelu_tanh", "post_norms": True}),
    ("granite", {"embedding_scale": 2.0, "residual_scale": 0.5, "attention_scale": 0.35, "logit_scale": 0.5}),
    ("olmo2", {"pre_norms": False, "qk_norm_whole": True, "rope_style": "neox"}),
    ("smollm3", {"layers_without_rope": [3]}),
    ("phi3", {"fused_qkv": True, "fused_gate_up": True, "rope_dims": "8 of 16"}),
    ("qwen3", {"qk_norm": True}),
])
def test_info_shows_each_familys_variant(tmp_path, capsys, family, expected):
    """`info` says what sets each family apart, as its architecture module reads the file (JSON and text)."""
    from tiny_families import write_family

    path = write_family(tmp_path / f"{family}.gguf", family, "F16")
    with GGUFFile(path) as g:
        found = summarize(g)["variant"]
    for key, value in expected.items():
        assert found[key] == pytest.approx(value) if isinstance(value, float) else found[key] == value, key
    code, out, _ = run_main(capsys, "info", str(path))
    assert code == 0 and "variant (what the forward computes)" in out and next(iter(expected)) in out
