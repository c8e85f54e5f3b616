"""Model files on disk through the real console script: `list` (narrow terminals, --json), `rm` and `prune`.

Everything happens in a temporary EDGEINFER_HOME holding fake files: catalogue models are sparse files of the
catalogue's size (so `list` counts them as downloaded), repacked caches a few bytes with their records."""
import json
import os
import zlib
from pathlib import Path

import pytest

from cli_helpers import assert_one_error_line, run_edgeinfer
from edgeinfer.cli_models import format_model_table
from edgeinfer.backends.cpu_repack import RECORD_FORMAT, cache_path, record_path
from kernels_cpu import _sources_hash
from models.catalogue import load_catalogue

DEAD_PID = 999999999  # no process has this pid


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A temporary EDGEINFER_HOME for this process and the edgeinfer subprocesses it starts."""
    path = tmp_path / "home"
    (path / "models").mkdir(parents=True)
    monkeypatch.setenv("EDGEINFER_HOME", str(path))
    return path


def fake_download(home: Path, name: str) -> Path:
    """A sparse file of the catalogue model's size, with its verification marker, as `pull` leaves them."""
    entry = load_catalogue()[name]
    path = home / "models" / entry.file
    with open(path, "wb") as f:
        f.truncate(entry.size)
    path.with_name(path.name + ".sha256").write_text(f"{entry.sha256}  {entry.file}\n")
    return path


def fake_cache(model: Path, size: int = 1000, record: bool = True) -> Path:
    """A repacked cache file of `size` bytes for the model file at `model` (which must exist), with its record."""
    path = cache_path(model, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path.write_bytes(data)
    if record:
        st = model.stat()
        record_path(path).write_text(json.dumps({
            "format": RECORD_FORMAT, "model": os.path.realpath(model), "model_size": st.st_size,
            "model_mtime_ns": st.st_mtime_ns, "bytes": size, "crc32": zlib.crc32(data)}))
    return path


def edgeinfer(*args, columns: int = 200):
    return run_edgeinfer(*args, env={"COLUMNS": str(columns)})


# ---------------------------------------------------------------- list

def test_list_wide_shows_full_paths(home):
    path = fake_download(home, "gemma3-270m")
    result = edgeinfer("list", columns=300)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("gemma3-270m"))
    assert line.endswith(str(path)) and " yes " in line


