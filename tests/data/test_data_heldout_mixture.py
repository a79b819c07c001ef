"""Held-out evaluation files (data.eval_path), named npy domains, and mixture weights (data.mixture)."""
import numpy as np
import pytest

from olmoe_jax.config import ConfigError, validate
from olmoe_jax.data import DataError, check_data, make_eval_batches, make_train_iterator
from olmoe_jax.data.sources import npy_streams, text_documents
from olmoe_jax.data.tokenizers import PreTokenized


def _npy(path, first: int, n: int = 2000, period: int = 50):
    """Token ids first, first+1, ... (documents separated by EOS 0 every `period` tokens)."""
    toks = (np.arange(n) % 90 + first).astype(np.uint16)
    toks[period - 1::period] = 0
    toks.tofile(path)
    return toks


def _cfg(helpers, tmp_path, **data):
    data = {"source": "npy", "tokenizer": "none", "eos_id": 0, "seq_len": 15, "batch_size": 4, **data}
    cfg = helpers.small_config(str(tmp_path / "cache"), **data)
    cfg.model.vocab_size = 1000
    return cfg


def test_npy_eval_path_is_the_held_out_set_and_data_path_trains_whole(tmp_path, helpers):
    train_toks = _npy(tmp_path / "train.npy", 1)
    held = _npy(tmp_path / "held.npy", 500, n=100)
    cfg = _cfg(helpers, tmp_path, path=str(tmp_path / "train.npy"), eval_path=str(tmp_path / "held.npy"),
               shuffle=False)
    assert "2 files" in check_data(cfg)
    streams = npy_streams(cfg)
    assert len(streams["train"]["npy"][0]) == len(train_toks)  # no 2% tail taken off
    (batch, *_), = make_eval_batches(cfg, PreTokenized(1000, 0)).values()
    np.testing.assert_array_equal(batch["inputs"][0], held[:15])
    it = make_train_iterator(cfg, PreTokenized(1000, 0))
    np.testing.assert_array_equal(next(it)["inputs"][0], train_toks[:15])

    cfg.data.eval_path = str(tmp_path / "train.npy")  # a held-out file that also trains: refused
    with pytest.raises(DataError, match="share .*train.npy"):
        check_data(cfg)
    cfg.data.update(source="builtin", tokenizer="sentencepiece", eval_path=str(tmp_path / "held.npy"))
    with pytest.raises(DataError, match="data.eval_path is for npy and jsonl sources"):
        check_data(cfg)


def test_jsonl_eval_path_keeps_every_training_document(tmp_path, helpers):
    docs = helpers.generated_docs(60)
    helpers.write_jsonl(tmp_path / "train.jsonl", docs)
    helpers.write_jsonl(tmp_path / "held.jsonl", ["held out one", "held out two"], domains=["wiki", "wiki"])
    cfg = helpers.small_config(str(tmp_path / "cache"), source="jsonl", path=str(tmp_path / "train.jsonl"),
                               eval_path=str(tmp_path / "held.jsonl"))
    assert [t for _, t in text_documents(cfg, "train")] == docs  # no hash split
    assert list(text_documents(cfg, "validation")) == [("wiki", "held out one"), ("wiki", "held out two")]


def test_named_npy_globs_are_domains_and_the_mixture_samples_by_weight(tmp_path, helpers):
    _npy(tmp_path / "a.npy", 1, n=3000)     # ids 1..90 (and EOS)
    _npy(tmp_path / "b.npy", 200, n=3000)   # ids 200..289
    cfg = _cfg(helpers, tmp_path, path=f"web={tmp_path / 'a.npy'},code={tmp_path / 'b.npy'}",
               mixture="web=0.8,code=0.2", batch_size=8)
    validate(cfg)
    assert set(npy_streams(cfg)["train"]) == {"web", "code"}
    assert set(make_eval_batches(cfg, PreTokenized(1000, 0))) == {"web", "code"}
    it = make_train_iterator(cfg, PreTokenized(1000, 0))
    rows = np.concatenate([next(it)["inputs"] for _ in range(50)])  # 400 rows
    from_code = np.mean(rows.max(axis=1) >= 200)
    assert 0.15 < from_code < 0.25  # 20% of rows from `code`, each row from one domain only
    assert all(set(np.unique(r[r > 0]) // 200) in ({0}, {1}) for r in rows)

    cfg.data.mixture = "web=1,books=1"
    with pytest.raises(DataError, match="data.mixture names books.*domains code, web"):
        make_train_iterator(cfg, PreTokenized(1000, 0))
    cfg.data.mixture = "web=0.5,code"
    with pytest.raises(ConfigError, match="'code' is not domain=weight"):
        validate(cfg)
