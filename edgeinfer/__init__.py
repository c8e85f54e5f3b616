"""edgeinfer: on-device LLM inference for GGUF models in Python + Numba."""
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

__version__ = "0.1.0"
