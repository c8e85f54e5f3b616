"""$EDGEINFER_HOME that cannot hold files (a file, or under one), a directory given as the model, and the test
session's own temporary home."""
import os
import tempfile
from pathlib import Path

import pytest

from cli_helpers import assert_one_error_line, run_edgeinfer
from conftest import SESSION_HOME, model_path
from edgeinfer.paths import home_problem, writable_home


@pytest.fixture
def file_home(tmp_path):
    """A path where a directory is expected but a regular file is (chmod would not stop root; a file does)."""
    blocker = tmp_path / "home-is-a-file"
    blocker.write_text("keep me\n")
    return blocker


def warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning:")]


def test_home_that_is_a_file_warns_once(file_home, monkeypatch, capsys):
    monkeypatch.setenv("EDGEINFER_HOME", str(file_home))
    assert writable_home() is None and writable_home() is None
    assert capsys.readouterr().err == (f"warning: EDGEINFER_HOME {file_home} is not a writable directory (it is a "
                                       f"file); caches are kept for this run only\n")
    assert file_home.read_text() == "keep me\n"


def test_home_under_a_file_names_the_file(file_home, monkeypatch, capsys):
    monkeypatch.setenv("EDGEINFER_HOME", str(file_home / "sub" / "home"))
    assert writable_home() is None
    assert warning_lines(capsys.readouterr().err) == [
        f"warning: EDGEINFER_HOME {file_home / 'sub' / 'home'} is not a writable directory ({file_home} is a file); "
        f"caches are kept for this run only"]


def test_missing_home_is_made(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path / "new" / "home"))
    assert writable_home() == tmp_path / "new" / "home" and (tmp_path / "new" / "home").is_dir()
    assert home_problem() is None and capsys.readouterr().err == ""
    assert list((tmp_path / "new" / "home").iterdir()) == []  # the write probe leaves nothing


@pytest.mark.parametrize("command", [["run", "smollm2-135m-instruct", "Hi", "-n", "2"], ["pull", "gemma3-270m"],
                                     ["info", "qwen2.5-coder-0.5b-instruct"]])
def test_catalogue_name_that_needs_a_download_names_the_home(file_home, command):
    result = run_edgeinfer(*command, env={"EDGEINFER_HOME": str(file_home)})
    assert_one_error_line(result, "cannot fetch", str(file_home), "not a writable directory")
    assert file_home.read_text() == "keep me\n"


@pytest.mark.parametrize("command", [["run", "{dir}", "Hi"], ["info", "{dir}"], ["chat", "{dir}"]])
def test_directory_as_the_model_says_so(tmp_path, command):
    result = run_edgeinfer(*[arg.format(dir=tmp_path) for arg in command], input="")
    assert_one_error_line(result, f"{tmp_path} is a directory, not a GGUF file")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_model_given_by_path_runs_with_home_a_file(file_home, tmp_path):
    """The one test that pays for compiling every kernel in memory (1-3 minutes): no usable Numba cache."""
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    result = run_edgeinfer("run", str(model_path("smollm2-135m-instruct")), "Hi", "-n", "2", "--temp", "0",
                           "--threads", "1", "--ctx", "128", timeout=900,
                           env={"EDGEINFER_HOME": str(file_home), "NUMBA_CACHE_DIR": None, "TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "NumbaWarning" not in result.stderr
    assert warning_lines(result.stderr) == [
        f"warning: EDGEINFER_HOME {file_home} is not a writable directory (it is a file); "
        f"caches are kept for this run only"]
    assert result.stdout.strip() and "generated 2 tokens" in result.stderr
    assert file_home.read_text() == "keep me\n"
    assert list(scratch.iterdir()) == []  # the temporary Numba cache went with the process


def test_test_session_uses_a_temporary_home():
    real = Path(os.path.realpath(SESSION_HOME / "models")).parent
    assert os.environ["EDGEINFER_HOME"] == str(SESSION_HOME)
    assert Path(os.path.realpath(SESSION_HOME)).is_relative_to(os.path.realpath(tempfile.gettempdir()))
    assert (SESSION_HOME / "models").is_symlink() and (SESSION_HOME / "numba").is_symlink()
    assert not (SESSION_HOME / "repacked").is_symlink() and real != Path(os.path.realpath(SESSION_HOME))
