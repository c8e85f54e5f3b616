"""Fetching catalogue models (placeholder: resolves already-downloaded files; pull logic lands with the catalogue)."""
from pathlib import Path

from edgeinfer.paths import models_dir

_FILES = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}


def ensure_model(name: str) -> Path:
    return models_dir() / _FILES[name]
