"""Record llama.cpp's logits on the tiny family models (tests/tiny_families.py) into tests/data/families/.

Run once per change of the tiny models, with llama-cpp-python importable (the tests need neither it nor llama.cpp):

    PYTHONPATH=tests:. LLAMA_CPP_LIB_PATH=... python tests/record_family_references.py [family ...]

Each `<family>-<type>.npz` (recorded at the family's first n_ctx; `-ctx<n>` for its others: long-rope's factors
depend on the context) holds `tokens` (llama.cpp's tokenization of tiny_families.PROMPT with BOS, int32) and
`logits` (float16, (n_tokens, n_vocab): llama.cpp's logits at every position, teacher-forced), and `version`.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from tiny_families import FAMILIES, PROMPT, WEIGHT_TYPES, reference_name, write_family

OUT = Path(__file__).parent / "data" / "families"


def record(name: str, weight_type: str, directory: Path, n_ctx: int) -> Path:
    import llama_cpp

    path = write_family(directory / f"{name}-{weight_type}.gguf", name, weight_type)
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False,
                          seed=0)
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    llm.eval(tokens)
    logits = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    assert np.all(np.isfinite(logits)), f"{name} {weight_type}: llama.cpp gave non-finite logits"
    out = OUT / reference_name(name, weight_type, n_ctx)
    np.savez_compressed(out, tokens=np.array(tokens, np.int32), logits=logits.astype(np.float16),
                        version=np.array(llama_cpp.__version__))
    llm.close()
    return out


def main(names: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or FAMILIES:
            for weight_type in WEIGHT_TYPES:
                for n_ctx in FAMILIES[name].contexts:
                    out = record(name, weight_type, Path(tmp), n_ctx)
                    print(f"{out.name}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
