"""Fixtures for the training tests: a tiny config and a learnable synthetic token stream.

The stream is a grain MapDataset, so its iterator is checkpointed exactly as the real data
layer's is. Each row follows x[n+1] = (5 x[n] + 3) mod V from a random start: the next token
is a fixed function of the current one, so a model that learns it drives the loss toward 0.
"""
from __future__ import annotations

import types

import grain
import numpy as np
import pytest

from olmoe_jax.config import default_config, validate
from olmoe_jax.train.loop import Data


def tiny_config(**overrides):
    """d_model 32, 2 layers, 4 experts top-2 (dense reference MoE), vocab 128, seq 16, batch 8.

    overrides: {"section.key": value}.
    """
    c = default_config()
    c.name = "test_tiny"
    c.model.update(vocab_size=128, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                   max_seq_len=16, num_experts=4, top_k=2, expert_dim=32, mlp_dim=64,
                   moe_impl="dense", compute_dtype="float32", remat="none")
    c.data.update(seq_len=16, batch_size=8, eval_batches=2)
    c.optim.update(lr=1e-2, warmup_steps=5, weight_decay=0.1)
    c.train.update(steps=30, log_every=5, eval_every=1000, ckpt_every=1000, keep_ckpts=3)
    c.mesh.update(data=-1)
    for key, value in overrides.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return validate(c)


class CrashAt(Exception):
    """Raised by a stream built with fail_at_batch: a simulated crash mid-run."""


def dataset(cfg, *, offset: int = 0, rows: int = 100_000, fail_at_batch: int | None = None):
    """The stream as a MapDataset of batches {inputs, targets, loss_mask} [B, T]."""
    T, V, B = cfg.data.seq_len, cfg.model.vocab_size, cfg.data.batch_size

    def row(i):
        if fail_at_batch is not None and i - offset >= fail_at_batch * B:
            raise CrashAt(f"row {i}")
        x = np.empty(T + 1, np.int32)
        x[0] = np.random.default_rng(int(i)).integers(V)
        for n in range(T):
            x[n + 1] = (5 * x[n] + 3) % V
        return {"inputs": x[:-1], "targets": x[1:], "loss_mask": np.ones(T, np.float32)}

    return grain.MapDataset.range(offset, offset + rows).map(row).batch(B, drop_remainder=True)


def data(cfg, *, fail_at_batch: int | None = None) -> Data:
    """Loop input: a fresh training iterator (batch n is always the same), 2 eval batches."""
    evals = dataset(cfg, offset=10_000_000, rows=2 * cfg.data.batch_size)
    return Data(train_iter=iter(dataset(cfg, fail_at_batch=fail_at_batch).to_iter_dataset()),
                eval_batches={"synthetic": [evals[0], evals[1]]},
                unigram_entropy={"synthetic": float(np.log(cfg.model.vocab_size))})


@pytest.fixture(scope="session")
def synthetic():
    """The helpers above: tiny_config(**overrides), dataset(cfg, ...), data(cfg, ...), CrashAt."""
    return types.SimpleNamespace(tiny_config=tiny_config, dataset=dataset, data=data, CrashAt=CrashAt)


@pytest.fixture(scope="module")
def npy_tokens(tmp_path_factory):
    """An OLMo-style .npy token file (uint16 memmap): 400 documents of random ids in [1, 128),
    EOS 0 after each; the path. CLI runs on it need no corpus preparation."""
    path = tmp_path_factory.mktemp("tokens") / "part-0.npy"
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 128, rng.integers(20, 200)), 0) for _ in range(400)]
    np.concatenate(docs).astype(np.uint16).tofile(path)
    return str(path)
