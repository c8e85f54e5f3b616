"""Tokenizers from GGUF metadata: small hand-made vocabularies first, then the three real models against llama.cpp's
own tokenizations (tests/data/reference) and against the slow line-by-line ports in edgeinfer.tokenizer.reference
on random text."""
import random
import time
import warnings

import numpy as np
import pytest

from conftest import MODEL_NAMES, load_reference, model_path
from edgeinfer.errors import TokenizerError
from edgeinfer.gguf_reader import GGUFFile
from edgeinfer.tokenizer import IncrementalDecoder, Tokenizer
from edgeinfer.tokenizer import reference as ref_impl
from edgeinfer.tokenizer.bpe import PRE_TOKENIZERS
from edgeinfer.tokenizer.detok import clean_spaces, gpt2_byte_alphabet
from edgeinfer.tokenizer.special import partition

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def spm_meta(pieces, **extra):
    """A SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens, then `pieces` as (text, score, type)."""
    tokens = ["<unk>", "<s>", "</s>"] + BYTE_TOKENS + [p[0] for p in pieces]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [p[1] for p in pieces]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [p[2] if len(p) > 2 else NORMAL for p in pieces]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": np.array(scores, np.float32),
            "tokenizer.ggml.token_type": np.array(types, np.int32)}
    meta.update(extra)
    return meta


SPM_PIECES = [("▁", -1.0), ("h", -2.0), ("e", -2.0), ("l", -2.0), ("o", -2.0), ("w", -2.0), ("r", -2.0), ("d", -2.0),
              ("▁h", -3.0), ("he", -4.0), ("ll", -3.5), ("llo", -5.0), ("hello", -6.0), ("▁hello", -7.0),
              ("<ctrl>", 0.0, CONTROL), ("<ud>", 0.0, USER_DEFINED), ("▁w", -3.0), ("or", -3.0), ("▁wor", -4.0)]


def bpe_meta(merges, pre="gpt-2", extra_tokens=(), **extra):
    """A byte-level BPE vocabulary: the 256 byte characters, merge results, then `extra_tokens` as (text, type)."""
    alphabet = list(gpt2_byte_alphabet().values())
    merged = [a + b for a, b in (m.split(" ") for m in merges)]
    tokens = alphabet + merged + [t for t, _ in extra_tokens]
    types = [NORMAL] * (len(alphabet) + len(merged)) + [ty for _, ty in extra_tokens]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.merges": list(merges)}
    meta.update(extra)
    return meta


BPE_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]


def random_texts(seed: int, count: int) -> list[str]:
    """Random mixes of scripts, digits, whitespace runs, apostrophes and special-token look-alikes."""
    letters = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" * 3 + " " * 40
               + "\t\n\r\v\f'\"!?.,;:-_()[]{}<>/\\|@#$%^&*+=~`" + "éèàüöçñßÆøåÉ" + "Ελληνικάλόγος" + "Русскийязык"
               + "日本語のテキスト中文文本漢字" + "한국어" + "العربية" + "हिन्दी" + "🤖🚀👍🏽\u200d\ufe0f👨😀"
               + "\u00a0\u3000\u2028\u0085\u2009" + "٠١٢３４²Ⅻ½" + "’‘“”—…€£¥©®™°±▁"
               + "\x00\x1c\x1d\x1e\x1f\x7f\xad\u0301\u0308\u1680\u180e\u200b\u2029\u202f\u205f\u2060\ufeff")
    chunks = [" ", "  ", "   ", " " * 40, "\n", "\n\n", " \n", "\t\t", "'s", "'ll", "'RE", "123456", "3.14", "\r\n",
              "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>", "<b>", "<0x41>"]
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        n, parts = rng.randint(1, 60), []
        while len(parts) < n:
            parts.append(rng.choice(chunks) if rng.random() < 0.15 else rng.choice(letters))
        texts.append("".join(parts))
    return texts


EDGE_TEXTS = ["", " ", "  ", " " * 31, " " * 32, " " * 70 + "x", "\n" * 40, "\t" * 40 + "a", " \n \n ", "a  \n  b",
              "x" * 200, "1" * 25, "’s 's 'S", "don't I'll WE'RE", "<s><s></s>", "<<|im_end|>|>", "\r\r\n\n",
              "▁▁a▁", "\u3000\u3000x", "a\u00a0b", "ǅ ǈ", "🏳️‍🌈 🇯🇵", "\x00\x01\x7f", "<unused5><mask>"]


# ------------------------------------------------------------------------------------------- SentencePiece, by hand

