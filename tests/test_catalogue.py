"""models/catalogue.py: the model kind ("chat" or "base") and which entry a model argument stands for."""
import json

import pytest

from edgeinfer.errors import FetchError
from models.catalogue import BUILTIN_CATALOGUE, MODEL_KINDS, catalogue_entry_for, load_catalogue

SHA = "0" * 64


def fake_catalogue(**kinds) -> dict:
    """A catalogue of one-source models named after `kinds` (value None: no "kind" field)."""
    models = {}
    for name, kind in kinds.items():
        fields = {"description": name, "arch": "llama", "quant": "Q4_1", "size": 5, "file": f"{name}.gguf",
                  "sha256": SHA, "assembly": "single",
                  "sources": [{"package": "p", "version": "1.0.0", "member": "p/m.gguf"}]}
        if kind is not None:
            fields["kind"] = kind
        models[name] = fields
    return {"default": next(iter(kinds)), "models": models}


def test_every_built_in_entry_states_its_kind():
    raw = json.loads(BUILTIN_CATALOGUE.read_text())
    assert {name: fields["kind"] for name, fields in raw["models"].items()} == {
        "smollm2-135m-instruct": "chat", "gemma3-270m": "base", "qwen2.5-coder-0.5b-instruct": "chat"}


def test_a_user_catalogue_without_kinds_means_chat_models():
    entries = load_catalogue(fake_catalogue(old=None, tuned="chat", raw="base"))
    assert {e.name: e.kind for e in entries.values()} == {"old": "chat", "tuned": "chat", "raw": "base"}


@pytest.mark.parametrize("kind", ["instruct", "", 1])
def test_an_unknown_kind_is_refused_naming_the_model(kind):
    with pytest.raises(FetchError, match=r"model 'x': .*kind"):
        load_catalogue(fake_catalogue(x=kind))
    assert MODEL_KINDS == ("chat", "base")


def test_a_model_argument_is_a_name_or_a_catalogue_file_by_name_and_size(tmp_path, monkeypatch):
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(json.dumps(fake_catalogue(tuned="chat", raw="base")))
    monkeypatch.setenv("EDGEINFER_CATALOGUE", str(catalogue))
    assert catalogue_entry_for("raw").kind == "base" and catalogue_entry_for("tuned").kind == "chat"
    assert catalogue_entry_for("nothing") is None
    (tmp_path / "raw.gguf").write_bytes(b"12345")  # the catalogue's name and size, anywhere
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "raw.gguf").write_bytes(b"123456")  # same name, another size: another file
    assert catalogue_entry_for(tmp_path / "raw.gguf").name == "raw"
    assert catalogue_entry_for(tmp_path / "other" / "raw.gguf") is None
    catalogue.write_text("{not json")  # a file given by path needs no catalogue
    assert catalogue_entry_for(tmp_path / "raw.gguf") is None
