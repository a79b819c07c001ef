"""Sources: OLMo token files in every layout, jsonl, TFDS by name, and every DataError."""
import numpy as np
import pytest

from olmoe_jax.data import DataError, check_data, corpus, make_eval_batches, make_train_iterator
from olmoe_jax.data.sources import open_token_file, resolve_paths, text_documents
from olmoe_jax.data.tokenizers import PreTokenized


def _write_raw(path, tokens, dtype):
    """As OLMo writes its token files: np.memmap, no header, despite the .npy suffix."""
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=(len(tokens),))
    mm[:] = tokens
    mm.flush()
    del mm


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_raw_memmap_token_files_read_back(tmp_path, dtype):
    rng = np.random.default_rng(0)
    high = 50280 if dtype == "uint16" else 100_000  # uint32 ids beyond 65535 must survive
    tokens = rng.integers(0, high, 1001).astype(dtype)
    _write_raw(tmp_path / "part-0.npy", tokens, dtype)
    span = open_token_file(str(tmp_path / "part-0.npy"), dtype)
    assert span.header == 0 and len(span) == 1001
    np.testing.assert_array_equal(span.read(), tokens)


def test_real_npy_file_uses_its_header(tmp_path):
    tokens = np.arange(70000, 70500, dtype=np.uint32)
    np.save(tmp_path / "a.npy", tokens)
    span = open_token_file(str(tmp_path / "a.npy"), "uint16")  # the header's uint32 wins
    assert span.header > 0
    np.testing.assert_array_equal(span.read(), tokens)