def test_spm_merges_highest_score_first_and_falls_back_to_bytes():
    tok = Tokenizer.from_metadata(spm_meta(SPM_PIECES))
    ids = tok.encode("hello world!", add_special=False)
    # add_space_prefix defaults to true for SPM: "▁hello▁world!". "▁h" (-3) merges before "he" (-4), so "▁hello" is
    # never reached; "▁w" and "or" tie at -3 and the leftmost goes first; "!" has no piece and becomes a byte
    assert [tok.token_text(i) for i in ids] == ["▁h", "e", "llo", "▁wor", "l", "d", "<0x21>"]
    assert ids == ref_impl.spm_encode("▁hello▁world!", tok.vocab.token_to_id, tok.vocab.scores)
    assert tok.decode(ids) == "hello world!"  # the first piece's prefix space is removed again


def test_spm_defaults_bos_and_space_prefix_and_keys_override_them():
    tok = Tokenizer.from_metadata(spm_meta(SPM_PIECES))
    assert (tok.add_bos, tok.add_eos, tok.bos_id, tok.eos_id) == (True, False, 1, 2)
    assert tok.encode("he")[:1] == [1]
    tok = Tokenizer.from_metadata(spm_meta(SPM_PIECES, **{"tokenizer.ggml.add_bos_token": False,
                                                           "tokenizer.ggml.add_eos_token": True,
                                                           "tokenizer.ggml.add_space_prefix": False}))
    ids = tok.encode("he")
    assert [tok.token_text(i) for i in ids] == ["he", "</s>"]


def test_spm_special_tokens_and_space_prefix_after_them():
    tok = Tokenizer.from_metadata(spm_meta(SPM_PIECES))
    ctrl, ud = tok.token_to_id("<ctrl>"), tok.token_to_id("<ud>")
    # user-defined tokens are always split out; control tokens only with parse_special
    plain = tok.encode("he<ud>he<ctrl>", add_special=False)
    assert plain[:5] == [*tok.encode("he", False), ud, *tok.encode("he", False)] and ctrl not in plain
    ids = tok.encode("he<ctrl>he", add_special=False, parse_special=True)
    assert [tok.token_text(i) for i in ids] == ["▁h", "e", "<ctrl>", "▁h", "e"]  # a fragment after a special: "▁"
    assert tok.decode(ids) == "he he" and tok.decode(ids, special=True) == "he<ctrl> he"


def test_spm_matches_llama_cpp_algorithm_with_space_prefix_and_specials():
    tok = Tokenizer.from_metadata(spm_meta(SPM_PIECES))
    rng = random.Random(3)
    words = ["hello", "world", "he", "llo", " ", "  ", "<ctrl>", "<ud>", "wor", "€", "d", "\n"]
    for _ in range(300):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        for parse_special in (False, True):
            assert tok.encode(text, False, parse_special) == reference_encode(tok, None, text, parse_special), text


def test_spm_incremental_decoder_holds_back_partial_characters():
    tok = Tokenizer.from_metadata(spm_meta(SPM_PIECES))
    ids = tok.encode("h€!", add_special=False)  # € is E2 82 AC: three byte tokens
    assert [tok.token_text(i) for i in ids] == ["▁h", "<0xE2>", "<0x82>", "<0xAC>", "<0x21>"]
    dec = IncrementalDecoder(tok)
    assert [dec.add(i) for i in ids] == [" h", "", "", "€", "!"]
    assert dec.flush() == ""
    dec.add(ids[1])
    assert dec.flush() == "\ufffd"  # a dangling lead byte


# --------------------------------------------------------------------------------------------- byte-level BPE, by hand

def test_bpe_merges_by_rank_with_the_gpt2_pre_tokenizer():
    tok = Tokenizer.from_metadata(bpe_meta(BPE_MERGES))
    ids = tok.encode("hello world")
    assert [tok.token_text(i) for i in ids] == ["hello", "Ġworld"]
    assert tok.add_bos is False and tok.decode(ids) == "hello world"
    ranks = ref_impl.merge_ranks(BPE_MERGES)
    text = "hello, world's  hello\n\nworld 123 héllo"
    assert tok.encode(text) == ref_impl.bpe_encode(text, PRE_TOKENIZERS["gpt-2"].regexes, tok.vocab.token_to_id, ranks)


@pytest.mark.parametrize("pre", sorted({"default", "gpt-2", "llama-bpe", "dbrx", "starcoder", "smollm", "qwen2",
                                         "falcon"}))
