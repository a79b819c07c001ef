"""Generation: cached decoding equals full recomputation, batching is exact, top-p is obeyed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmoe_jax.config import default_config
from olmoe_jax.eval.generate import generate, sample
from olmoe_jax.model import transformer


@pytest.fixture(scope="module")
def model(random_params):
    c = default_config()
    c.model.update(
        vocab_size=89,
        d_model=40,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=48,
        num_experts=5,
        top_k=2,
        expert_dim=24,
        moe_impl="dense",
        init_std=0.3,
    )
    params = random_params(c, seed=1, std=0.3)
    return c, params


PROMPTS = [[3, 14, 15, 9, 26, 5], [35], [8, 9, 79, 3]]


def test_greedy_equals_argmax_of_full_forward(model):
    cfg, params = model
    out = generate(params, cfg, PROMPTS, max_new_tokens=12, eos_id=None)
    # One uncached forward of the right-padded sequences: causality keeps the pads unseen.
    seqs = [p + r for p, r in zip(PROMPTS, out.tokens)]
    batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for b, s in enumerate(seqs):
        batch[b, : len(s)] = s
    logits = np.asarray(jax.jit(lambda p, t: transformer.apply(p, t, cfg)[0])(params, batch))
    for b, (prompt, row) in enumerate(zip(PROMPTS, out.tokens)):
        pred = np.argmax(logits[b], axis=-1)[len(prompt) - 1:len(seqs[b]) - 1]
        assert pred.tolist() == row


def test_batched_rows_equal_single_rows(model):
    cfg, params = model
    batch = generate(
        params, cfg, PROMPTS, max_new_tokens=12, eos_id=None, temperature=0.8, top_p=0.9, seed=4
    )
    greedy_batch = generate(params, cfg, PROMPTS, max_new_tokens=12, eos_id=None)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(params, cfg, [prompt], max_new_tokens=12, eos_id=None)
        assert greedy_batch.tokens[b] == alone.tokens[0]
    assert all(len(r) == 12 and all(0 <= t < cfg.model.vocab_size for t in r) for r in batch.tokens)


def test_eos_stops_each_row(model):
    cfg, params = model
    free = generate(params, cfg, PROMPTS, max_new_tokens=12, eos_id=None).tokens
    eos = free[0][3]
    out = generate(params, cfg, PROMPTS, max_new_tokens=12, eos_id=eos).tokens
    for full, row in zip(free, out):
        want = full[: full.index(eos) + 1] if eos in full else full
        assert row == want


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model):
    cfg, params = model
    a = generate(
        params, cfg, PROMPTS, max_new_tokens=12, eos_id=None, temperature=1.5, seed=1
    ).tokens
    b = generate(
        params, cfg, PROMPTS, max_new_tokens=12, eos_id=None, temperature=1.5, seed=1
    ).tokens
    c = generate(
        params, cfg, PROMPTS, max_new_tokens=12, eos_id=None, temperature=1.5, seed=2
    ).tokens
    assert a == b and a != c
    nucleus_of_one = generate(
        params, cfg, PROMPTS, max_new_tokens=12, eos_id=None, temperature=1.0, top_p=1e-6, seed=3
    ).tokens
    assert nucleus_of_one == generate(params, cfg, PROMPTS, max_new_tokens=12, eos_id=None).tokens


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]] * 4000))
    keys = jax.random.PRNGKey(0)
    for top_p, allowed in ((0.45, {1}), (0.7, {1, 3}), (0.85, {1, 3, 2}), (1.0, {0, 1, 2, 3})):
        drawn = set(np.asarray(sample(logits, keys, 1.0, top_p, greedy=False)).tolist())
        assert drawn == allowed, top_p
    assert np.asarray(sample(logits, keys, 0.0, 1.0, greedy=True)).tolist() == [1] * 4000


def test_rejects_bad_requests(model):
    cfg, params = model
    with pytest.raises(ValueError, match="max_seq_len=48"):
        generate(params, cfg, PROMPTS, max_new_tokens=45, eos_id=None)
    with pytest.raises(ValueError, match="at least one token"):
        generate(params, cfg, [[]], max_new_tokens=4, eos_id=None)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, cfg, PROMPTS, max_new_tokens=4, eos_id=None, top_p=0.0)


def test_nucleus_floor_matches_the_sorted_definition():
    """The bisection finds exactly the set a sort would: the fewest top tokens reaching top_p."""
    from olmoe_jax.eval.generate import _nucleus_floor

    logits = np.random.RandomState(0).standard_normal((64, 301)).astype(np.float32) * 3
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    for top_p in (0.05, 0.5, 0.9, 0.99):
        floor = np.asarray(_nucleus_floor(jnp.asarray(probs), top_p))
        for row, f in zip(probs, floor[:, 0]):
            order = np.argsort(-row, kind="stable")
            before = np.cumsum(row[order]) - row[order]
            want = set(order[before < top_p].tolist())
            assert set(np.flatnonzero(row >= f).tolist()) == want, top_p
