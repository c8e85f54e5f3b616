"""The converter on small synthetic checkpoints (no network, no real model): mapping, exact F32 round trips through
the exporter, the type plan, pruning, and every bad input failing with one clear error and no file left behind."""
import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_one_error_line, run_edgeinfer
from edgeinfer.cli import main
from edgeinfer.gguf_reader import GGUFFile
from kernels_cpu import formats as F
from kernels_cpu.dequant import dequantize
from tools.convert import ConvertError, convert, prune_rows
from tools.export_hf import export_hf, unpermute_rows, write_safetensors, write_sentencepiece_model
from tools.hf_checkpoint import permute_rows

ARCH_CONFIG = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0,
              "tie_word_embeddings": False},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0},
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 64,
               "sliding_window": 8, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 64},
}


def spm_vocab() -> dict:
    """A small SentencePiece vocabulary (unk, bos, eos, 256 byte tokens, some pieces) as GGUF-style metadata."""
    pieces = ["\u2581"] + [chr(c) for c in range(97, 123)] + ["\u2581t", "\u2581th", "\u2581the", "he", "in", "er"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": np.array(types, np.int32),
            "tokenizer.ggml.scores": np.array(scores, np.float32), "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def make_checkpoint(path: Path, arch: str = "llama", n_layers: int = 2, d: int = 256, d_ff: int = 512,
                    n_shards: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny random Hugging Face checkpoint of `arch` with a SentencePiece tokenizer; returns its tensors."""
    rng = np.random.default_rng(seed)
    vocab = spm_vocab()
    n_vocab, n_head, n_kv, hd = len(vocab["tokenizer.ggml.tokens"]), 4, 2, 64
    config = {"hidden_size": d, "intermediate_size": d_ff, "num_hidden_layers": n_layers,
              "num_attention_heads": n_head, "num_key_value_heads": n_kv, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-5, "vocab_size": n_vocab, "bos_token_id": 1, "eos_token_id": 2,
              **ARCH_CONFIG[arch]}
    w = {"model.embed_tokens.weight": rng.standard_normal((n_vocab, d)), "model.norm.weight": 1 + rng.random(d) / 4}
    if arch == "llama":
        w["lm_head.weight"] = rng.standard_normal((n_vocab, d))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + rng.random(d) / 4,
                  p + "self_attn.q_proj.weight": rng.standard_normal((n_head * hd, d)) / 16,
                  p + "self_attn.k_proj.weight": rng.standard_normal((n_kv * hd, d)) / 16,
                  p + "self_attn.v_proj.weight": rng.standard_normal((n_kv * hd, d)) / 16,
                  p + "self_attn.o_proj.weight": rng.standard_normal((d, n_head * hd)) / 16,
                  p + "post_attention_layernorm.weight": 1 + rng.random(d) / 4,
                  p + "mlp.gate_proj.weight": rng.standard_normal((d_ff, d)) / 16,
                  p + "mlp.up_proj.weight": rng.standard_normal((d_ff, d)) / 16,
                  p + "mlp.down_proj.weight": rng.standard_normal((d, d_ff)) / 16})
        if arch == "qwen2":
            w.update({p + "self_attn.q_proj.bias": rng.standard_normal(n_head * hd) / 8,
                      p + "self_attn.k_proj.bias": rng.standard_normal(n_kv * hd) / 8,
                      p + "self_attn.v_proj.bias": rng.standard_normal(n_kv * hd) / 8})
        if arch == "gemma3":
            w.update({p + "pre_feedforward_layernorm.weight": rng.random(d) / 4,
                      p + "post_feedforward_layernorm.weight": rng.random(d) / 4,
                      p + "self_attn.q_norm.weight": rng.random(hd) / 4,
                      p + "self_attn.k_norm.weight": rng.random(hd) / 4})
    w = {k: v.astype(np.float32) for k, v in w.items()}
    path.mkdir(parents=True, exist_ok=True)
    names = list(w)
    if n_shards == 1:
        write_safetensors(path / "model.safetensors", [(k, w[k].shape) for k in names], w.__getitem__, np.float32)
    else:
        half = len(names) // 2
        weight_map = {}
        for k, part in enumerate((names[:half], names[half:])):
            shard = f"model-{k + 1:05d}-of-00002.safetensors"
            write_safetensors(path / shard, [(n, w[n].shape) for n in part], w.__getitem__, np.float32)
            weight_map.update({n: shard for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    write_sentencepiece_model(path, vocab)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return w


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_ckpt")
    return path, make_checkpoint(path, "llama", n_shards=2)


def read_tensor(g: GGUFFile, name: str) -> np.ndarray:
    t = g.tensors[name]
    return dequantize(t.ggml_type, t.raw, t.shape[-1]).reshape(t.shape)


def no_leftovers(directory: Path, out_name: str) -> bool:
    return not (directory / out_name).exists() and not list(directory.glob(f".{out_name}.*.part"))


# ---------------------------------------------------------------- mapping and exact round trips


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_f32_conversion_maps_and_transforms_every_tensor(tmp_path, arch):
    hf = make_checkpoint(tmp_path / "ckpt", arch)
    convert(tmp_path / "ckpt", tmp_path / "out.gguf", "F32")
    with GGUFFile(tmp_path / "out.gguf") as g:
        assert g.architecture == arch
        assert g.get(f"{arch}.block_count") == 2 and g.get(f"{arch}.embedding_length") == 256
        assert g.get("tokenizer.ggml.model") == "llama" and g.get("tokenizer.ggml.bos_token_id") == 1
        assert g.get("tokenizer.ggml.add_bos_token") is True and g.get("general.file_type") == 0
        assert g.get("tokenizer.chat_template").startswith("{% for m")
        assert len(g.tensors) == len(hf)
        q = read_tensor(g, "blk.1.attn_q.weight")
        expected_q = hf["model.layers.1.self_attn.q_proj.weight"]
        if arch == "llama":  # rows permuted for RoPE on adjacent pairs; the exporter undoes it exactly
            expected_q = permute_rows(expected_q, 4)
            assert np.array_equal(unpermute_rows(expected_q, 4), hf["model.layers.1.self_attn.q_proj.weight"])
        np.testing.assert_array_equal(q, expected_q)
        norm = read_tensor(g, "blk.0.ffn_norm.weight")
        if arch == "gemma3":  # Gemma's norms are stored as 1 + w
            np.testing.assert_array_equal(norm, hf["model.layers.0.pre_feedforward_layernorm.weight"] + 1)
            assert g.get("gemma3.attention.sliding_window") == 8 and g.get("tokenizer.ggml.add_space_prefix") is False
        else:
            np.testing.assert_array_equal(norm, hf["model.layers.0.post_attention_layernorm.weight"])
        if arch == "qwen2":
            np.testing.assert_array_equal(read_tensor(g, "blk.0.attn_k.bias"),
                                          hf["model.layers.0.self_attn.k_proj.bias"])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_export_is_the_exact_inverse_of_convert(tmp_path, arch):
    hf = make_checkpoint(tmp_path / "ckpt", arch, n_shards=2)
    convert(tmp_path / "ckpt", tmp_path / "a.gguf", "F32")
    export_hf(tmp_path / "a.gguf", tmp_path / "back", "F32", n_shards=2)
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    convert(tmp_path / "back", tmp_path / "b.gguf", "F32")
    with GGUFFile(tmp_path / "a.gguf") as a, GGUFFile(tmp_path / "b.gguf") as b:
        for key in a.metadata:
            if key.startswith(("tokenizer.", f"{arch}.")):
                assert np.array_equal(a.metadata[key], b.metadata[key]), key
                assert a.metadata_types[key] == b.metadata_types[key], key
        assert set(a.tensors) == set(b.tensors)
        for name in a.tensors:
            np.testing.assert_array_equal(read_tensor(a, name), read_tensor(b, name), err_msg=name)


def test_quantized_types_plan_and_sizes(tmp_path, llama_ckpt):
    ckpt, _ = llama_ckpt
    result = convert(ckpt, tmp_path / "q.gguf", "Q4_K_M")
    types = {p.name: F.type_name(p.dst_type) for p in result.plans}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    # use_more_bits with 2 layers: only the last one (i >= 7 n / 8) gets Q6_K for attn_v and ffn_down
    assert types["blk.1.attn_v.weight"] == "Q6_K" and types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.attn_norm.weight"] == "F32"
    assert (tmp_path / "q.gguf").stat().st_size == result.nbytes
    with GGUFFile(tmp_path / "q.gguf") as g:
        assert g.get("general.file_type") == 15 and g.get("general.quantization_version") == 2
        assert {n: F.type_name(t.ggml_type) for n, t in g.tensors.items()} == types
        x = read_tensor(g, "blk.1.ffn_up.weight")
    ref = llama_ckpt[1]["model.layers.1.mlp.up_proj.weight"]
    assert np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2)) < 0.08


def test_tensor_type_overrides_and_dry_run(tmp_path, llama_ckpt, capsys):
    ckpt, _ = llama_ckpt
    main(["convert", str(ckpt), str(tmp_path / "o.gguf"), "--type", "Q8_0", "--dry-run",
          "--tensor-type", "output.weight=F16", "--tensor-type", "blk.*.ffn_down.weight=q4_k"])
    out = capsys.readouterr().out
    assert "output.weight" in out and "F32 -> F16" in out.split("output.weight")[1].splitlines()[0]
    assert "F32 -> Q4_K" in out.split("blk.1.ffn_down.weight")[1].splitlines()[0]
    assert "F32 -> Q8_0" in out.split("blk.1.ffn_up.weight")[1].splitlines()[0]
    assert "output file" in out and not (tmp_path / "o.gguf").exists()


def test_gguf_requantization_copies_unchanged_tensors(tmp_path, llama_ckpt):
    ckpt, _ = llama_ckpt
    convert(ckpt, tmp_path / "q8.gguf", "Q8_0")
    result = convert(tmp_path / "q8.gguf", tmp_path / "q4.gguf", "Q4_0")
    copied = {p.name for p in result.plans if not p.requantize}
    assert "blk.0.attn_norm.weight" in copied and "blk.0.attn_q.weight" not in copied
    with GGUFFile(tmp_path / "q8.gguf") as a, GGUFFile(tmp_path / "q4.gguf") as b:
        assert b.get("general.file_type") == 2 and b.get("general.name") == a.get("general.name")
        assert b.tensors["output.weight"].type_name == "Q6_K"  # llama-quantize's rule for the output head
        assert b.tensors["blk.0.attn_q.weight"].type_name == "Q4_0"
        assert np.array_equal(a.tensors["blk.0.attn_norm.weight"].raw, b.tensors["blk.0.attn_norm.weight"].raw)


def test_prune_zeroes_the_smallest_weights_of_each_ffn_row(tmp_path, llama_ckpt):
    rows = np.array([[0.5, -0.1, 0.3, -0.7], [1.0, 2.0, -3.0, 0.01]], dtype=np.float32)
    expected = np.array([[0.5, 0, 0, -0.7], [0, 2.0, -3.0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(prune_rows(rows.copy(), 0.5), expected)
    ckpt, _ = llama_ckpt
    convert(ckpt, tmp_path / "p.gguf", "F32", prune=0.25)
    with GGUFFile(tmp_path / "p.gguf") as g:
        for name in ("blk.0.ffn_gate.weight", "blk.1.ffn_down.weight"):
            zeros = (read_tensor(g, name) == 0).sum(axis=1)
            assert np.all(zeros == int(0.25 * g.tensors[name].shape[-1]))
        assert (read_tensor(g, "blk.0.attn_q.weight") == 0).sum() == 0


# ---------------------------------------------------------------- bad inputs: one clear error, nothing left behind


def run_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def assert_one_line_error(code, err, fragment):
    assert code == 1 and err.startswith("error: ") and "\n" not in err and fragment in err, err


def test_missing_config_json(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    code, err = run_cli(["convert", str(tmp_path / "ckpt"), str(tmp_path / "o.gguf"), "--type", "Q8_0"], capsys)
    assert_one_line_error(code, err, "no config.json")
    assert no_leftovers(tmp_path, "o.gguf")


def test_unknown_architecture(tmp_path, capsys):
    make_checkpoint(tmp_path / "ckpt", "llama", n_layers=1)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["convert", str(tmp_path / "ckpt"), str(tmp_path / "o.gguf"), "--type", "F16"], capsys)
    assert_one_line_error(code, err, "architecture 'MambaForCausalLM' is not supported")
    assert no_leftovers(tmp_path, "o.gguf")


def test_mismatched_tensor_shapes(tmp_path, capsys):
    make_checkpoint(tmp_path / "ckpt", "llama", n_layers=1)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["intermediate_size"] = 384  # the checkpoint's MLP has 512
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["convert", str(tmp_path / "ckpt"), str(tmp_path / "o.gguf"), "--type", "Q8_0"], capsys)
    assert_one_line_error(code, err, "has shape [512, 256], but config.json implies [384, 256]")
    assert no_leftovers(tmp_path, "o.gguf")


def test_missing_tensor_and_damaged_shard(tmp_path):
    make_checkpoint(tmp_path / "ckpt", "llama", n_layers=1, n_shards=2)
    shard = tmp_path / "ckpt" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConvertError, match="runs past the end of the file|do not fit"):
        convert(tmp_path / "ckpt", tmp_path / "o.gguf", "Q8_0")
    shard.unlink()
    with pytest.raises(ConvertError, match="lists model-00002-of-00002.safetensors, which is missing"):
        convert(tmp_path / "ckpt", tmp_path / "o.gguf", "Q8_0")
    assert no_leftovers(tmp_path, "o.gguf")


def test_bad_options(tmp_path, llama_ckpt, capsys):
    ckpt, _ = llama_ckpt
    for extra, fragment in [(["--type", "Q3_X"], "unknown --type 'Q3_X'"),
                            (["--type", "Q8_0", "--tensor-type", "nothing_matches=Q4_0"], "matches no quantizable"),
                            (["--type", "Q8_0", "--tensor-type", "output.weight"], "expected PATTERN=TYPE"),
                            (["--type", "Q8_0", "--tensor-type", "output.weight=Q9"], "unknown tensor type 'Q9'")]:
        code, err = run_cli(["convert", str(ckpt), str(tmp_path / "o.gguf"), *extra], capsys)
        assert_one_line_error(code, err, fragment)
    # --prune's range is click's (a usage error, status 2, shown by --help); the library checks it too
    code, err = run_cli(["convert", str(ckpt), str(tmp_path / "o.gguf"), "--type", "Q8_0", "--prune", "1.5"], capsys)
    assert code == 2 and err.startswith("error: Invalid value for '--prune': 1.5") and "\n" not in err, err
    with pytest.raises(ConvertError, match=r"--prune must be in \[0, 1\)"):
        convert(ckpt, tmp_path / "o.gguf", "Q8_0", prune=1.5)
    assert no_leftovers(tmp_path, "o.gguf")


def test_existing_output_is_kept_unless_force(tmp_path, llama_ckpt):
    ckpt, _ = llama_ckpt
    out = tmp_path / "o.gguf"
    out.write_bytes(b"previous")
    for extra in ([], ["--dry-run"]):  # --dry-run predicts the real run, refusal included
        result = run_edgeinfer("convert", str(ckpt), str(out), "--type", "Q8_0", *extra)
        assert_one_error_line(result, f"{out} exists; pass --force to overwrite it")
        assert result.returncode == 1 and out.read_bytes() == b"previous"
    result = run_edgeinfer("convert", str(ckpt), str(out), "--type", "Q8_0", "--force")
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr  # (the progress bar ends a line)
    with GGUFFile(out) as g:
        assert g.get("general.file_type") == 7 and "blk.1.ffn_up.weight" in g.tensors  # 7: llama.cpp's Q8_0
    assert not list(tmp_path.glob(".o.gguf.*.part"))


def test_disk_full_leaves_nothing(tmp_path, llama_ckpt, monkeypatch, capsys):
    ckpt, _ = llama_ckpt
    (tmp_path / "o.gguf").write_bytes(b"previous")  # an existing OUT is replaced only by a complete file
    calls = []
    import gguf.gguf_writer

    original = gguf.gguf_writer.GGUFWriter.write_tensor_data

    def write_tensor_data(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.gguf_writer.GGUFWriter, "write_tensor_data", write_tensor_data)
    code, err = run_cli(["convert", str(ckpt), str(tmp_path / "o.gguf"), "--type", "Q8_0", "--force"], capsys)
    assert_one_line_error(code, err, "no space left on device")
    assert (tmp_path / "o.gguf").read_bytes() == b"previous"
    assert not list(tmp_path.glob(".o.gguf.*.part"))


@pytest.mark.parametrize("via_cli", [False, True])
def test_interrupted_run_leaves_nothing(tmp_path, llama_ckpt, monkeypatch, capsys, via_cli):
    ckpt, _ = llama_ckpt
    import tools.convert

    original = tools.convert.tensor_bytes
    seen = []

    def interrupted(plan, *args):
        seen.append(plan.name)
        if len(seen) == 5:
            assert list(tmp_path.glob(".o.gguf.*.part")), "the temporary file exists while writing"
            raise KeyboardInterrupt
        return original(plan, *args)

    monkeypatch.setattr(tools.convert, "tensor_bytes", interrupted)
    if via_cli:
        code, err = run_cli(["convert", str(ckpt), str(tmp_path / "o.gguf"), "--type", "Q4_0"], capsys)
        assert_one_line_error(code, err, "interrupted; nothing was written")
    else:
        with pytest.raises(KeyboardInterrupt):
            convert(ckpt, tmp_path / "o.gguf", "Q4_0")
    assert len(seen) == 5 and no_leftovers(tmp_path, "o.gguf")


def test_output_size_prediction_matches_for_every_type(tmp_path, llama_ckpt):
    ckpt, _ = llama_ckpt
    for type_name in ("F16", "BF16", "Q5_1", "Q6_K", "Q5_K_M"):
        result = convert(ckpt, tmp_path / f"{type_name}.gguf", type_name)
        assert (tmp_path / f"{type_name}.gguf").stat().st_size == result.nbytes
        assert math.isclose(result.nbytes, sum(p.nbytes for p in result.plans), rel_tol=0.05)