def test_npy_source_end_to_end_reads_every_file_in_order(tmp_path, helpers):
    eos = 0
    files = []
    for i in range(3):  # three files, documents separated by EOS, ids 1..999
        toks = np.arange(i * 1000, i * 1000 + 999) % 999 + 1
        toks[::37] = eos
        files.append(toks.astype(np.uint16))
        _write_raw(tmp_path / f"part-{i}.npy", files[-1], "uint16")
    cfg = helpers.small_config(str(tmp_path / "cache"), source="npy", tokenizer="none",
                               eos_id=eos, path=str(tmp_path / "part-*.npy"), shuffle=False,
                               batch_size=2, seq_len=31)
    cfg.model.vocab_size = 1000
    assert "3 files" in check_data(cfg)
    tok = PreTokenized(1000, eos)
    it = make_train_iterator(cfg, tok)
    # validation is the last 2% of each file; the rest, in file order, is the training stream
    train = np.concatenate([f[:len(f) - int(np.ceil(len(f) * 0.02))] for f in files])
    n_rows = len(train) // 32
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
                           for b in (next(it) for _ in range(n_rows // 2))])
    np.testing.assert_array_equal(rows.reshape(-1), train[:n_rows // 2 * 2 * 32])
    val = make_eval_batches(cfg, tok)
    assert list(val) == ["npy"]
    # the three 20-token tails, packed into rows of 32: one full row, one of 28 + padding
    held_out = np.concatenate([f[-20:] for f in files])
    (batch,) = val["npy"]
    np.testing.assert_array_equal(batch["inputs"][0], held_out[:31])
    np.testing.assert_array_equal(batch["targets"][1, :27], held_out[33:])
    np.testing.assert_array_equal(batch["loss_mask"].sum(1), [31, 27])


def test_npy_ids_beyond_the_vocabulary_are_caught_up_front(tmp_path, helpers):
    _write_raw(tmp_path / "x.npy", np.array([1, 2, 60000, 3], np.uint16), "uint16")
    cfg = helpers.small_config(str(tmp_path), source="npy", tokenizer="none", eos_id=0,
                               path=str(tmp_path / "x.npy"))
    with pytest.raises(DataError, match=r"x.npy: token id 60000 >= model.vocab_size=2048"):
        check_data(cfg)


def test_paths_accept_globs_and_comma_lists(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text("{}\n")
    got = resolve_paths(f"{tmp_path}/*.jsonl, {tmp_path}/c.txt,{tmp_path}/a.jsonl")
    assert [p.rsplit("/", 1)[1] for p in got] == ["a.jsonl", "b.jsonl", "c.txt"]


def test_jsonl_source_keeps_domains_and_splits_by_text_hash(tmp_path, helpers):
    docs = helpers.generated_docs(400)
    domains = ["red" if i % 3 else "blue" for i in range(400)]
    helpers.write_jsonl(tmp_path / "d.jsonl", docs, domains)
    cfg = helpers.small_config(str(tmp_path), source="jsonl", path=str(tmp_path / "d.jsonl"))
    assert "400 documents" in check_data(cfg)
    train = list(text_documents(cfg, "train"))
    val = list(text_documents(cfg, "validation"))
    assert len(train) + len(val) == 400 and 3 <= len(val) <= 30
    assert sorted(t for _, t in train + val) == sorted(docs)
    assert {d for d, _ in train} == {"red", "blue"}
    assert all(corpus.split_of(t) == "validation" for _, t in val)


def test_tfds_dataset_by_name(builtin_cfg):
    # The built-in corpus is itself a TFDS dataset: read it through the generic TFDS source.
    cfg = builtin_cfg.copy_and_resolve_references()
    cfg.data.source, cfg.data.path = "tfds", "olmoe_builtin_corpus"
    assert "olmoe_builtin_corpus" in check_data(cfg)
    want = corpus.read_split(cfg.data.data_dir, "validation")
    assert list(text_documents(cfg, "validation")) == want


def _error(cfg):
    with pytest.raises(DataError) as info:
        check_data(cfg)
    return str(info.value)


def test_each_bad_input_names_the_file_and_the_fix(tmp_path, helpers):
    cfg = helpers.small_config(str(tmp_path), source="npy", tokenizer="none", eos_id=0,
                               path=str(tmp_path / "missing.npy"))
    assert _error(cfg) == f"data.path: '{tmp_path}/missing.npy' does not exist; fix data.path"
    cfg.data.path = str(tmp_path / "none-*.npy")
    assert "matches no file" in _error(cfg)

    (tmp_path / "odd.npy").write_bytes(b"\x01\x00\x02")  # 3 bytes: not whole uint16 tokens
    cfg.data.path = str(tmp_path / "odd.npy")
    msg = _error(cfg)
    assert "odd.npy: 3 bytes is not a multiple of 2 (data.npy_dtype=uint16)" in msg
    (tmp_path / "six.npy").write_bytes(b"\x00" * 6)
    cfg.data.path, cfg.data.npy_dtype = str(tmp_path / "six.npy"), "uint32"
    assert "six.npy: 6 bytes is not a multiple of 4 (data.npy_dtype=uint32)" in _error(cfg)
    (tmp_path / "empty.npy").write_bytes(b"")
    cfg.data.path = str(tmp_path / "empty.npy")
    assert "empty.npy: is empty" in _error(cfg)

    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": "broken\n')
    cfg = helpers.small_config(str(tmp_path), source="jsonl", path=str(jl))
    assert _error(cfg).startswith(f"{jl}:4: not valid JSON")
    jl.write_text('{"text": "fine"}\n{"body": "no text key", "id": 3}\n')
    assert _error(cfg) == (f"{jl}:2: no field 'text' (fields: body, id); "
                           "set data.text_key to the field holding the text")
    jl.write_text('{"text": 12}\n')
    assert "bad.jsonl:1: field 'text' is int" in _error(cfg)
    jl.write_text("\n")
    assert "hold no documents" in _error(cfg)

    cfg = helpers.small_config(str(tmp_path), source="jsonl", tokenizer="none", path=str(jl))
    assert "only works with pre-tokenized data.source=npy" in _error(cfg)
    cfg = helpers.small_config(str(tmp_path), source="tfds", path="no_such_dataset_xyz")
    assert "no_such_dataset_xyz" in _error(cfg) and "no such TFDS dataset" in _error(cfg)


def test_too_little_data_for_one_batch_is_a_data_error(tmp_path, helpers):
    _write_raw(tmp_path / "t.npy", np.arange(1, 200, dtype=np.uint16), "uint16")
    cfg = helpers.small_config(str(tmp_path), source="npy", tokenizer="none", eos_id=0,
                               path=str(tmp_path / "t.npy"))
    with pytest.raises(DataError, match="fewer than one batch.*data.batch_size=8"):
        make_train_iterator(cfg, PreTokenized(2048, 0))
