"""The grain pipeline: lossless packing, shifts and masks, checkpoint restore, process sharding,
eval batches and the unigram baseline."""
import collections
import math

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from olmoe_jax.data import corpus, make_eval_batches, make_train_iterator, unigram_entropy
from olmoe_jax.data.pipeline import train_rows


def _rows(batch):
    """The packed rows [B, T+1] a batch was cut from."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


@pytest.fixture(scope="module")
def jsonl_cfg(tmp_path_factory, helpers, builtin_cfg):
    """A small generated jsonl source sharing the session's data dir (and so its tokenizer)."""
    folder = tmp_path_factory.mktemp("jsonl")
    docs = helpers.generated_docs(300)
    helpers.write_jsonl(folder / "docs.jsonl", docs)
    cfg = helpers.small_config(builtin_cfg.data.data_dir, source="jsonl",
                               path=str(folder / "docs.jsonl"), seq_len=15, batch_size=4)
    return cfg, docs


def test_packing_keeps_every_token_once_in_order_with_eos_between_docs(jsonl_cfg, spm_tokenizer):
    cfg, docs = jsonl_cfg
    tok = spm_tokenizer
    cfg = cfg.copy_and_resolve_references()
    cfg.data.shuffle = False
    train_docs = [d for d in docs if corpus.split_of(d) == "train"]
    stream = [t for d in train_docs for t in tok.encode(d) + [tok.eos_id]]
    n_rows = len(stream) // 16
    assert len(train_rows(cfg, tok)) == n_rows  # only the last, partial row is left out
    it = make_train_iterator(cfg, tok)
    packed = np.concatenate([_rows(next(it)) for _ in range(n_rows // 4)]).reshape(-1)
    np.testing.assert_array_equal(packed, stream[:len(packed)])
    # document by document: each appears whole, in order, followed by EOS
    pos = 0
    for d in train_docs:
        ids = tok.encode(d)
        if pos + len(ids) + 1 > len(packed):
            break
        assert packed[pos:pos + len(ids)].tolist() == ids and packed[pos + len(ids)] == tok.eos_id
        pos += len(ids) + 1
    assert pos > 0.9 * len(packed)


def test_shuffled_epoch_is_a_permutation_and_epochs_differ(jsonl_cfg, spm_tokenizer):
    cfg, _ = jsonl_cfg
    rows = train_rows(cfg, spm_tokenizer)
    n = len(rows)
    it = make_train_iterator(cfg, spm_tokenizer)
    stream = np.concatenate([_rows(next(it)) for _ in range(math.ceil(2 * n / 4))])
    epochs = stream[:n], stream[n:2 * n]  # batches run on across the epoch boundary
    plain = collections.Counter(rows[i].tobytes() for i in range(n))
    for ep in epochs:
        assert collections.Counter(r.tobytes() for r in ep) == plain  # each row once, no other
    assert not np.array_equal(epochs[0], np.stack([rows[i] for i in range(n)]))
    assert not np.array_equal(epochs[0], epochs[1])


def test_batches_shift_targets_and_mask_nothing_in_training(builtin_cfg, spm_tokenizer):
    batch = next(make_train_iterator(builtin_cfg, spm_tokenizer))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((8, 64), np.int32), "targets": ((8, 64), np.int32),
        "loss_mask": ((8, 64), np.float32)}
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert batch["loss_mask"].min() == 1.0
    assert batch["inputs"].max() < builtin_cfg.model.vocab_size and batch["inputs"].min() >= 0
    assert (batch["inputs"] == spm_tokenizer.pad_id).sum() == 0


def test_checkpoint_restore_continues_with_the_same_batches(jsonl_cfg, spm_tokenizer, tmp_path):
    cfg, _ = jsonl_cfg
    epoch_steps = len(train_rows(cfg, spm_tokenizer)) // 4
    it = make_train_iterator(cfg, spm_tokenizer)
    for _ in range(epoch_steps - 2):  # stop just before an epoch boundary
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(1, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": np.array(1, np.int32)}),
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(5)]  # crosses into the next, reshuffled epoch

    fresh = make_train_iterator(cfg, spm_tokenizer)
    first = next(fresh)
    restored = mngr.restore(1, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"step": np.array(0, np.int32)}),
        data=grain.checkpoint.CheckpointRestore(fresh)))
    assert int(restored["state"]["step"]) == 1
    got = [next(restored["data"]) for _ in range(5)]
    for e, g in zip(expected, got):
        for key in e:
            np.testing.assert_array_equal(e[key], g[key])
    assert not np.array_equal(first["inputs"], got[0]["inputs"])  # it did move, not restart
    mngr.close()


