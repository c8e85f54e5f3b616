"""edgeinfer: on-device LLM inference for GGUF models in Python + Numba.

    import edgeinfer
    with edgeinfer.load("smollm2-135m-instruct") as model:
        print(model.chat([{"role": "user", "content": "Hi!"}]))
"""
import os as _os

from edgeinfer.errors import (  # noqa: F401
    BudgetError,
    EdgeInferError,
    FetchError,
    GGUFError,
    ModelNotFound,
    TemplateError,
    TokenizerError,
    UnsupportedError,
)
from edgeinfer.paths import numba_cache_dir as _numba_cache_dir

# Numba reads its cache location once, at import: fix it before any kernel module imports numba.
_os.environ.setdefault("NUMBA_CACHE_DIR", str(_numba_cache_dir()))

__version__ = "0.1.0"


def load(model, *, n_ctx=None, n_threads=None, seed=None):
    """Open a model by catalogue name or GGUF path; see `edgeinfer.api.load`."""
    from edgeinfer.api import load as _load

    return _load(model, n_ctx=n_ctx, n_threads=n_threads, seed=seed)


def __getattr__(name):
    # Model and the heavier modules load on first use, so `import edgeinfer` stays fast.
    if name == "Model":
        from edgeinfer.api import Model

        return Model
    raise AttributeError(f"module 'edgeinfer' has no attribute {name!r}")
