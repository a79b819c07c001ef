"""Tokenizer files between HF folders and workdirs.

Export: an HF `tokenizer.json` source is copied (with its tokenizer_config.json and
special_tokens_map.json when they sit beside it; otherwise a tokenizer_config.json naming EOS and
pad is written), so AutoTokenizer loads exactly the tokenizer we trained with. A SentencePiece
BPE source (ours: identity normalisation, no dummy prefix, byte fallback) is rebuilt as a
`tokenizers` BPE in a tokenizer.json:
- vocab: every piece at its id; merges: every split a+b of a normal piece p into two normal
  pieces, ordered by p's score. SentencePiece BPE merges the adjacent pair whose result scores
  highest, so ranking merges by that score makes HF's lowest-rank-first loop pick the same pairs;
- normaliser " " -> U+2581; words as SentencePiece splits them (a new word at a U+2581 that does
  not continue a run of them, with allow_whitespace_only_pieces); byte fallback for unknown
  characters; user-defined pieces ("\n", "\t") as added tokens, matched before BPE as
  SentencePiece does; decoder U+2581 -> " ", bytes fused.
The test checks ids and decoded text against sentencepiece on thousands of held-out texts. One
known difference, HF's convention: a control piece written literally in the text (e.g. the string
"<|endoftext|>") becomes that special token in HF, while SentencePiece spells it out.

Import: tokenizer files found in the HF folder are checked against the config (vocabulary within
model.vocab_size), then copied into `<workdir>/tokenizer/`, and the config's data section points
at them.
"""

from __future__ import annotations

import copy
import os
import shutil

from olmoe_jax.data.tokenizers import SentencePieceTokenizer, Tokenizer, WithEos, make_tokenizer
from olmoe_jax.interop.hf_export import write_json

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _piece(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id]) if token_id >= 0 else ""


def _write_config(cfg, folder: str, eos_token, pad_token) -> None:
    """tokenizer_config.json naming EOS and pad, for a tokenizer.json written without one."""
    write_json(
        {
            "model_max_length": cfg.model.max_seq_len,
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos_token,
            "pad_token": pad_token,
        },
        os.path.join(folder, "tokenizer_config.json"),
    )


def write_tokenizer_files(cfg, tok: Tokenizer, folder: str) -> list[str]:
    """Writes the tokenizer of `cfg.data` into the HF folder; returns the names written."""
    d = cfg.data
    if d.tokenizer == "hf":
        src = d.tokenizer_path
        src_dir, src_file = (
            (src, os.path.join(src, "tokenizer.json"))
            if os.path.isdir(src)
            else (os.path.dirname(src), src)
        )
        shutil.copyfile(src_file, os.path.join(folder, "tokenizer.json"))
        written = ["tokenizer.json"]
        for name in HF_FILES[1:]:
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copyfile(os.path.join(src_dir, name), os.path.join(folder, name))
                written.append(name)
        if "tokenizer_config.json" not in written:
            _write_config(cfg, folder, _piece(tok, tok.eos_id), _piece(tok, tok.pad_id))
            written.append("tokenizer_config.json")
        return written
    if d.tokenizer == "sentencepiece":
        inner = tok.inner if isinstance(tok, WithEos) else tok  # data.eos_id: same vocabulary
        if not isinstance(inner, SentencePieceTokenizer):
            raise TypeError(
                f"expected a SentencePiece tokenizer for data.tokenizer=sentencepiece, got {tok!r}"
            )
        proto = inner.model_proto
        spm_to_hf(proto).save(os.path.join(folder, "tokenizer.json"))
        _write_config(cfg, folder, _id_piece(proto, tok.eos_id), _id_piece(proto, tok.pad_id))
        return ["tokenizer.json", "tokenizer_config.json"]
    return []  # data.tokenizer=none: the data were token ids; there is no text side to export


def _model_proto(proto: bytes):
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(proto)
    return m


