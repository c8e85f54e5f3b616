"""Record what llama.cpp's own converter writes for the tiny family checkpoints (tests/tiny_families.py), so that
tests/test_convert_families.py can compare edgeinfer's converter with it key by key and tensor by tensor without
torch or llama.cpp.

Run once per change of the tiny checkpoints, with torch, transformers and llama-cpp-python importable:

    PYTHONPATH=tests:. python tests/record_convert_references.py LLAMA_CPP_DIR [family ...]

LLAMA_CPP_DIR holds convert_hf_to_gguf.py (with its conversion/ package and gguf-py). For each family and type
(F16, Q8_0) `tests/data/families/convert-<family>.json.gz` gets: every metadata key llama.cpp's converter writes (GGUF
type and value), every tensor (type, shape, sha256 of its bytes), llama.cpp's tokenization of tiny_families.PROMPT
with the converted file, and, as a record of the check, the mean KL of llama.cpp's logits on edgeinfer's converted
file against the stored llama.cpp references (tests/data/families/<family>-<type>.npz).
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from test_convert_families import NO_LLAMA_CPP_RECORD, VARIANTS, describe, write_variant
from test_families import compare
from tiny_families import CONTEXT, FAMILIES, PROMPT, write_checkpoint

OUT = Path(__file__).parent / "data" / "families"
TYPES = {"F16": "f16", "Q8_0": "q8_0"}
BPE_FAMILIES = ("olmo2-bpe",)  # llama.cpp converts OLMo 2 only from tokenizer.json: a real one (SmolLM2's)


def BPE_TOKENIZER_FROM() -> Path:
    from models.fetch import ensure_model

    return ensure_model("smollm2-135m-instruct")


def llama_cpp_logits(path: Path, tokens: list[int] | None = None,
                     n_ctx: int = CONTEXT) -> tuple[list[int], np.ndarray]:
    """llama.cpp's tokenization of PROMPT with the file, and its logits at every position of `tokens` (default:
    those), run with n_ctx."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False,
                          seed=0)
    own = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    tokens = own if tokens is None else tokens
    llm.eval(tokens)
    logits = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    return own, logits


def kl_record(ours: np.ndarray, theirs: np.ndarray) -> dict:
    kl, agreement = compare(ours, theirs)
    return {"mean_kl": kl, "argmax_agreement": agreement}


def record(name: str, llama_cpp_dir: Path, directory: Path) -> Path:
    """Convert the family's checkpoint (name "<family>-bpe": with SmolLM2's tokenizer.json, BPE_TOKENIZER_FROM)
    with both converters and write convert-<name>.json.gz."""
    from tools.convert import convert

    if name in VARIANTS:  # config variants: keys and tensors of the F16 file only
        ckpt = write_variant(directory / name / "checkpoint", name)
        theirs = directory / f"{name}-llama.cpp.gguf"
        subprocess.run([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(ckpt), "--outfile",
                        str(theirs), "--outtype", "f16"], check=True, capture_output=True)
        return write_record(name, {"F16": describe(theirs)})
    family = name.removesuffix("-bpe")
    ckpt = write_checkpoint(directory / name / "checkpoint", family,
                            BPE_TOKENIZER_FROM() if name.endswith("-bpe") else None)
    entry = {}
    for type_name, outtype in TYPES.items():
        theirs = directory / f"{name}-{type_name}-llama.cpp.gguf"
        subprocess.run([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(ckpt), "--outfile",
                        str(theirs), "--outtype", outtype], check=True, capture_output=True)
        ours = directory / f"{name}-{type_name}-edgeinfer.gguf"
        convert(ckpt, ours, type_name, force=True)
        reference = OUT / f"{name}-{type_name}.npz"
        if reference.is_file():  # the tiny family's stored llama.cpp logits: both files evaluated on its tokens
            with np.load(reference) as ref:
                ref_tokens, ref_logits = ref["tokens"].tolist(), ref["logits"].astype(np.float32)
            n_ctx = FAMILIES[family].contexts[0]  # the reference's
            tokens, logits_theirs = llama_cpp_logits(theirs, ref_tokens, n_ctx)
            _, logits_ours = llama_cpp_logits(ours, ref_tokens, n_ctx)
            checks = {"llama_cpp_on_edgeinfer_file_vs_reference": kl_record(logits_ours, ref_logits),
                      "llama_cpp_on_its_file_vs_reference": kl_record(logits_theirs, ref_logits)}
        else:
            tokens, logits_theirs = llama_cpp_logits(theirs)
            _, logits_ours = llama_cpp_logits(ours, tokens)
            checks = {"llama_cpp_on_edgeinfer_file_vs_its_file": kl_record(logits_ours, logits_theirs)}
        entry[type_name] = {**describe(theirs), "tokens": tokens, **checks}
        print(f"{name} {type_name}: {checks}")
    return write_record(name, entry)


def write_record(name: str, entry: dict) -> Path:
    out = OUT / f"convert-{name}.json.gz"
    with gzip.open(out, "wt", encoding="utf-8") as f:
        json.dump(entry, f, separators=(",", ":"))
    return out


def main(llama_cpp_dir: str, names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or [*(n for n in FAMILIES if n not in NO_LLAMA_CPP_RECORD), *BPE_FAMILIES, *VARIANTS]:
            out = record(name, Path(llama_cpp_dir), Path(tmp))
            print(f"{out.name}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
