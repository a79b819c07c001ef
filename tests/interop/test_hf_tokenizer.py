"""Exported tokenizer files load in transformers and give our ids and text back."""

import glob
import os

import pytest

from olmoe_jax.config import default_config
from olmoe_jax.data.tokenizers import HFTokenizer, SentencePieceTokenizer, train_sentencepiece
from olmoe_jax.interop.hf_tokenizer import write_tokenizer_files

transformers = pytest.importorskip("transformers")
EDGE_CASES = [
    "naïve café — 日本語 😀 \u0301",
    "  two leading",
    "trailing   ",
    "a    b\t\tc",
    " ",
    "x\n\n\ny",
    "\t\tindented\n    code = 12345 + 678",
    "ÀÉÎõü" * 3,
    "tab\there",
    "emoji🙂🙃 mix",
]


def _stdlib_chunks(start, stop):
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[start:stop]
    return [c for f in files for c in open(f, errors="ignore").read().split("\n\n") if c]


def _check(ours, folder, texts):
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf.eos_token_id == ours.eos_id
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text[:60])
        assert hf.decode(ids) == ours.decode(ids) == text, repr(text[:60])


def test_sentencepiece_converts_exactly(tmp_path):
    proto = train_sentencepiece(_stdlib_chunks(0, 50), 700)
    ours = SentencePieceTokenizer(proto)
    cfg = default_config()
    cfg.data.tokenizer = "sentencepiece"
    assert write_tokenizer_files(cfg, ours, str(tmp_path)) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    held_out = _stdlib_chunks(50, 90)
    assert len(held_out) > 2000
    _check(ours, tmp_path, held_out + EDGE_CASES)


def test_hf_tokenizer_json_is_copied(tmp_path, hf_tokenizer_path):
    cfg = default_config()
    cfg.data.update(tokenizer="hf", tokenizer_path=hf_tokenizer_path)
    ours = HFTokenizer(hf_tokenizer_path)
    written = write_tokenizer_files(cfg, ours, str(tmp_path))
    assert "tokenizer.json" in written and "tokenizer_config.json" in written
    _check(ours, tmp_path, _stdlib_chunks(0, 5) + EDGE_CASES)


def test_sentencepiece_with_configured_eos(tmp_path):
    """data.eos_id replaces the SentencePiece EOS: the exported tokenizer names that piece."""
    from olmoe_jax.data.tokenizers import make_tokenizer

    (tmp_path / "spm.model").write_bytes(train_sentencepiece(_stdlib_chunks(0, 10), 400))
    cfg = default_config()
    cfg.model.vocab_size = 400
    cfg.data.update(tokenizer="sentencepiece", tokenizer_path=str(tmp_path / "spm.model"), eos_id=5)
    ours = make_tokenizer(cfg)
    (tmp_path / "out").mkdir()
    write_tokenizer_files(cfg, ours, str(tmp_path / "out"))
    _check(ours, tmp_path / "out", _stdlib_chunks(10, 12))
