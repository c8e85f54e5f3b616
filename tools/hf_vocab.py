"""The tokenizer of a Hugging Face checkpoint as GGUF `tokenizer.ggml.*` keys, mirroring convert_hf_to_gguf.py.

Byte-level BPE (tokenizer.json): the vocabulary with added tokens typed CONTROL or USER_DEFINED, merges, and the
pre-tokenizer's llama.cpp name, recognized as llama.cpp does by hashing the token ids of a fixed probe text
(get_vocab_base_pre). SentencePiece (tokenizer.model): pieces, scores and types from the model, then the added tokens
of added_tokens.json / tokenizer_config.json. Special token ids, add_bos/add_eos and the chat template come from
gguf-py's SpecialVocab (tokenizer_config.json and config.json), exactly as in llama.cpp's converter.
The `transformers` package is not needed: the fast tokenizer is read with `tokenizers`.
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf

# llama.cpp's probe text for recognizing BPE pre-tokenizers (convert_hf_to_gguf.py, get_vocab_base_pre)
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 '
          '3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')

# sha256 of str(token ids of CHKTXT) -> tokenizer.ggml.pre, for the families this converter supports
# (the values of llama.cpp's get_vocab_base_pre table)
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type values


def _error(message: str):
    from tools.convert import ConvertError

    return ConvertError(message)


def looks_special(token: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: texts that are control tokens whatever the config says."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the checkpoint's BPE pre-tokenizer, from the hash of the probe text's token ids."""
    chkhsh = sha256(str(tokenizer.encode(CHKTXT).ids).encode()).hexdigest()
    if chkhsh not in KNOWN_PRE_TOKENIZERS:
        raise _error(f"the BPE pre-tokenizer was not recognized (chkhsh {chkhsh}); llama.cpp would not know how to "
                     f"pre-tokenize for this model either")
    return KNOWN_PRE_TOKENIZERS[chkhsh]


def _tokenizer_config(src: Path) -> dict:
    path = src / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise _error(f"{path}: not valid JSON ({e})") from None


def add_bpe_vocab(w: gguf.GGUFWriter, src: Path, config: dict) -> int:
    """convert_hf_to_gguf's _set_vocab_gpt2 from tokenizer.json; returns the vocabulary size."""
    from tokenizers import Tokenizer

    path = src / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
        spec = json.loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises its own Exception type for malformed files
        raise _error(f"{path}: cannot be read as a Hugging Face tokenizer ({e})") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    n_vocab = config.get("vocab_size", len(vocab))
    if max(vocab.values()) >= n_vocab:
        raise _error(f"{path}: token id {max(vocab.values())} is outside config.json's vocab_size {n_vocab}")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: text for text, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = by_id[i]
        if i in added:
            if not added[i].get("normalized", True):  # llama.cpp expects added tokens pre-normalized
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids,
                                        skip_special_tokens=False)
            if added[i].get("special") or looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=True).add_to_gguf(w, quiet=True)
    return n_vocab


def add_spm_vocab(w: gguf.GGUFWriter, src: Path, config: dict) -> int:
    """convert_hf_to_gguf's _set_vocab_sentencepiece from tokenizer.model; returns the vocabulary size."""
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(src / "tokenizer.model"))
    except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on the damage
        raise _error(f"{src / 'tokenizer.model'}: cannot be read as a SentencePiece model ({e})") from None
    n_vocab = config.get("vocab_size") or processor.vocab_size()
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i in range(min(processor.vocab_size(), n_vocab)):
        tokens[i], scores[i] = processor.IdToPiece(i), processor.GetScore(i)
        types[i] = (UNKNOWN if processor.IsUnknown(i) else CONTROL if processor.IsControl(i)
                    else UNUSED if processor.IsUnused(i) else BYTE if processor.IsByte(i) else NORMAL)
    added_path = src / "added_tokens.json"
    if added_path.is_file():
        for text, i in json.loads(added_path.read_text(encoding="utf-8")).items():
            if i < n_vocab:
                tokens[i], scores[i], types[i] = text, -1000.0, USER_DEFINED
    for key, entry in _tokenizer_config(src).get("added_tokens_decoder", {}).items():
        i, text = int(key), entry["content"]
        if i >= n_vocab:
            continue
        if entry.get("special") or looks_special(text):
            types[i] = CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = USER_DEFINED
        tokens[i], scores[i] = text, -1000.0
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(src, n_vocab=n_vocab).add_to_gguf(w, quiet=True)
    return n_vocab


def add_vocab(w: gguf.GGUFWriter, src: Path, arch: str, config: dict) -> int:
    """The tokenizer keys for `arch` as llama.cpp's LlamaModel / Qwen2Model / Gemma3Model.set_vocab write them;
    returns the number of tokens (the embedding's row count)."""
    has_spm, has_json = (src / "tokenizer.model").is_file(), (src / "tokenizer.json").is_file()
    if not (has_spm or has_json):
        raise _error(f"{src}: no tokenizer.json or tokenizer.model")
    if arch == "llama":
        add_prefix_space = _tokenizer_config(src).get("add_prefix_space")
        if add_prefix_space is not None:
            w.add_add_space_prefix(add_prefix_space)
    if has_spm:
        n_vocab = add_spm_vocab(w, src, config)
        if arch == "gemma3":
            w.add_add_space_prefix(False)
    else:
        n_vocab = add_bpe_vocab(w, src, config)
    if arch == "llama" and config.get("vocab_size") == 49152:  # llama.cpp: Granite / SmolLM vocabularies, no BOS
        w.kv_data[0].pop(gguf.Keys.Tokenizer.ADD_BOS, None)
        w.add_add_bos_token(False)
    return n_vocab