def _id_piece(proto: bytes, token_id: int):
    return _model_proto(proto).pieces[token_id].piece if token_id >= 0 else None


def spm_to_hf(proto: bytes):
    """A `tokenizers.Tokenizer` computing the same ids as the SentencePiece BPE model `proto`."""
    # pylint: disable=import-outside-toplevel
    from sentencepiece.sentencepiece_model_pb2 import ModelProto
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    m, kind = _model_proto(proto), ModelProto.SentencePiece
    norm = m.normalizer_spec
    if (
        m.trainer_spec.model_type != m.trainer_spec.BPE
        or norm.name != "identity"
        or norm.add_dummy_prefix
        or norm.remove_extra_whitespaces
        or not norm.escape_whitespaces
        or m.trainer_spec.treat_whitespace_as_suffix
    ):
        raise ValueError(
            "only SentencePiece BPE models with identity normalisation, no dummy prefix and "
            "escaped whitespace (as olmoe_jax trains them) convert exactly to tokenizer.json"
        )
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    normal = {p.piece for p in m.pieces if p.type == kind.NORMAL}
    merges = sorted(
        (-p.score, vocab[p.piece], p.piece[:cut], p.piece[cut:])
        for p in m.pieces
        if p.type == kind.NORMAL
        for cut in range(1, len(p.piece))
        if p.piece[:cut] in normal and p.piece[cut:] in normal
    )
    unk = next(p.piece for p in m.pieces if p.type == kind.UNKNOWN)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for *_, a, b in merges],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=m.trainer_spec.byte_fallback,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    words = (
        "\u2581*[^\u2581]+|\u2581+"
        if m.trainer_spec.allow_whitespace_only_pieces
        else "\u2581?[^\u2581]+|\u2581"
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(words), behavior="isolated")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_tokens(
        [
            AddedToken(p.piece, normalized=False, special=False)
            for p in m.pieces
            if p.type == kind.USER_DEFINED
        ]
    )
    tok.add_special_tokens(
        [
            AddedToken(p.piece, normalized=False, special=True)
            for p in m.pieces
            if p.type in (kind.CONTROL, kind.UNKNOWN)
        ]
    )
    return tok


def _find_hf_tokenizer(hf_folder: str):
    """(kind, [(source file, name in <workdir>/tokenizer)], path to load) or None."""
    if os.path.isfile(os.path.join(hf_folder, "tokenizer.json")):
        files = [(os.path.join(hf_folder, n), n) for n in HF_FILES if os.path.isfile(os.path.join(hf_folder, n))]
        return "hf", files, hf_folder
    for name in ("tokenizer.model", "spiece.model"):
        src = os.path.join(hf_folder, name)
        if os.path.isfile(src):
            return "sentencepiece", [(src, "tokenizer.model")], src
    return None


def copy_hf_tokenizer(hf_folder: str, workdir: str, cfg) -> str | None:
    """Copies the HF folder's tokenizer into <workdir>/tokenizer and points cfg.data at it.

    The tokenizer is loaded and checked against cfg (ids within model.vocab_size, the EOS id)
    first: a DataError names the mismatch and nothing is written. Returns a note of what was
    done, or None when the folder has no tokenizer files.
    """
    found = _find_hf_tokenizer(hf_folder)
    if found is None:
        return None
    kind, files, load_from = found
    probe = copy.deepcopy(cfg)
    probe.data.update(tokenizer=kind, tokenizer_path=load_from)
    make_tokenizer(probe)
    dest = os.path.join(os.path.abspath(workdir), "tokenizer")
    os.makedirs(dest, exist_ok=True)
    for src, name in files:
        shutil.copyfile(src, os.path.join(dest, name))
    path = dest if kind == "hf" else os.path.join(dest, "tokenizer.model")
    cfg.data.update(tokenizer=kind, tokenizer_path=path)
    return f"{os.path.basename(files[0][0])} copied to {dest}"

