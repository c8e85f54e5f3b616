"""Numba CPU kernels. Knows nothing of GGUF files: inputs are numpy arrays of raw ggml blocks and floats.

Compiled kernels are cached on disk (cache=True) in a directory named after a hash of this package's sources.
Numba checks only the timestamp of the file that defines a cached function, so a kernel that calls (and inlines)
code from another module would otherwise keep running stale machine code after that module changes.
The location is $NUMBA_CACHE_DIR if the user set it, else $EDGEINFER_HOME/numba/<hash>; where that home cannot
be written (edgeinfer.paths.writable_home warns once), a temporary directory removed when the process exits: Numba
would otherwise fall back to writing into the source tree, and `specialize` needs a directory for its modules.
"""
import atexit
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path


# modules that compile nothing (the cache logic here; where kernel calls run): editing them need not recompile
_NO_KERNELS = ("__init__.py", "kernel_thread.py")


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name in _NO_KERNELS:
            continue
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _cache_dir() -> str:
    from edgeinfer.paths import writable_home

    home = writable_home()
    if home is None:
        scratch = tempfile.mkdtemp(prefix="edgeinfer-numba-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        return scratch
    # resolved: the specialized decode steps live here, and Numba keys its cache on their source path
    return os.path.realpath(os.path.join(home, "numba", _sources_hash()))


def stale_cache_dirs() -> list[Path]:
    """$EDGEINFER_HOME/numba/<hash> directories of other kernel sources than these (safe to delete)."""
    from edgeinfer.paths import home

    root, current = home() / "numba", _sources_hash()
    return sorted(p for p in root.glob("*") if p.is_dir() and p.name != current) if root.is_dir() else []


if "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = _cache_dir()
    if "numba" in sys.modules:  # imported before us: numba read its config already; point it here now
        from numba.core import config as _numba_config

        _numba_config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
