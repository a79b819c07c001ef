"""Tokenizer files between HF folders and workdirs.

Export: an HF `tokenizer.json` source is copied (with its tokenizer_config.json and
special_tokens_map.json when they sit beside it; otherwise a tokenizer_config.json naming EOS and
pad is written), so AutoTokenizer loads exactly the tokenizer we trained with. A SentencePiece
source is written as its `.model` file with a tokenizer_config.json for transformers'
SentencePiece-backed `BertGenerationTokenizer`, which calls the sentencepiece library itself and
adds no special tokens, so its ids are ours by construction (a `tokenizers` BPE rebuilt from a
SentencePiece BPE would have to reproduce its merge priorities, byte fallback, digit splitting
and user symbols, which is not exact in general).

Import: tokenizer files found in the HF folder are copied into `<workdir>/tokenizer/` and the
config's data section points at them.
"""
from __future__ import annotations

import json
import os
import shutil

from olmoe_jax.data.tokenizers import SentencePieceTokenizer, Tokenizer

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPM_FILE = "spiece.model"  # BertGenerationTokenizer's vocab file name


def _piece(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id]) if token_id >= 0 else ""


def write_tokenizer_files(cfg, tok: Tokenizer, folder: str) -> list[str]:
    """Writes the tokenizer of `cfg.data` into the HF folder; returns the names written."""
    d = cfg.data
    base = {"model_max_length": cfg.model.max_seq_len, "clean_up_tokenization_spaces": False}
    if d.tokenizer == "hf":
        src = d.tokenizer_path
        src_dir, src_file = (src, os.path.join(src, "tokenizer.json")) if os.path.isdir(src) \
            else (os.path.dirname(src), src)
        shutil.copyfile(src_file, os.path.join(folder, "tokenizer.json"))
        written = ["tokenizer.json"]
        for name in HF_FILES[1:]:
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copyfile(os.path.join(src_dir, name), os.path.join(folder, name))
                written.append(name)
        if "tokenizer_config.json" not in written:
            _dump(dict(base, tokenizer_class="PreTrainedTokenizerFast", eos_token=_piece(tok, tok.eos_id),
                       pad_token=_piece(tok, tok.pad_id)), os.path.join(folder, "tokenizer_config.json"))
            written.append("tokenizer_config.json")
        return written
    if d.tokenizer == "sentencepiece":
        inner = getattr(tok, "_inner", tok)  # data.eos_id may wrap it; the file is the same
        if not isinstance(inner, SentencePieceTokenizer):
            raise TypeError(f"expected a SentencePiece tokenizer for data.tokenizer=sentencepiece, got {tok!r}")
        import sentencepiece as spm  # pylint: disable=import-outside-toplevel
        proto = inner._proto  # pylint: disable=protected-access  (the data layer exposes no accessor)
        with open(os.path.join(folder, SPM_FILE), "wb") as f:
            f.write(proto)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        special = {"eos_token": _id_piece(sp, tok.eos_id), "pad_token": _id_piece(sp, tok.pad_id),
                   "unk_token": _id_piece(sp, sp.unk_id()), "bos_token": None, "sep_token": None}
        _dump(dict(base, tokenizer_class="BertGenerationTokenizer", **special),
              os.path.join(folder, "tokenizer_config.json"))
        return [SPM_FILE, "tokenizer_config.json"]
    return []  # data.tokenizer=none: the data were token ids; there is no text side to export


def _id_piece(sp, token_id: int):
    return sp.id_to_piece(token_id) if token_id >= 0 else None


def copy_hf_tokenizer(hf_folder: str, workdir: str, cfg) -> str | None:
    """Copies the HF folder's tokenizer into <workdir>/tokenizer and points cfg.data at it.

    Returns a note of what was done, or None when the folder has no tokenizer files.
    """
    dest = os.path.join(os.path.abspath(workdir), "tokenizer")
    if os.path.isfile(os.path.join(hf_folder, "tokenizer.json")):
        os.makedirs(dest, exist_ok=True)
        for name in HF_FILES:
            if os.path.isfile(os.path.join(hf_folder, name)):
                shutil.copyfile(os.path.join(hf_folder, name), os.path.join(dest, name))
        cfg.data.update(tokenizer="hf", tokenizer_path=dest)
        return f"tokenizer.json copied to {dest}"
    for name in (SPM_FILE, "tokenizer.model"):
        if os.path.isfile(os.path.join(hf_folder, name)):
            os.makedirs(dest, exist_ok=True)
            shutil.copyfile(os.path.join(hf_folder, name), os.path.join(dest, "tokenizer.model"))
            cfg.data.update(tokenizer="sentencepiece", tokenizer_path=os.path.join(dest, "tokenizer.model"))
            return f"SentencePiece {name} copied to {dest}"
    return None


def has_tokenizer(hf_folder: str) -> bool:
    return any(os.path.isfile(os.path.join(hf_folder, n)) for n in ("tokenizer.json", SPM_FILE, "tokenizer.model"))


def _dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
