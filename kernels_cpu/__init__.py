"""Numba CPU kernels. Knows nothing of GGUF files: inputs are numpy arrays of raw ggml blocks and floats.

Numba reads NUMBA_CACHE_DIR when it is first imported, so the cache location is fixed here, before any kernel
module imports numba. edgeinfer sets it from $EDGEINFER_HOME; standalone users get the per-user cache directory.
"""
import os

if "NUMBA_CACHE_DIR" not in os.environ:
    _home = os.environ.get("EDGEINFER_HOME")
    if not _home:
        import platformdirs

        _home = platformdirs.user_cache_dir("edgeinfer")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(_home, "numba")