def test_bpe_pre_tokenizer_splits_like_llama_cpp(pre):
    encoder = Tokenizer.from_metadata(bpe_meta(BPE_MERGES, pre=pre))._encoder
    regexes = PRE_TOKENIZERS[pre].regexes
    for text in EDGE_TEXTS + random_texts(seed=1, count=300):
        assert encoder.words(text) == ref_impl.regex_split(text, regexes), repr(text)


def test_bpe_byte_without_a_token_blocks_merges_and_vanishes():
    meta = bpe_meta(BPE_MERGES + ["! !"])
    missing = gpt2_byte_alphabet()[0x1D]  # SmolLM2's vocabulary has no token for some control bytes
    meta["tokenizer.ggml.tokens"] = [t if t != missing else "<not-the-byte>" for t in meta["tokenizer.ggml.tokens"]]
    tok = Tokenizer.from_metadata(meta)
    # "!\x1d!" is one pre-token; llama.cpp cannot merge "!" "!" across the byte, which then yields nothing
    assert [tok.token_text(i) for i in tok.encode("!\x1d! !!")] == ["!", "!", "Ġ", "!!"]


def test_bpe_merges_into_strings_that_are_no_tokens_still_apply():
    meta = bpe_meta(BPE_MERGES)
    # rank 0 "l o" makes a symbol "lo" that is no token: "hello" can then only end as he, l, and lo's bytes l, o
    meta["tokenizer.ggml.merges"] = ["l o", "x yz", "no-space"] + BPE_MERGES + ["h e"]
    tok = Tokenizer.from_metadata(meta)
    ranks = ref_impl.merge_ranks(meta["tokenizer.ggml.merges"])
    assert [tok.token_text(i) for i in tok.encode("hello")] == ["he", "l", "l", "o"]
    for text in ["hello", "yellow fellow", "xyz lol", "hello world"]:
        assert tok.encode(text) == ref_impl.bpe_encode(text, PRE_TOKENIZERS["gpt-2"].regexes, tok.vocab.token_to_id,
                                                        ranks)


def test_bpe_clean_spaces_on_decode_only_where_llama_cpp_does():
    text = "a , b . it 's c ' d"
    gpt2 = Tokenizer.from_metadata(bpe_meta(BPE_MERGES, pre="gpt-2"))
    assert gpt2.decode(gpt2.encode(text)) == "a, b. it's c'd"
    qwen = Tokenizer.from_metadata(bpe_meta(BPE_MERGES, pre="qwen2"))
    assert qwen.decode(qwen.encode(text)) == text


def test_clean_spaces_passes():
    assert clean_spaces(b" ?a !b .c ,d") == b"?a!b.c,d"
    assert clean_spaces(b"x ' y ' ' z") == b"x'y'' z"
    assert clean_spaces(b"it 's I 'm we 're you 've don 't I 'd") == b"it's I'm we're you've don 't I 'd"


