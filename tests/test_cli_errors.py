"""Every CLI mistake through the real console script: one `error:` line naming the option or argument, a non-zero
exit (2 for a usage error, 1 for any other), no traceback, refused before any work; `--help` shows the ranges; the
valid options still run end to end."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import kernels_cpu  # noqa: F401  (sets NUMBA_CACHE_DIR, which the children share: the kernels are compiled once)
from cli_helpers import EDGEINFER, assert_one_error_line, run_edgeinfer
from conftest import model_path

MODEL = "{model}"  # replaced by the path of SmolLM2's file
DIR = "{dir}"  # replaced by an existing directory

# (id, arguments, expected exit status, fragments of the error line)
MISTAKES = [
    ("empty-prompt", ["run", MODEL, ""], 2, ["'PROMPT'", "empty"]),
    ("negative-max-tokens", ["run", MODEL, "hi", "-n", "-1"], 2, ["--max-tokens", "-1", "x>=0"]),
    ("top-p-above-1", ["run", MODEL, "hi", "--top-p", "1.5"], 2, ["--top-p", "1.5", "0<=x<=1"]),
    ("min-p-below-0", ["run", MODEL, "hi", "--min-p", "-0.1"], 2, ["--min-p", "-0.1"]),
    ("top-p-nan", ["run", MODEL, "hi", "--top-p", "nan"], 2, ["--top-p", "nan is not a finite number"]),
    ("repeat-penalty-0", ["run", MODEL, "hi", "--repeat-penalty", "0"], 2, ["--repeat-penalty", "x>0"]),
    ("temp-nan", ["run", MODEL, "hi", "--temp", "nan"], 2, ["--temp", "nan is not a finite number"]),
    ("temp-inf", ["run", MODEL, "hi", "--temp", "inf"], 2, ["--temp", "inf is not a finite number"]),
    ("temp-negative", ["run", MODEL, "hi", "--temp", "-1"], 2, ["--temp", "x>=0"]),
    ("top-k-negative", ["run", MODEL, "hi", "--top-k", "-1"], 2, ["--top-k", "x>=0"]),
    ("seed-below-minus-1", ["run", MODEL, "hi", "--seed", "-2"], 2, ["--seed", "-2", "x>=-1"]),
    ("ctx-0", ["run", MODEL, "hi", "--ctx", "0"], 2, ["--ctx", "x>=1"]),
    ("threads-0", ["run", MODEL, "hi", "--threads", "0"], 2, ["--threads", "x>=1"]),
    ("run-threads-999", ["run", MODEL, "hi", "--threads", "999"], 2, ["--threads", "999", "compute threads"]),
    ("plan-threads-999", ["plan", MODEL, "--threads", "999"], 2, ["--threads", "999", "compute threads"]),
    ("chat-temp-nan", ["chat", MODEL, "--temp", "nan"], 2, ["--temp", "nan"]),
    ("chat-max-tokens-0", ["chat", MODEL, "--max-tokens", "0"], 2, ["--max-tokens", "x>=1"]),
    ("bench-threads-0", ["bench", MODEL, "-t", "0"], 2, ["'-t'", "0", "compute threads"]),
    ("bench-threads-999", ["bench", MODEL, "-t", "1,999"], 2, ["'-t'", "999", "compute threads"]),
    ("bench-threads-not-numbers", ["bench", MODEL, "-t", "1,x"], 2, ["'-t'", "'1,x'", "comma-separated"]),
    ("bench-reps-0", ["bench", MODEL, "-r", "0"], 2, ["--reps", "x>=1"]),
    ("bench-batch-0", ["bench", MODEL, "--batch", "1,0"], 2, ["--batch", "'1,0'", ">= 1"]),
    ("bench-negative-prompt", ["bench", MODEL, "-p", "-5"], 2, ["--prompt-tokens", "x>=0"]),
    ("bench-prompt-beyond-ctx", ["bench", MODEL, "-p", "600", "--ctx", "512"], 2, ["-p 600", "context of 512"]),
    ("bench-gen-beyond-ctx", ["bench", MODEL, "-n", "600", "--ctx", "512"], 2, ["-n 600", "context of 512"]),
    ("bench-nothing-to-measure", ["bench", MODEL, "-p", "0", "-n", "0"], 2, ["nothing to measure"]),
    ("bench-depth-negative", ["bench", MODEL, "-d", "0,-1"], 2, ["--depth", "'0,-1'", ">= 0"]),
    ("bench-draft-without-spec", ["bench", MODEL, "--draft", MODEL], 2, ["--draft", "--spec"]),
    ("bench-spec-draft-without-draft", ["bench", MODEL, "--spec", "draft"], 2, ["--spec draft", "--draft MODEL"]),
    ("bench-depth-not-numbers", ["bench", MODEL, "-d", "4k"], 2, ["--depth", "'4k'", "comma-separated"]),
    ("bench-depth-beyond-ctx", ["bench", MODEL, "-d", "0,500", "-p", "0", "-n", "16", "--ctx", "512"], 2,
     ["-n 16 at -d 500 (516 positions)", "context of 512"]),
    ("bench-kv-type-bad", ["bench", MODEL, "--kv-type", "f32,q4_0"], 2, ["--kv-type", "'q4_0' is not one of", "'f16'"]),
    ("run-kv-type-bad", ["run", MODEL, "hi", "--kv-type", "q4_0"], 2, ["--kv-type", "'q4_0' is not one of"]),
    ("chat-kv-type-bad", ["chat", MODEL, "--kv-type", "F16"], 2, ["--kv-type", "'F16' is not one of"]),
    ("plan-kv-type-bad", ["plan", MODEL, "--kv-type", "int8"], 2, ["--kv-type", "'int8' is not one of", "'q8_0'"]),
    ("perplexity-kv-type-bad", ["perplexity", MODEL, "text.txt", "--kv-type", "f64"], 2, ["--kv-type", "'f64'"]),
    ("perplexity-chunks-0", ["perplexity", MODEL, "text.txt", "--chunks", "0"], 2, ["--chunks", "x>=1"]),
    ("perplexity-ctx-2", ["perplexity", MODEL, "text.txt", "--ctx", "2"], 2, ["--ctx", "x>=4"]),
    ("perplexity-threads-0", ["perplexity", MODEL, "text.txt", "--threads", "0"], 2, ["--threads"]),
    ("convert-prune-1", ["convert", "src", "out.gguf", "--type", "Q8_0", "--prune", "1"], 2, ["--prune", "0<=x<1"]),
    ("convert-prune-nan", ["convert", "src", "out.gguf", "--type", "Q8_0", "--prune", "nan"], 2, ["--prune", "nan"]),
    ("convert-threads-0", ["convert", "src", "out.gguf", "--type", "Q8_0", "--threads", "0"], 2, ["--threads"]),
    ("run-directory", ["run", DIR, "hi"], 1, [f"{DIR} is a directory, not a GGUF file"]),
    ("info-directory", ["info", DIR], 1, [f"{DIR} is a directory, not a GGUF file"]),
    ("bench-directory", ["bench", DIR], 1, ["is a directory, not a GGUF file"]),
    ("chat-directory", ["chat", DIR], 1, ["is a directory, not a GGUF file"]),
    ("kl-base-directory", ["perplexity", MODEL, "text.txt", "--kl-base", DIR], 1, ["is a directory, not a GGUF"]),
    ("bench-serve-not-a-url", ["bench-serve", "localhost:9"], 1, ["localhost:9", "not an http:// or https:// URL"]),
    ("bench-serve-unreachable", ["bench-serve", "http://127.0.0.1:9"], 1, ["http://127.0.0.1:9", "cannot reach"]),
    ("unknown-option", ["run", MODEL, "hi", "--tmep", "0"], 2, ["No such option", "--tmep", "edgeinfer run --help"]),
    ("missing-argument", ["run"], 2, ["Missing argument 'MODEL'"]),
]


@pytest.fixture(scope="module")
def smollm() -> str:
    return str(model_path("smollm2-135m-instruct"))


@pytest.fixture
def home_env(tmp_path) -> dict:
    """A temporary EDGEINFER_HOME (repacked weights land there); the kernel cache stays the shared, warm one."""
    return {"EDGEINFER_HOME": str(tmp_path / "home"), "NUMBA_CACHE_DIR": os.environ["NUMBA_CACHE_DIR"]}


@pytest.mark.parametrize("args, status, fragments", [case[1:] for case in MISTAKES], ids=[c[0] for c in MISTAKES])
def test_every_mistake_is_one_error_line(smollm, tmp_path, home_env, args, status, fragments):
    text_file = tmp_path / "text.txt"
    text_file.write_text("Some text to score. " * 50)
    substitute = {MODEL: smollm, DIR: str(tmp_path), "text.txt": str(text_file)}
    args = [substitute.get(a, a) for a in args]
    fragments = [f.replace(DIR, str(tmp_path)) for f in fragments]
    start = time.perf_counter()
    result = run_edgeinfer(*args, env=home_env, timeout=60)
    elapsed = time.perf_counter() - start
    assert_one_error_line(result, *fragments)
    assert result.returncode == status, result.stderr
    assert result.stdout == ""
    assert elapsed < 10, f"refused only after {elapsed:.1f} s: some work was done first"  # no model was loaded


def test_plan_and_run_refuse_too_many_threads_with_the_same_message(smollm, home_env):
    run_line = assert_one_error_line(run_edgeinfer("run", smollm, "hi", "--threads", "999", env=home_env))
    plan_line = assert_one_error_line(run_edgeinfer("plan", smollm, "--threads", "999", env=home_env))
    assert run_line.split(" (see ")[0] == plan_line.split(" (see ")[0]  # the hint names each command's --help


def test_chat_with_stdin_closed(smollm, home_env):
    # `<&-` closes fd 0, so Python's sys.stdin is None; stdin=DEVNULL would be an open, empty stdin
    argv = [EDGEINFER] if EDGEINFER else [sys.executable, "-m", "edgeinfer.cli"]
    result = subprocess.run(["bash", "-c", 'exec "$@" <&-', "bash", *argv, "chat", smollm], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **home_env})
    assert_one_error_line(result, "standard input is closed", "chat reads messages from it")


def _help(command: str) -> str:
    return " ".join(run_edgeinfer(command, "--help").stdout.split())  # unwrapped: click wraps at the terminal width


def test_help_shows_ranges_and_each_commands_defaults():
    run_help = _help("run")
    for text in ("0<=x<=1", "x>0", "x>=0", "-1 picks a random one", "default: -1", "default: 1.0;"):
        assert text in run_help, f"{text!r} not in run --help: {run_help}"
    chat_help = _help("chat")
    assert "default: 1.1;" in chat_help and "default: 1.0;" not in chat_help, chat_help
    bench_help = _help("bench")
    assert "--ctx INTEGER RANGE" in bench_help and "--reps INTEGER RANGE" in bench_help, bench_help
    for text in ("-d, --depth N[,N...]", "'tg128 @ d4096'", "--kv-type [f32|f16|q8_0][,...]", "weights, and the KV"):
        assert text in bench_help, f"{text!r} not in bench --help: {bench_help}"
    for command in ("run", "chat", "plan", "perplexity"):
        assert "--kv-type [f32|f16|q8_0]" in _help(command), command


def test_the_cli_offers_every_kv_cache_type():
    from edgeinfer.cli import KV_TYPE_CHOICES
    from edgeinfer.kv_cache import KV_TYPES

    assert KV_TYPE_CHOICES == tuple(KV_TYPES)
    convert_help = _help("convert")
    assert "--force" in convert_help and "0<=x<1" in convert_help, convert_help


def test_an_os_error_at_the_edge_is_one_line(monkeypatch, capsys, smollm):
    import edgeinfer.model_info
    from edgeinfer.cli import main

    def unreadable(gguf):
        raise PermissionError(13, "Permission denied", "/models/locked.gguf")

    monkeypatch.setattr(edgeinfer.model_info, "summarize", unreadable)
    with pytest.raises(SystemExit) as exit_info:
        main(["info", smollm])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: /models/locked.gguf: Permission denied\n"


@pytest.mark.slow
def test_valid_options_still_run_end_to_end(smollm, home_env):
    result = run_edgeinfer("run", smollm, "The capital of France is", "-n", "4", "--temp", "0", "--threads", "1",
                           "--ctx", "256", "--seed", "-1", "--kv-type", "f32", env=home_env)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "generated 4 tokens" in result.stderr, (result.stdout, result.stderr)
    assert "error" not in result.stderr
