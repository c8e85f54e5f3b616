"""Architectures: each module turns a GGUF's metadata into a DecoderConfig. Add a family member by adding a file."""
from edgeinfer.arch import gemma3, llama, qwen2
from edgeinfer.arch.decoder import DecoderConfig, DecoderWeights, check_implemented, read_weights
from edgeinfer.errors import UnsupportedError
from edgeinfer.gguf_reader import GGUFFile

ARCHITECTURES = {module.ARCH: module for module in (llama, qwen2, gemma3)}


def load_decoder(gguf: GGUFFile) -> tuple[DecoderConfig, DecoderWeights]:
    """The config and weight views (into the memory map) of a GGUF model of a supported architecture. Reads
    metadata and tensor headers only: preparing the weights for kernels is a backend's job (edgeinfer.backends).

    Raises GGUFError for a hyper-parameter, special token id or tensor that is missing or out of range, and
    UnsupportedError for anything the file asks for that the forward pass does not compute (both name the key)."""
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{gguf.path}: architecture {arch!r} is not supported "
                               f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    cfg = ARCHITECTURES[arch].config_from_gguf(gguf)
    check_implemented(gguf, cfg)
    return cfg, read_weights(gguf, cfg)