def test_bpe_special_tokens_render_and_end_generation():
    specials = [("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL), ("<|endoftext|>", CONTROL),
                ("<tool>", USER_DEFINED), ("<|fim_pad|>", CONTROL)]
    eos = 256 + len(BPE_MERGES) + 2  # <|endoftext|>
    tok = Tokenizer.from_metadata(bpe_meta(BPE_MERGES, extra_tokens=specials, **{"tokenizer.ggml.eos_token_id": eos}))
    start, end, eot, tool, fim_pad = (tok.token_to_id(t) for t in
                                      ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool>", "<|fim_pad|>"))
    assert tok.eos_id == eot and tok.eog_ids == {end, eot, fim_pad}
    ids = tok.encode("<|im_start|>hello<tool><|im_end|>", parse_special=True)
    assert ids[0] == start and ids[-2:] == [tool, end]
    assert tok.decode(ids) == "hello<tool>"  # control tokens render as nothing, user-defined as their text
    assert tok.decode(ids, special=True) == "<|im_start|>hello<tool><|im_end|>"
    assert start not in tok.encode("<|im_start|>hello")  # without parse_special it is plain text


def test_bpe_pre_tokenizer_names():
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre"):
        Tokenizer.from_metadata(bpe_meta(BPE_MERGES, pre="no-such-pre"))
    meta = bpe_meta(BPE_MERGES)
    del meta["tokenizer.ggml.pre"]
    with pytest.warns(UserWarning, match="default"):
        tok = Tokenizer.from_metadata(meta)
    assert tok.vocab.pre == "default"
    assert Tokenizer.from_metadata(bpe_meta(BPE_MERGES, pre="llama-bpe", **{
        "tokenizer.ggml.bos_token_id": 0})).add_bos is True  # llama3 adds BOS unless the key says otherwise


# --------------------------------------------------------------------------------------------- metadata errors

@pytest.mark.parametrize("change, key", [
    (lambda m: m.pop("tokenizer.ggml.model"), "tokenizer.ggml.model"),
    (lambda m: m.update({"tokenizer.ggml.model": "bert"}), "tokenizer.ggml.model"),
    (lambda m: m.pop("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens"),
    (lambda m: m.update({"tokenizer.ggml.tokens": m["tokenizer.ggml.tokens"] + ["h"]}), "tokenizer.ggml.tokens"),
    (lambda m: m.update({"tokenizer.ggml.scores": np.zeros(3, np.float32)}), "tokenizer.ggml.scores"),
    (lambda m: m.update({"tokenizer.ggml.token_type": ["x"] * 300}), "tokenizer.ggml.token_type"),
    (lambda m: m.update({"tokenizer.ggml.bos_token_id": "1"}), "tokenizer.ggml.bos_token_id"),
    # outside the vocabulary: llama.cpp warns and keeps the default id; refused here
    (lambda m: m.update({"tokenizer.ggml.bos_token_id": 10 ** 6}), "tokenizer.ggml.bos_token_id"),
    (lambda m: m.update({"tokenizer.ggml.eot_token_id": -1}), "tokenizer.ggml.eot_token_id"),
    (lambda m: m.update({"tokenizer.ggml.add_bos_token": "yes"}), "tokenizer.ggml.add_bos_token"),
])
def test_bad_spm_metadata_names_the_key(change, key):
    meta = spm_meta(SPM_PIECES)
    change(meta)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_metadata(meta)
    assert str(e.value).startswith(key) and e.value.key == key


def test_bad_bpe_metadata_names_the_key():
    meta = bpe_meta(BPE_MERGES)
    del meta["tokenizer.ggml.merges"]
    with pytest.raises(TokenizerError, match="^tokenizer.ggml.merges"):
        Tokenizer.from_metadata(meta)
    # BPE's default BOS id (11) exists here, but asking for BOS without one in range fails
    tiny = bpe_meta([], **{"tokenizer.ggml.add_bos_token": True})
    tiny["tokenizer.ggml.tokens"] = tiny["tokenizer.ggml.tokens"][:5]
    tiny["tokenizer.ggml.token_type"] = tiny["tokenizer.ggml.token_type"][:5]
    with pytest.raises(TokenizerError, match="^tokenizer.ggml.add_bos_token"):
        Tokenizer.from_metadata(tiny)


def test_partition_takes_longer_special_tokens_first_anywhere():
    # llama.cpp searches "bcd" through the whole text before "ab": not a leftmost-longest scan
    assert partition("abcdab", [("bcd", 1), ("ab", 2)]) == ["a", 1, 2]
    assert partition("x<a><a>y", [("<a>", 7)]) == ["x", 7, 7, "y"]
    assert partition("", [("<a>", 7)]) == []


# --------------------------------------------------------------------------------------------- the real models

@pytest.fixture(scope="module")
def tokenizers():
    """Catalogue name -> (Tokenizer, metadata), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            with GGUFFile(model_path(name)) as f:
                meta = f.metadata
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # none of the real files should need a fallback
                cache[name] = (Tokenizer.from_metadata(meta), meta)
        return cache[name]

    return get


def reference_encode(tok: Tokenizer, ranks, text: str, parse_special: bool) -> list[int]:
    """llama.cpp's algorithms line by line (add_special=False), for texts with no reference output; `ranks` are the
    BPE merge ranks (None for SentencePiece)."""
    v = tok.vocab
    specials = tok._specials_parse if parse_special else tok._specials_plain
    out, prev_special = [], True
    for fragment in partition(text, specials):
        if isinstance(fragment, int):
            out.append(fragment)
            prev_special = True
        elif v.model == "llama":
            fragment = (" " if v.add_space_prefix and prev_special else "") + fragment
            out += ref_impl.spm_encode(fragment.replace(" ", "▁"), v.token_to_id, v.scores)
            prev_special = False
        else:
            out += ref_impl.bpe_encode(fragment, PRE_TOKENIZERS[v.pre].regexes, v.token_to_id, ranks)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tokenization_matches_llama_cpp(tokenizers, name):
    tok, _ = tokenizers(name)
    ref = load_reference(name)
    for case in ref["tokenize"]:
        assert tok.encode(case["text"], add_special=True, parse_special=False) == case["tokens"], case["text"]
        assert tok.encode(case["text"], add_special=False, parse_special=True) == case["tokens_special"], case["text"]
    for prompt in ref["prompts"]:
        assert tok.encode(prompt["text"]) == prompt["tokens"], prompt["text"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_building_is_fast(tokenizers, name):
    _, meta = tokenizers(name)
    start = time.perf_counter()
    Tokenizer.from_metadata(meta)
    assert time.perf_counter() - start < 2.0


EXPECTED_SPECIALS = {  # name -> (bos, eos, add_bos, end-of-generation token texts)
    "smollm2-135m-instruct": (1, 2, False, {"<|endoftext|>", "<|im_end|>", "<reponame>"}),
    # "</s>" is Gemma's HTML strikethrough tag, but llama.cpp makes every "</s>" an end-of-generation control token
    "gemma3-270m": (2, 1, True, {"<eos>", "<end_of_turn>", "</s>"}),
    "qwen2.5-coder-0.5b-instruct": (151643, 151645, False, {"<|endoftext|>", "<|im_end|>", "<|fim_pad|>",
                                                            "<|repo_name|>", "<|file_sep|>", "</s>"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_special_ids_and_end_of_generation(tokenizers, name):
    tok, _ = tokenizers(name)
    bos, eos, add_bos, eog = EXPECTED_SPECIALS[name]
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (bos, eos, add_bos, False)
    assert {tok.token_text(i) for i in tok.eog_ids} == eog
    assert all(tok.is_control(i) for i in tok.eog_ids)
    assert tok.eos_id in tok.eog_ids and tok.is_eog(tok.eos_id)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_decode_matches_llama_cpp_and_round_trips(tokenizers, name):
    tok, _ = tokenizers(name)
    ref = load_reference(name)
    for case in ref["tokenize"] + ref["prompts"]:
        assert tok.decode(tok.encode(case["text"], add_special=True)) == case["text"]
    chat = {"gemma3-270m": "<start_of_turn>user\nhi<end_of_turn>"}.get(name, "<|im_start|>user\nhi<|im_end|>")
    ids = tok.encode(chat, add_special=False, parse_special=True)
    assert tok.decode(ids, special=True) == chat
    assert tok.decode(ids) == "user\nhi"
    for prompt in ref["prompts"]:  # llama.cpp's own text of its greedy continuation
        assert tok.decode(prompt["greedy"]) == prompt["greedy_text"]


MULTIBYTE = "emoji: 🤖🚀👍🏽 家族 👨\u200d👩\u200d👧, 日本語のテキストと中文文本, Ελληνικά, हिन्दी, rare 𓀀𐌰ꙮ, ok 🙂"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_incremental_decoding_never_splits_a_character(tokenizers, name):
    tok, _ = tokenizers(name)
    ids = tok.encode(MULTIBYTE, add_special=True)
    dec = IncrementalDecoder(tok)
    pieces = [dec.add(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)
    # some token ends inside a character, and its output waits for the rest
    held = [i for i in ids if tok.token_to_bytes(i) and not dec.add(i)]
    dec.flush()
    assert held, "no token split a character: the test text is too easy for this vocabulary"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_matches_llama_cpp_algorithms_on_random_and_edge_text(tokenizers, name):
    tok, meta = tokenizers(name)
    ranks = ref_impl.merge_ranks(meta["tokenizer.ggml.merges"]) if tok.vocab.model == "gpt2" else None
    for text in EDGE_TEXTS + random_texts(seed=MODEL_NAMES.index(name), count=500):
        for parse_special in (False, True):
            expected = reference_encode(tok, ranks, text, parse_special)
            assert tok.encode(text, add_special=False, parse_special=parse_special) == expected, repr(text)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_all_token_bytes_are_each_tokens_bytes(tokenizers, name):
    """The bulk pass (prompt lookup's word classes read it) gives what token_to_bytes gives each token, computed
    apart on a fresh tokenizer (its pieces not cached yet)."""
    with GGUFFile(model_path(name)) as f:
        fresh = Tokenizer.from_metadata(f.metadata)
    tok, _ = tokenizers(name)
    assert tok.all_token_bytes() == [fresh.token_to_bytes(t) for t in range(fresh.n_vocab)]


def test_all_token_bytes_on_made_up_vocabularies():
    for meta in (spm_meta(SPM_PIECES), bpe_meta(BPE_MERGES, extra_tokens=[("<|end|>", CONTROL), ("<ud>", USER_DEFINED),
                                                                          ("a b", NORMAL), ("Ā\x7f", NORMAL)])):
        tok, fresh = Tokenizer.from_metadata(meta), Tokenizer.from_metadata(meta)
        assert tok.all_token_bytes() == [fresh.token_to_bytes(t) for t in range(fresh.n_vocab)]
