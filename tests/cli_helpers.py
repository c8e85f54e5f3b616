"""Running the real `edgeinfer` console script in a subprocess, and the shape every CLI mistake must have."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

EDGEINFER = shutil.which("edgeinfer") or ""


def run_edgeinfer(*args: str, env: dict | None = None, input: str | None = None, stdin=None,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """`edgeinfer ARGS...` as a user runs it (the installed console script; `python -m edgeinfer.cli` if absent).

    env: variables added to (or, with value None, removed from) this process's environment."""
    argv = [EDGEINFER] if EDGEINFER else [sys.executable, "-m", "edgeinfer.cli"]
    full_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          input=input, stdin=stdin if input is None else None)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed as a mistake should: non-zero exit, no traceback, exactly one `error:` line on stderr that
    contains every fragment (case-insensitive). Returns that line."""
    err = result.stderr
    assert result.returncode != 0, f"exit 0 for a mistake; stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in result.stdout, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line, got: {err!r}"
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    return lines[0]
