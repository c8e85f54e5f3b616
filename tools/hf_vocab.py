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

# sha256 of str(token ids of CHKTXT) -> tokenizer.ggml.pre: llama.cpp's get_vocab_base_pre table (the later of two
# equal hashes wins, as there), for the pre-tokenizers edgeinfer's tokenizer implements
KNOWN_PRE_TOKENIZERS = {
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
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
    return _json(path) if path.is_file() else {}


def _json(path: Path) -> dict:
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
    special = gguf.SpecialVocab(src, load_merges=True)
    byte_level_adds_no_specials(special, spec)
    special.add_to_gguf(w, quiet=True)
    return n_vocab


def byte_level_adds_no_specials(special: gguf.SpecialVocab, spec: dict) -> None:
    """llama.cpp's current gguf-py (newer than the released package this project installs): a ByteLevel
    post-processor means no BOS and no EOS are added, unless a TemplateProcessing / RobertaProcessing beside it
    decides one, and that decision wins over tokenizer_config.json's add_bos_token / add_eos_token."""
    post = spec.get("post_processor") or {}
    processors = post.get("processors", [post])
    if not any(p.get("type") == "ByteLevel" for p in processors):
        return
    decided = set()
    for p in processors:
        single = p.get("single", []) if p.get("type") == "TemplateProcessing" else []
        if p.get("type") == "RobertaProcessing" or (len(single) > 1 and "SpecialToken" in single[0]):
            decided.add("bos")
        if p.get("type") == "RobertaProcessing" or (len(single) > 1 and "SpecialToken" in single[-1]):
            decided.add("eos")
    for kind in ("bos", "eos"):
        if kind not in decided:
            special.add_special_token[kind] = False


def add_spm_vocab(w: gguf.GGUFWriter, src: Path, config: dict, phi3: bool = False) -> int:
    """convert_hf_to_gguf's _set_vocab_sentencepiece from tokenizer.model; returns the vocabulary size. phi3: as
    Phi3MiniModel.set_vocab instead, where an added token is CONTROL only when marked special (its text kept as it is)
    and tokenizer.json's added tokens are read the same way."""
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
    added = [(int(key), entry) for key, entry in _tokenizer_config(src).get("added_tokens_decoder", {}).items()]
    if phi3 and (src / "tokenizer.json").is_file():
        added += [(int(entry["id"]), entry) for entry in _json(src / "tokenizer.json").get("added_tokens", [])]
    for i, entry in added:
        text = entry["content"]
        if i >= n_vocab:
            continue
        if phi3:
            types[i] = CONTROL if entry.get("special") else USER_DEFINED
        elif entry.get("special") or looks_special(text):
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


def add_vocab(w: gguf.GGUFWriter, src: Path, config: dict, conversion, put) -> int:
    """The tokenizer keys as the family's model class in llama.cpp's converter writes them: the first of its
    tokenizer files (conversion.tokenizers, an edgeinfer.arch.hf.HFConversion) present, then its extra keys, set
    with put(w, key, value); returns the number of tokens (the embedding's row count)."""
    files = {"sentencepiece": "tokenizer.model", "bpe": "tokenizer.json"}
    kind = next((k for k in conversion.tokenizers if (src / files[k]).is_file()), None)
    if kind is None:
        raise _error(f"{src}: no {' or '.join(files[k] for k in conversion.tokenizers)}")
    if kind == "sentencepiece":
        n_vocab = add_spm_vocab(w, src, config, conversion.phi3_added_tokens)
    else:
        n_vocab = add_bpe_vocab(w, src, config)
    if conversion.vocab_keys:
        for key, value in conversion.vocab_keys(config, _tokenizer_config(src), kind).items():
            put(w, key, value)
    return n_vocab
