"""Numba CPU kernels. Knows nothing of GGUF files: inputs are numpy arrays of raw ggml blocks and floats.

Compiled kernels are cached on disk (cache=True) in a directory named after a hash of this package's sources.
Numba checks only the timestamp of the file that defines a cached function, so a kernel that calls (and inlines)
code from another module would otherwise keep running stale machine code after that module changes.
The location is $NUMBA_CACHE_DIR if the user set it, else $EDGEINFER_HOME/numba/<hash>, else the per-user cache.
"""
import hashlib
import os
import sys
from pathlib import Path


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _cache_dir() -> str:
    home = os.environ.get("EDGEINFER_HOME")
    if not home:
        import platformdirs

        home = platformdirs.user_cache_dir("edgeinfer")
    return os.path.join(home, "numba", _sources_hash())


if "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = _cache_dir()
    if "numba" in sys.modules:  # imported before us: numba read its config already; point it here now
        from numba.core import config as _numba_config

        _numba_config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
