"""The tokenizer a GGUF file describes, encoding and decoding exactly as llama.cpp does (src/llama-vocab.cpp).

encode: split the text on special tokens (special.partition), tokenize each raw fragment with the model's own
algorithm (spm.SpmEncoder or bpe.BpeEncoder), add BOS/EOS by the file's rules. decode: concatenate token pieces
(detok), then llama.cpp's leading-space and clean-up rules.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from edgeinfer.tokenizer.bpe import BpeEncoder, pre_tokenizer_for
from edgeinfer.tokenizer.detok import PieceTable, clean_spaces
from edgeinfer.tokenizer.special import partition
from edgeinfer.tokenizer.spm import SpmEncoder
from edgeinfer.tokenizer.vocab import K_MERGES, K_MODEL, K_PRE, Attr, Vocab, fail, load_vocab

# llama.cpp's per-model defaults, before the file's own keys
_SPM_DEFAULTS = dict(add_bos=True, add_eos=False, add_space_prefix=True, ids=dict(bos=1, eos=2, unk=0))
_BPE_DEFAULTS = dict(add_bos=False, add_eos=False, add_space_prefix=False, ids=dict(bos=11, eos=11))


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary ("llama" = SentencePiece, "gpt2" = byte-level BPE)."""

    def __init__(self, vocab: Vocab, encoder, clean_spaces: bool):
        self.vocab = vocab
        self._encoder = encoder
        self._spm = vocab.model == "llama"
        self._clean_spaces = clean_spaces
        self._pieces = PieceTable(vocab, byte_level=not self._spm)
        all_special = [(vocab.tokens[i], i) for i in vocab.special_ids]
        self._specials_parse = all_special
        skip = Attr.CONTROL | Attr.UNKNOWN  # without parse_special only user-defined tokens are split out
        self._specials_plain = [(t, i) for t, i in all_special if not int(vocab.attrs[i]) & skip]

    @classmethod
    def from_metadata(cls, meta: Mapping) -> "Tokenizer":
        """Builds the tokenizer from GGUF metadata (key -> value as the GGUF reader returns it).

        Raises TokenizerError naming the offending key when the metadata is missing, malformed or unsupported."""
        model = meta.get(K_MODEL)
        if model is None:
            raise fail(K_MODEL, "missing: the file has no tokenizer")
        if model == "llama":
            vocab = load_vocab(meta, "llama", "default", _SPM_DEFAULTS)
            return cls(vocab, SpmEncoder(vocab), clean_spaces=False)
        if model == "gpt2":
            pre_name, pre = pre_tokenizer_for(meta.get(K_PRE))
            vocab = load_vocab(meta, "gpt2", pre_name, dict(_BPE_DEFAULTS, add_bos=pre.add_bos))
            return cls(vocab, BpeEncoder(vocab, pre, meta.get(K_MERGES)), clean_spaces=pre.clean_spaces)
        raise fail(K_MODEL, f"unsupported tokenizer model {model!r} (supported: 'llama', 'gpt2')")

    # ------------------------------------------------------------------ vocabulary facts

    @property
    def n_vocab(self) -> int:
        return self.vocab.n_vocab

    @property
    def bos_id(self) -> int | None:
        return self.vocab.ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self.vocab.ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self.vocab.ids["eot"]

    @property
    def eog_ids(self) -> frozenset[int]:
        """End-of-generation ids: eos, eot, eom, FIM pad/repo/sep, and control tokens such as <|im_end|>."""
        return self.vocab.eog_ids

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    @property
    def add_eos(self) -> bool:
        return self.vocab.add_eos

    @property
    def add_space_prefix(self) -> bool:
        return self.vocab.add_space_prefix

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.vocab.eog_ids

    def token_text(self, token_id: int) -> str:
        """The raw vocabulary string of `token_id` (e.g. '▁the', 'Ġthe', '<0x0A>', '<|im_end|>')."""
        return self.vocab.tokens[token_id]

    def is_control(self, token_id: int) -> bool:
        return self.vocab.has(token_id, Attr.CONTROL)

    def token_to_id(self, text: str) -> int | None:
        """The id whose raw vocabulary string is `text`, if any."""
        return self.vocab.token_to_id.get(text)

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text` as llama_tokenize(text, add_special, parse_special) gives them.

        add_special adds BOS/EOS where the file asks for them (tokenizer.ggml.add_bos_token / add_eos_token);
        parse_special turns the text of control tokens (e.g. "<|im_start|>") into those tokens; user-defined tokens
        are always recognised."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates have no UTF-8 form: U+FFFD, as for any invalid input
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        vocab = self.vocab
        out: list[int] = []
        if add_special and vocab.add_bos:
            out.append(vocab.ids["bos"])
        prev_special = True  # SPM: a fragment at the start or after a special token gets the space prefix
        for fragment in partition(text, self._specials_parse if parse_special else self._specials_plain):
            if isinstance(fragment, int):
                out.append(fragment)
                prev_special = True
            elif self._spm:
                if vocab.add_space_prefix and prev_special:
                    fragment = " " + fragment
                out.extend(self._encoder.encode(fragment.replace(" ", "▁")))
                prev_special = False
            else:
                out.extend(self._encoder.encode(fragment))
        if add_special and vocab.add_eos:
            out.append(vocab.ids["eos"])
        return out

    # ------------------------------------------------------------------ decoding

    def token_to_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes token `token_id` stands for (llama.cpp's token_to_piece); control tokens give b"" unless
        `special`. A piece may be part of a UTF-8 character (byte tokens, byte-level BPE)."""
        if not 0 <= token_id < self.vocab.n_vocab:
            raise IndexError(f"token id {token_id} outside the vocabulary of {self.vocab.n_vocab}")
        return self._pieces.piece(token_id, special)

    def all_token_bytes(self) -> list[bytes]:
        """token_to_bytes of every token id, in order (special=False), in one pass over the vocabulary."""
        return self._pieces.all_pieces()

    def decode_bytes(self, tokens: Iterable[int], special: bool = False) -> bytes:
        """llama_detokenize(tokens, remove_special=False, unparse_special=special) as bytes."""
        out = bytearray()
        remove_space = self.vocab.add_space_prefix  # the first piece loses one leading space
        for token_id in tokens:
            piece = self.token_to_bytes(int(token_id), special)
            if remove_space and piece[:1] == b" ":
                piece = piece[1:]
            remove_space = False
            out += piece
        return clean_spaces(bytes(out)) if self._clean_spaces else bytes(out)

    def decode(self, tokens: Iterable[int], special: bool = False) -> str:
        """Text of `tokens` (as llama.cpp's common_detokenize); invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(tokens, special).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.vocab.model!r}, pre={self.vocab.pre!r}, n_vocab={self.n_vocab}, "
                f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})")