def test_two_processes_split_each_global_batch_disjointly(builtin_cfg, spm_tokenizer):
    one = make_train_iterator(builtin_cfg, spm_tokenizer)
    two = [make_train_iterator(builtin_cfg, spm_tokenizer, process_index=p, process_count=2)
           for p in (0, 1)]
    for _ in range(6):
        whole_batch = next(one)
        whole = collections.Counter(r.tobytes() for r in _rows(whole_batch))
        halves = [_rows(next(it)) for it in two]
        assert all(h.shape == (4, 65) for h in halves)
        parts = [collections.Counter(r.tobytes() for r in h) for h in halves]
        assert not parts[0] & parts[1]  # disjoint
        assert parts[0] + parts[1] == whole  # together, exactly the one-process batch
        np.testing.assert_array_equal(np.concatenate(halves), _rows(whole_batch))  # in its order


def test_eval_batches_are_fixed_per_domain_and_mask_only_padding(builtin_cfg, spm_tokenizer):
    cfg = builtin_cfg.copy_and_resolve_references()
    cfg.data.eval_batches = 1000  # all of the validation split
    tok = spm_tokenizer
    evals = make_eval_batches(cfg, tok)
    assert list(evals) == sorted(corpus.DOMAINS)
    val = collections.defaultdict(list)
    for domain, text in corpus.read_split(cfg.data.data_dir, "validation"):
        val[domain].extend(tok.encode(text) + [tok.eos_id])
    for domain, batches in evals.items():
        n_rows = math.ceil(len(val[domain]) / 65)
        assert len(batches) == math.ceil(n_rows / 8)
        rows = np.concatenate([_rows(b) for b in batches])
        mask = np.concatenate([b["loss_mask"] for b in batches])
        assert rows.shape == (len(batches) * 8, 65)
        np.testing.assert_array_equal(rows.reshape(-1)[:len(val[domain])], val[domain])
        assert (rows.reshape(-1)[len(val[domain]):] == tok.pad_id).all()
        # every real target counts once; every masked target is padding
        assert mask.sum() == len(val[domain]) - n_rows
        targets = np.concatenate([b["targets"] for b in batches])
        assert (targets[mask == 0] == tok.pad_id).all()
    again = make_eval_batches(cfg, tok)
    for domain in evals:
        for a, b in zip(evals[domain], again[domain]):
            np.testing.assert_array_equal(a["inputs"], b["inputs"])
    cfg.data.eval_batches = 2
    assert all(len(b) == 2 for b in make_eval_batches(cfg, tok).values())
    halves = [make_eval_batches(cfg, tok, process_index=p, process_count=2) for p in (0, 1)]
    for domain in evals:
        for j in range(2):
            np.testing.assert_array_equal(  # process 0's rows, then process 1's: the whole batch
                np.concatenate([_rows(h[domain][j]) for h in halves]), _rows(evals[domain][j]))


def test_unigram_entropy_matches_the_validation_token_counts(builtin_cfg, spm_tokenizer):
    tok = spm_tokenizer
    got = unigram_entropy(builtin_cfg, tok)
    assert set(got) == set(corpus.DOMAINS)
    counts = collections.defaultdict(collections.Counter)
    for domain, text in corpus.read_split(builtin_cfg.data.data_dir, "validation"):
        counts[domain].update(tok.encode(text) + [tok.eos_id])
    for domain, c in counts.items():
        n = sum(c.values())
        want = -sum(k / n * math.log(k / n) for k in c.values())
        assert got[domain] == pytest.approx(want, rel=1e-9)
        assert 0 < got[domain] < math.log(tok.vocab_size)
    assert unigram_entropy(builtin_cfg, tok) == got  # from the cache now


def test_worker_processes_give_the_same_batches_and_restore(jsonl_cfg, spm_tokenizer):
    cfg, _ = jsonl_cfg
    want = make_train_iterator(cfg, spm_tokenizer)
    want = [next(want) for _ in range(4)]
    cfg = cfg.copy_and_resolve_references()
    cfg.data.num_workers = 1
    it = make_train_iterator(cfg, spm_tokenizer)
    try:
        got = [next(it), next(it)]
        state = it.get_state()
        got += [next(it), next(it)]
    finally:
        it.close()
    again = make_train_iterator(cfg, spm_tokenizer)
    try:
        again.set_state(state)
        got += [next(again), next(again)]
    finally:
        again.close()
    for w, g in zip(want + want[2:], got):
        np.testing.assert_array_equal(w["inputs"], g["inputs"])


def test_no_eval_batches_means_no_domains(jsonl_cfg, spm_tokenizer):
    # An empty list per domain would be evaluated as a loss of 0 nats over 0 tokens.
    cfg = jsonl_cfg[0].copy_and_resolve_references()
    cfg.data.eval_batches = 0
    assert make_eval_batches(cfg, spm_tokenizer) == {}
