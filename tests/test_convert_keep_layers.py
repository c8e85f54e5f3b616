"""`edgeinfer convert --keep-layers`: a depth-pruned GGUF (the kept blocks renumbered, block_count and per-layer
metadata cut to match) on tiny 4-layer models, and every bad spec or architecture refused in one line naming the
option."""
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType
from gguf.gguf_writer import GGUFValue

import tiny_families
from cli_helpers import assert_one_error_line, run_edgeinfer
from edgeinfer.gguf_reader import GGUFFile
from tools.convert import ConvertError, Source, SourceTensor, convert, keep_layers, parse_keep_layers

N_LAYERS = tiny_families.N_LAYERS  # 4


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tiny_families.write_family(tmp_path_factory.mktemp("keep") / "src.gguf", "llama3", "F16")


def test_the_kept_blocks_are_renumbered_and_copied_unchanged(tmp_path, source):
    out = tmp_path / "pruned.gguf"
    convert(source, out, "F16", keep="0,2-3")
    with GGUFFile(source) as src, GGUFFile(out) as dst:
        assert dst.get("llama.block_count") == 3
        assert {n for n in dst.tensors if not n.startswith("blk.")} == {n for n in src.tensors
                                                                         if not n.startswith("blk.")}
        for new, old in enumerate([0, 2, 3]):
            names = [n[len(f"blk.{old}."):] for n in src.tensors if n.startswith(f"blk.{old}.")]
            assert sorted(n[len(f"blk.{new}."):] for n in dst.tensors if n.startswith(f"blk.{new}.")) == sorted(names)
            for name in names:
                assert np.array_equal(dst.tensors[f"blk.{new}.{name}"].raw, src.tensors[f"blk.{old}.{name}"].raw)
        assert not any(n.startswith("blk.3.") for n in dst.tensors)


def test_the_pruned_model_computes_what_the_source_does_with_the_other_layers_skipped(tmp_path, source, monkeypatch):
    """A pre-norm block whose attention output and FFN down projection are zero adds nothing to the residual
    stream: the source with layers 1 and 3 zeroed is the source with them skipped, which keep-layers 0,2 must be."""
    import edgeinfer

    out = tmp_path / "pruned.gguf"
    convert(source, out, "F16", keep="every:2")
    made = tiny_families.family_tensors

    def zeroed(f, seed=0):
        tensors = made(f, seed)
        for i in (1, 3):
            for name in (f"blk.{i}.attn_output.weight", f"blk.{i}.ffn_down.weight"):
                tensors[name] = np.zeros_like(tensors[name])
        return tensors

    monkeypatch.setattr(tiny_families, "family_tensors", zeroed)
    skipped = tiny_families.write_family(tmp_path / "skipped.gguf", "llama3", "F16")
    prompt = [1, 17, 40, 93, 5, 260, 31]
    with edgeinfer.load(out, n_ctx=64) as m:
        assert m.config.n_layers == 2
        pruned_logits = m.logits(prompt)
    with edgeinfer.load(skipped, n_ctx=64) as m:
        skipped_logits = m.logits(prompt)
    np.testing.assert_allclose(pruned_logits, skipped_logits, rtol=1e-5, atol=1e-5)


def test_keep_layer_specs():
    assert parse_keep_layers("0-5,18-23", 24) == [*range(6), *range(18, 24)]
    assert parse_keep_layers("every:2", 24) == list(range(0, 24, 2))
    assert parse_keep_layers("every:3, 23, 1", 24) == [0, 1, 3, 6, 9, 12, 15, 18, 21, 23]
    for spec, message in [("", "--keep-layers is empty"),
                          ("0-24", "--keep-layers '0-24': layer 24 does not exist (the model has 24 layers"),
                          ("5-2", "the range 5-2 runs backwards"),
                          ("every:0", "every:0 needs a step of 1 or more"),
                          ("first:6", "'first:6' is not a layer, a range like 0-5 or every:N"),
                          ("1,,2", "'' is not a layer")]:
        with pytest.raises(ConvertError, match=message.replace("(", r"\(").replace(":", ":")):
            parse_keep_layers(spec, 24)


def test_per_layer_metadata_is_cut_and_an_unknown_per_layer_array_refused():
    def source(extra):
        metadata = {"llama.block_count": GGUFValue(4, GGUFValueType.UINT32), **extra}
        tensors = [SourceTensor(f"blk.{i}.attn_norm.weight", (8,), 0, lambda: np.zeros(8, np.float32))
                   for i in range(4)]
        return Source("llama", metadata, tensors, 4, from_checkpoint=False)

    s = source({"llama.attention.head_count_kv": GGUFValue([1, 2, 3, 4], GGUFValueType.ARRAY, GGUFValueType.UINT32),
                "llama.rope.dimension_sections": GGUFValue([8, 8], GGUFValueType.ARRAY, GGUFValueType.INT32)})
    keep_layers(s, "1,3")
    assert s.n_layers == 2 and s.metadata["llama.block_count"].value == 2
    assert s.metadata["llama.attention.head_count_kv"].value == [2, 4]
    assert s.metadata["llama.rope.dimension_sections"].value == [8, 8]  # not one per layer: kept as it is
    assert [t.name for t in s.tensors] == ["blk.0.attn_norm.weight", "blk.1.attn_norm.weight"]
    with pytest.raises(ConvertError, match="--keep-layers: llama.expert_weights holds 4 values"):
        keep_layers(source({"llama.expert_weights": GGUFValue([1.0] * 4, GGUFValueType.ARRAY,
                                                              GGUFValueType.FLOAT32)}), "0")


def test_the_cli_refuses_bad_specs_and_numbered_layer_architectures(tmp_path, source):
    out = tmp_path / "o.gguf"
    result = run_edgeinfer("convert", str(source), str(out), "--type", "F16", "--keep-layers", "0-9")
    assert_one_error_line(result, "--keep-layers '0-9': layer 9 does not exist (the model has 4 layers")
    gemma2 = tiny_families.write_family(tmp_path / "gemma2.gguf", "gemma2", "F16")
    result = run_edgeinfer("convert", str(gemma2), str(out), "--type", "F16", "--keep-layers", "0,1")
    assert_one_error_line(result, "--keep-layers: gemma2 cannot be cut down: the sliding window is on every other")
    assert not out.exists() and not list(tmp_path.glob(".o.gguf.*.part"))
    result = run_edgeinfer("convert", str(source), str(out), "--type", "F16", "--keep-layers", "1-2", "--dry-run")
    assert result.returncode == 0 and "blk.1.ffn_down.weight" in result.stdout
    assert "blk.2." not in result.stdout and not out.exists()
