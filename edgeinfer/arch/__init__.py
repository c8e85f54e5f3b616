"""Architectures: each module of this package that defines `ARCH` is one member of the pre-norm decoder family.

Adding an architecture is adding one file here: it declares what the runtime and the converter (tools/) need,

    ARCH = "llama"                              # the GGUF `general.architecture` it reads
    HF_ARCHITECTURES = ("LlamaForCausalLM",)    # Hugging Face config.json "architectures" it converts from
    HF_MODEL_TYPE = "llama"                     # config.json "model_type" written when exporting
    GGUF_MODEL_ARCH = "LLAMA"                   # gguf-py's MODEL_ARCH member (tensor-name map)
    HF_CONVERT = HFConversion(llama_hparams, permuted=True, ...)   # what llama.cpp's converter does beyond
                                                # mapping names: the keys it writes, Q/K permutation, norm shift, ...
    def config_from_gguf(gguf) -> DecoderConfig: ...

and is found by `discover` (no list to keep in step, here or in tools/).
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType

from edgeinfer.arch.decoder import DecoderConfig, DecoderWeights, check_implemented, read_weights
from edgeinfer.errors import UnsupportedError
from edgeinfer.gguf_reader import GGUFFile

# what an architecture module must define besides ARCH
DECLARATIONS = ("HF_ARCHITECTURES", "HF_MODEL_TYPE", "GGUF_MODEL_ARCH", "HF_CONVERT", "config_from_gguf")


def discover(package: ModuleType) -> dict[str, ModuleType]:
    """{ARCH: module} of every module in package that defines ARCH, sorted by name; a module that lacks one of
    DECLARATIONS, or repeats another's ARCH, is an ImportError naming it (a mistake in adding a file)."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if not hasattr(module, "ARCH"):
            continue  # a helper module (decoder.py, hf.py)
        missing = [name for name in DECLARATIONS if not hasattr(module, name)]
        if missing:
            raise ImportError(f"architecture module {module.__name__} does not define {', '.join(missing)}")
        if module.ARCH in found:
            raise ImportError(f"architecture {module.ARCH!r} is defined by both {found[module.ARCH].__name__} and "
                              f"{module.__name__}")
        found[module.ARCH] = module
    return dict(sorted(found.items()))


ARCHITECTURES = discover(sys.modules[__name__])  # GGUF architecture name -> its module


def load_decoder(gguf: GGUFFile) -> tuple[DecoderConfig, DecoderWeights]:
    """The config and weight views (into the memory map) of a GGUF model of a supported architecture. Reads
    metadata and tensor headers only: preparing the weights for kernels is a backend's job (edgeinfer.backends).

    Raises GGUFError for a hyper-parameter, special token id or tensor that is missing or out of range, and
    UnsupportedError for anything the file asks for that the forward pass does not compute (both name the key)."""
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{gguf.path}: architecture {arch!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    cfg = ARCHITECTURES[arch].config_from_gguf(gguf)
    check_implemented(gguf, cfg)
    return cfg, read_weights(gguf, cfg)