def test_list_on_a_narrow_terminal_keeps_every_name_whole(home):
    fake_download(home, "smollm2-135m-instruct")
    result = edgeinfer("list", columns=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in load_catalogue():
        assert any(line.split(" (default)")[0].strip() == name for line in lines), (name, result.stdout)
    assert f"downloaded files are in {home / 'models'}" in lines
    assert all(len(line) <= 60 for line in lines if not line.startswith("downloaded files are in"))


def test_a_name_wider_than_the_terminal_is_folded_not_cut():
    rows = [{"name": "a-model-with-a-very-long-name-" + "x" * 30, "kind": None, "arch": "llama", "quant": "Q4_1",
             "size": 10**8, "downloaded": False, "path": Path("/m/x.gguf"), "default": True}]
    text = format_model_table(rows, 40, Path("/m"))
    assert text.splitlines() == [rows[0]["name"] + " (default)", "    llama, Q4_1, 100 MB, not downloaded"]
    wide = format_model_table(rows, 200, Path("/m")).splitlines()
    assert wide[0].split() == ["name", "arch", "quant", "size", "downloaded", "path"]  # no kind column: none given
    assert wide[1].startswith(rows[0]["name"] + " (default)  llama")


def test_list_json_rows(home):
    path = fake_download(home, "smollm2-135m-instruct")
    result = edgeinfer("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(load_catalogue())
    row = rows["smollm2-135m-instruct"]
    assert {"name", "arch", "quant", "size", "downloaded", "path", "default", "kind"} <= set(row)
    assert row["downloaded"] is True and row["path"] == str(path) and row["arch"] == "llama"
    assert not rows["gemma3-270m"]["downloaded"] and sum(r["default"] for r in rows.values()) == 1


# ---------------------------------------------------------------- rm

def test_rm_removes_model_marker_partials_and_caches(home):
    model = fake_download(home, "smollm2-135m-instruct")
    partial = model.with_name(f"{model.name}.{DEAD_PID}.partial")
    partial.write_bytes(b"half")
    cache = fake_cache(model)
    other = fake_download(home, "gemma3-270m")
    other_cache = fake_cache(other)

    dry = edgeinfer("rm", "smollm2-135m-instruct", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {model} (98.4 MB)" in dry.stdout and model.exists() and cache.exists()

    result = edgeinfer("rm", "smollm2-135m-instruct")
    assert result.returncode == 0, result.stderr
    removed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("removed ")]
    # the marker goes first: a removal stopped midway never leaves a file that looks verified
    assert removed == [f"{model}.sha256", str(model), str(partial), str(record_path(cache)), str(cache)]
    assert result.stdout.splitlines()[-1] == "freed 98.4 MB"
    assert not any(Path(p).exists() for p in removed)
    assert other.exists() and other_cache.exists() and record_path(other_cache).exists()

    again = edgeinfer("rm", "smollm2-135m-instruct")
    assert_one_error_line(again, "smollm2-135m-instruct: not downloaded", str(home / "models"))


def test_rm_of_a_path_removes_only_its_cache(home, tmp_path):
    own = tmp_path / "mine.gguf"
    own.write_bytes(b"GGUF" + bytes(100))
    cache = fake_cache(own)
    result = edgeinfer("rm", str(own))
    assert result.returncode == 0, result.stderr
    assert own.exists() and not cache.exists() and not record_path(cache).exists()
    assert_one_error_line(edgeinfer("rm", str(own)), str(own), "no repacked cache")


@pytest.mark.parametrize("argument, fragments", [
    ("no-such-model", ["no-such-model: no such file and not a catalogue model", "smollm2-135m-instruct"]),
    ("{tmp}", ["{tmp} is a directory, not a GGUF file"]),
])
def test_rm_mistakes_are_one_line(home, tmp_path, argument, fragments):
    result = edgeinfer("rm", argument.format(tmp=tmp_path))
    assert_one_error_line(result, *[f.format(tmp=tmp_path) for f in fragments])


# ---------------------------------------------------------------- prune

def test_prune_removes_what_no_run_will_use(home, tmp_path):
    kept_model = fake_download(home, "smollm2-135m-instruct")
    kept = {
        kept_model, fake_cache(kept_model), record_path(cache_path(kept_model, 1000)),
        home / "models" / f"{kept_model.name}.{os.getpid()}.partial",  # a pull still running
        home / "numba" / _sources_hash(),
    }
    gone_model = tmp_path / "deleted.gguf"
    gone_model.write_bytes(b"GGUF")
    gone_cache = fake_cache(gone_model)
    gone_model.unlink()
    changed_model = tmp_path / "changed.gguf"
    changed_model.write_bytes(b"GGUF")
    changed_cache = fake_cache(changed_model)
    changed_model.write_bytes(b"GGUF, rewritten")
    no_record = fake_cache(kept_model, size=2000, record=False)
    orphan_record = home / "repacked" / "orphan.12345678.0123456789abcdef.json"
    orphan_record.write_text("{}")
    removable = {
        gone_cache: "model file", record_path(gone_cache): "is gone",
        changed_cache: "has changed", record_path(changed_cache): "has changed",
        no_record: "no record of its model file", orphan_record: "record without a cache file",
        home / "repacked" / f"x.bin.abc123.{DEAD_PID}.partial": "partial file",
        home / "models" / f"{kept_model.name}.{DEAD_PID}.partial": "partial download",
        home / "numba" / "0123456789ab": "other sources",
    }
    for path in [*removable, *kept]:
        if path.suffix == ".partial":
            path.write_bytes(b"x" * 500)
        elif not path.exists():
            path.mkdir(parents=True)  # a Numba cache directory
    (home / "numba" / "0123456789ab" / "kernel.nbc").write_bytes(b"x" * 3000)
    expected_bytes = sum(p.stat().st_size for p in removable if p.is_file()) + 3000

    dry = edgeinfer("prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert all(path.exists() for path in removable) and "would free" in dry.stdout.splitlines()[-1]

    result = edgeinfer("prune")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("removed ")}
    assert set(lines) == {str(p) for p in removable}, result.stdout
    for path, why in removable.items():
        assert why in lines[str(path)] and not path.exists()
    assert all(path.exists() for path in kept)
    assert result.stdout.splitlines()[-1] == f"freed {expected_bytes / 1e6:.1f} MB"
    assert edgeinfer("prune").stdout == "nothing to prune\n"
