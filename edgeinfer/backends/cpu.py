"""The CPU backend's preparation of a model's weights: matrices repacked into the int8 kernels' 16-row layouts.

Kept apart from the architectures so that `plan`, `info` and `convert`, which read only metadata and tensor headers,
never repack a model; only what runs it does (`Model`, the benchmark).
"""
from __future__ import annotations

import os

from edgeinfer.arch.decoder import DecoderWeights


def prepare_weights(weights: DecoderWeights, model_path: str | os.PathLike, use_cache: bool = True) -> DecoderWeights:
    """weights with every matrix that has a repacked layout pointing at it (made once per model file and cached
    under $EDGEINFER_HOME/repacked, memory-mapped afterwards; see edgeinfer.repacked)."""
    from edgeinfer.repacked import repack_weights

    return repack_weights(weights, model_path, use_cache=use_cache)
