"""Tokenizers behind one small interface: SentencePiece (trained on the built-in corpus,
cached), Hugging Face `tokenizer.json` (e.g. OLMoE's GPT-NeoX BPE), and `none` for data
that is already token ids.

`make_tokenizer(cfg)` picks one by `data.tokenizer` and checks that its ids fit the
model's embedding (`model.vocab_size`).
"""
from __future__ import annotations

import abc
import hashlib
import io
import json
import os
from typing import Sequence

from olmoe_jax.data.errors import DataError
from olmoe_jax.io import atomic_write_bytes, default_data_dir, file_lock


class Tokenizer(abc.ABC):
    """Text <-> token ids. `vocab_size` is one more than the largest id it can produce."""

    vocab_size: int
    eos_id: int  # appended after every document
    pad_id: int  # fills rows that run out of text (eval only); its targets are masked

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Short id of the vocabulary (and EOS), naming token caches made with it."""


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; the ones trained here keep whitespace and newlines exactly
    (identity normalisation, byte fallback), so decode(encode(text)) == text."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise DataError("the SentencePiece model has no EOS piece; retrain it with eos_id set, "
                            "or set data.eos_id")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (what a .model file holds)."""
        return self._proto

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=min(2, os.cpu_count() or 1))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def fingerprint(self) -> str:
        return f"spm{self.vocab_size}-{_digest(self._proto)}"


