"""Where edgeinfer keeps its files: models, the Numba compilation cache, repacked weights and the frontier's weight
variants, all under home().

Everything that writes there asks `writable_home()` first: a home that is a file, lies under a file or cannot be
written is reported once per process as one `warning:` line on stderr, and the callers then keep their caches in
memory (or a temporary directory) for the run instead of failing.
"""
import os
import sys
import tempfile
from pathlib import Path

import platformdirs

_problems: dict[Path, str | None] = {}  # home path -> why it is unusable (None: usable), checked once per process
_warned: set[Path] = set()  # unusable homes already reported in this process


def home() -> Path:
    """$EDGEINFER_HOME, or the per-user cache directory (e.g. ~/.cache/edgeinfer)."""
    env = os.environ.get("EDGEINFER_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("edgeinfer"))


def models_dir() -> Path:
    """Directory holding downloaded, verified model files."""
    return home() / "models"


def frontier_dir() -> Path:
    """Directory holding `edgeinfer frontier`'s weight variants: <source digest>/<type>[-p<prune>]/model.gguf."""
    return home() / "frontier"


def home_problem(path: Path | None = None) -> str | None:
    """Why `path` (default: home()) cannot hold edgeinfer's files, e.g. "it is a file"; None if it can.

    Creates the directory if it is missing (it is about to be written anyway)."""
    path = Path(path) if path is not None else home()
    if path not in _problems:
        _problems[path] = _find_problem(path)
    return _problems[path]


def _find_problem(path: Path) -> str | None:
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                return "it is a file" if ancestor == path else f"{ancestor} is a file"
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # root ignores permission bits: only a real write tells
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def writable_home() -> Path | None:
    """home() if it is a writable directory (made if missing); else None, after one warning line on stderr (once
    per process and home) saying that caches are kept for this run only."""
    path = home()
    problem = home_problem(path)
    if problem is None:
        return path
    if path not in _warned:
        _warned.add(path)
        warn(f"EDGEINFER_HOME {path} is not a writable directory ({problem}); caches are kept for this run only")
    return None


def warn(message: str) -> None:
    """Print `warning: MESSAGE` as one line on stderr (the CLI's form for things that do not stop a run)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
