"""edgeinfer: on-device LLM inference for GGUF models in Python + Numba.

    import edgeinfer
    with edgeinfer.load("smollm2-135m-instruct") as model:
        print(model.chat([{"role": "user", "content": "Hi!"}]))
"""
from edgeinfer.errors import (  # noqa: F401
    BudgetError,
    EdgeInferError,
    FetchError,
    GGUFError,
    InvalidArgument,
    ModelClosed,
    ModelError,
    ModelNotFound,
    TemplateError,
    TokenizerError,
    UnsupportedError,
)
import kernels_cpu as _kernels_cpu  # noqa: F401  (fixes Numba's cache directory before numba is imported)

__version__ = "0.1.0"


def load(model, *, n_ctx=None, n_threads=None, seed=None, power="auto", n_seq=1, kv_type=None, draft=None,
         device="auto", frontier=None):
    """Open a model by catalogue name or GGUF path; see `edgeinfer.api.load` (the same keywords)."""
    from edgeinfer.api import load as _load

    return _load(model, n_ctx=n_ctx, n_threads=n_threads, seed=seed, power=power, n_seq=n_seq, kv_type=kv_type,
                 draft=draft, device=device, frontier=frontier)


def __getattr__(name):
    # Model and the heavier modules load on first use, so `import edgeinfer` stays fast.
    if name == "Model":
        from edgeinfer.api import Model

        return Model
    if name == "ChatSession":
        from edgeinfer.session import ChatSession

        return ChatSession
    raise AttributeError(f"module 'edgeinfer' has no attribute {name!r}")