def train_sentencepiece(texts: Sequence[str], vocab_size: int) -> bytes:
    """A BPE model of exactly `vocab_size` pieces; ids 0 <pad>, 1 <unk>, 2 <|endoftext|>, no BOS.

    Identity normalisation and no extra-whitespace removal keep code indentation; "\\n" and
    "\\t" are pieces of their own; digits are split so numbers are spelled digit by digit
    (the arithmetic domain stays learnable); byte fallback means no text is ever <unk>.
    About 2 s for 8k pieces on the 7.8 MB train split.
    """
    import sentencepiece as spm
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, split_digits=True,
            allow_whitespace_only_pieces=True, user_defined_symbols=["\n", "\t"],
            character_coverage=1.0, max_sentence_length=1 << 20,
            pad_id=0, unk_id=1, eos_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="<|endoftext|>",
            num_threads=min(2, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
        raise DataError(
            f"training a SentencePiece vocabulary of model.vocab_size={vocab_size} failed ({e}); "
            "use a smaller model.vocab_size, or data.tokenizer=hf with data.tokenizer_path") from e
    return model.getvalue()


def builtin_sentencepiece_path(vocab_size: int, data_dir: str = "") -> str:
    """Where builtin_sentencepiece caches its model (the file may not exist yet)."""
    from olmoe_jax.data import corpus  # pylint: disable=import-outside-toplevel  (TFDS: builtin only)
    return os.path.join(default_data_dir(data_dir), "tokenizers",
                        f"spm-{corpus.VERSION}-{corpus.python_tag()}-{vocab_size}.model")


def builtin_sentencepiece(vocab_size: int, data_dir: str = "") -> SentencePieceTokenizer:
    """The SentencePiece model of the built-in corpus's train split, trained once and cached
    at builtin_sentencepiece_path(vocab_size, data_dir)."""
    path = builtin_sentencepiece_path(vocab_size, data_dir)
    data_dir = default_data_dir(data_dir)
    from olmoe_jax.data import corpus  # pylint: disable=import-outside-toplevel  (TFDS: builtin only)
    if not os.path.exists(path):
        with file_lock(data_dir, "tokenizer"):
            if not os.path.exists(path):
                texts = [text for _, text in corpus.read_split(data_dir, "train")]
                atomic_write_bytes(path, train_sentencepiece(texts, vocab_size))
    with open(path, "rb") as f:
        return SentencePieceTokenizer(f.read())


_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
_PAD_NAMES = ("<|padding|>", "<pad>", "[PAD]")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` file. EOS: `<|endoftext|>` if the vocabulary has it, else
    `eos_token` of a tokenizer_config.json beside the file, else another usual EOS name."""

    def __init__(self, path: str):
        import tokenizers
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise DataError(f"data.tokenizer_path={path!r}: no tokenizer.json there; point it at a "
                            "Hugging Face tokenizer.json or the folder holding one")
        try:
            self._tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the tokenizers package raises bare Exception on bad files
            raise DataError(f"data.tokenizer_path: cannot read {file} as a tokenizer.json "
                            f"({e})") from e
        with open(file, "rb") as f:
            self._digest = _digest(f.read())
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        config = _tokenizer_config(os.path.dirname(file))
        eos_names = ("<|endoftext|>", _token_name(config.get("eos_token"))) + _EOS_NAMES
        eos = next((vocab[n] for n in eos_names if n in vocab), None)
        if eos is None:
            raise DataError(f"{file} has no EOS token ({', '.join(_EOS_NAMES)}) and no "
                            "tokenizer_config.json eos_token beside it; set data.eos_id")
        self.eos_id = eos
        pad_names = (_token_name(config.get("pad_token")),) + _PAD_NAMES
        self.pad_id = next((vocab[n] for n in pad_names if n in vocab), eos)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        return f"hf{self.vocab_size}-{self._digest}"


def _tokenizer_config(folder: str) -> dict:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_name(entry) -> str:
    # tokenizer_config.json writes a special token as a string or as {"content": ...}.
    return entry.get("content", "") if isinstance(entry, dict) else (entry or "")


class PreTokenized(Tokenizer):
    """For token-id data (`data.tokenizer=none`): no text side, only the ids that matter."""

    def __init__(self, vocab_size: int, eos_id: int, pad_id: int | None = None):
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id

    def encode(self, text: str) -> list[int]:
        raise DataError("data.tokenizer=none cannot encode text; the data must be token ids "
                        "(data.source=npy), or set data.tokenizer to sentencepiece or hf")

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def fingerprint(self) -> str:
        return f"ids{self.vocab_size}-eos{self.eos_id}"


class WithEos(Tokenizer):
    """Another tokenizer with `data.eos_id` as its EOS."""

    def __init__(self, inner: Tokenizer, eos_id: int):
        self._inner, self.eos_id = inner, eos_id
        self.vocab_size, self.pad_id = inner.vocab_size, inner.pad_id

    @property
    def inner(self) -> Tokenizer:
        """The tokenizer whose EOS was replaced (its files are the vocabulary's files)."""
        return self._inner

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._inner.encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self._inner.decode(ids)

    @property
    def fingerprint(self) -> str:
        return f"{self._inner.fingerprint}-eos{self.eos_id}"


def make_tokenizer(cfg) -> Tokenizer:
    """The tokenizer `cfg.data` names, checked against `cfg.model.vocab_size`.

    sentencepiece: `data.tokenizer_path` (a .model file) or, if empty, one of
    `model.vocab_size` pieces trained on the built-in corpus (cached; about 3 s the first time).
    """
    d, vocab = cfg.data, cfg.model.vocab_size
    if d.tokenizer == "sentencepiece":
        if d.tokenizer_path:
            if not os.path.isfile(d.tokenizer_path):
                raise DataError(f"data.tokenizer_path={d.tokenizer_path!r} is not a file; give a "
                                "SentencePiece .model file, or leave it empty to train one")
            with open(d.tokenizer_path, "rb") as f:
                tok: Tokenizer = SentencePieceTokenizer(f.read())
        else:
            tok = builtin_sentencepiece(vocab, d.data_dir)
    elif d.tokenizer == "hf":
        if not d.tokenizer_path:
            raise DataError("data.tokenizer=hf needs data.tokenizer_path "
                            "(a folder or tokenizer.json)")
        tok = HFTokenizer(d.tokenizer_path)
    elif d.tokenizer == "none":
        if d.eos_id < 0:
            raise DataError("data.tokenizer=none needs data.eos_id, the EOS id the data was "
                            "written with (50279 for OLMoE-Mix)")
        tok = PreTokenized(vocab, d.eos_id)
    else:
        raise DataError(f"data.tokenizer={d.tokenizer!r} is not one of sentencepiece, hf, none")
    if d.eos_id >= 0 and d.eos_id != tok.eos_id:
        tok = WithEos(tok, d.eos_id)
    if tok.vocab_size > vocab:
        raise DataError(
            f"the tokenizer has {tok.vocab_size} ids but model.vocab_size={vocab}; raise "
            f"model.vocab_size to at least {tok.vocab_size} or change data.tokenizer_path")
    if not 0 <= tok.eos_id < vocab:
        raise DataError(f"data.eos_id / the tokenizer's EOS id {tok.eos_id} is outside "
                        f"model.vocab_size={vocab}")
    return tok
