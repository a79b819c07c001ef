"""Tokenizers: exact round trips, the real OLMoE ids, the vocabulary-size check."""
import os
import shutil

import pytest

from olmoe_jax.data import DataError, corpus, make_tokenizer
from olmoe_jax.data.tokenizers import HFTokenizer, PreTokenized

OLMOE_TEXT = "Hello world! OLMoE is a Mixture-of-Experts model."
OLMOE_IDS = [12092, 1533, 2, 42587, 15155, 38, 310, 247, 9823, 6638, 14, 1171, 14, 18139, 1641,
             1566, 15]


def test_sentencepiece_round_trips_corpus_text_exactly(builtin_cfg, spm_tokenizer):
    tok = spm_tokenizer
    assert tok.vocab_size == builtin_cfg.model.vocab_size
    assert len({tok.eos_id, tok.pad_id}) == 2
    by_domain = {}
    for domain, text in corpus.read_split(builtin_cfg.data.data_dir, "validation"):
        by_domain.setdefault(domain, []).append(text)
    assert set(by_domain) == set(corpus.DOMAINS)
    for domain, texts in by_domain.items():
        for text, ids in zip(texts[:5], tok.encode_batch(texts[:5])):
            assert ids == tok.encode(text)
            assert tok.decode(ids) == text, domain  # indentation, newlines, digits all kept
            assert tok.eos_id not in ids and tok.pad_id not in ids
    odd = "  leading spaces\n\ttab é ü 中文 🙂\n\n  trailing  "
    assert tok.decode(tok.encode(odd)) == odd  # byte fallback: no <unk>, nothing lost
    # compression: a trained vocabulary, not a byte-level one
    text = "\n".join(by_domain["prose"])
    assert len(tok.encode(text)) < len(text.encode()) / 2.5


def test_sentencepiece_is_cached_per_vocab_size(builtin_cfg, spm_tokenizer):
    folder = os.path.join(builtin_cfg.data.data_dir, "tokenizers")
    (name,) = os.listdir(folder)
    assert str(builtin_cfg.model.vocab_size) in name and corpus.VERSION in name
    mtime = os.path.getmtime(os.path.join(folder, name))
    again = make_tokenizer(builtin_cfg)  # loads, does not retrain
    assert again.fingerprint == spm_tokenizer.fingerprint
    assert os.path.getmtime(os.path.join(folder, name)) == mtime


def test_hf_tokenizer_gives_the_olmoe_ids(hf_tokenizer_path, tmp_path, helpers):
    tok = HFTokenizer(hf_tokenizer_path)
    assert tok.encode(OLMOE_TEXT) == OLMOE_IDS
    assert tok.decode(OLMOE_IDS) == OLMOE_TEXT
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (50280, 50279, 1)
    assert tok.encode_batch([OLMOE_TEXT, "x"])[0] == OLMOE_IDS
    # a folder holding tokenizer.json works the same, through make_tokenizer
    shutil.copy(hf_tokenizer_path, tmp_path / "tokenizer.json")
    cfg = helpers.small_config(str(tmp_path), tokenizer="hf", tokenizer_path=str(tmp_path))
    cfg.model.vocab_size = 50304
    tok2 = make_tokenizer(cfg)
    assert tok2.encode(OLMOE_TEXT) == OLMOE_IDS and tok2.eos_id == 50279


def test_hf_vocabulary_larger_than_the_model_is_refused(hf_tokenizer_path, tmp_path, helpers):
    cfg = helpers.small_config(str(tmp_path), tokenizer="hf", tokenizer_path=hf_tokenizer_path)
    cfg.model.vocab_size = 32000
    with pytest.raises(DataError,
                       match=r"50280 ids but model.vocab_size=32000.*raise model.vocab_size"):
        make_tokenizer(cfg)


def test_hf_eos_from_tokenizer_config_when_there_is_no_endoftext(hf_tokenizer_path, tmp_path):
    import json
    spec = json.loads(open(hf_tokenizer_path).read())
    for entry in spec["added_tokens"]:
        if entry["content"] == "<|endoftext|>":
            entry["content"] = "<|stop|>"
    spec["model"]["vocab"].pop("<|endoftext|>", None)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="no EOS token.*set data.eos_id"):
        HFTokenizer(str(tmp_path))
    config = {"eos_token": {"content": "<|stop|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert HFTokenizer(str(tmp_path)).eos_id == 50279


def test_missing_hf_tokenizer_is_a_data_error(tmp_path, helpers):
    cfg = helpers.small_config(str(tmp_path), tokenizer="hf", tokenizer_path=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="nope.*no tokenizer.json"):
        make_tokenizer(cfg)


def test_none_tokenizer_takes_eos_from_config(tmp_path, helpers):
    cfg = helpers.small_config(str(tmp_path), tokenizer="none", source="npy")
    with pytest.raises(DataError, match="data.eos_id"):
        make_tokenizer(cfg)
    cfg.data.eos_id = 7
    tok = make_tokenizer(cfg)
    assert isinstance(tok, PreTokenized) and tok.eos_id == 7 and tok.vocab_size == 2048
    with pytest.raises(DataError, match="cannot encode text"):
        tok.encode("hi")


def test_eos_override_changes_the_fingerprint(builtin_cfg, spm_tokenizer):
    cfg = builtin_cfg.copy_and_resolve_references()
    cfg.data.eos_id = 5
    tok = make_tokenizer(cfg)
    assert tok.eos_id == 5 and tok.fingerprint != spm_tokenizer.fingerprint
    assert tok.inner.model_proto == spm_tokenizer.model_proto
    assert tok.encode("def f(x):\n") == spm_tokenizer.encode("def f(x):\n")
