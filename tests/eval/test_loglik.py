"""The log-likelihood scorer: batched and bucketed scoring equals one unpadded forward per
request; truncation, rolling windows and the lm-eval pair encoding."""
import functools

import jax
import ml_collections
import numpy as np
import pytest

from olmoe_jax.eval.loglik import Scorer, encode_pair, rolling_windows
from olmoe_jax.model import transformer


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits(params, tokens, cfg):
    return transformer.apply(params, tokens, cfg)[0]


def _reference(params, cfg, ctx, cont):
    """Sum of log p(cont) and greedy flag from one forward of the (left-truncated) sequence."""
    full = (list(ctx) + list(cont))[-(cfg.model.max_seq_len + 1):]
    logits = _logits(params, np.asarray([full[:-1]], np.int32), cfg=ml_collections.FrozenConfigDict(cfg))
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1))
    n = min(len(cont), len(full) - 1)
    pos = range(len(full) - 1 - n, len(full) - 1)
    lp = sum(logp[p, full[p + 1]] for p in pos)
    greedy = all(int(np.argmax(logp[p])) == full[p + 1] for p in pos)
    return lp, greedy


def test_batched_scores_equal_single_unpadded_forwards(char_model):
    cfg, params, tok = char_model
    rng = np.random.default_rng(0)
    # Three buckets, several rows per batch, one request past max_seq_len; three distinct
    # lengths, so the unpadded reference compiles three times only.
    reqs = [(rng.integers(1, 128, size=n).tolist(), rng.integers(1, 128, size=m).tolist())
            for n, m in ((1, 7), (5, 3), (7, 1), (12, 8), (19, 1), (38, 10))]
    scores = Scorer(params, cfg, tokens_per_batch=64).loglikelihood(reqs)
    for (ctx, cont), s in zip(reqs, scores):
        lp, greedy = _reference(params, cfg, ctx, cont)
        assert s.logprob == pytest.approx(lp, rel=1e-5, abs=1e-4)
        assert s.is_greedy == greedy


def test_greedy_flag_true_for_the_argmax_continuation(char_model):
    cfg, params, _ = char_model
    ctx = [5, 9, 77]
    logits = _logits(params, np.asarray([ctx], np.int32), cfg=ml_collections.FrozenConfigDict(cfg))
    best = int(np.argmax(logits[0, -1]))
    other = (best + 1) % 128
    s = Scorer(params, cfg).loglikelihood([(ctx, [best]), (ctx, [other])])
    assert s[0].is_greedy and not s[1].is_greedy
    assert s[0].logprob > s[1].logprob


def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding(char_model):
    tok = char_model[2]
    assert encode_pair(tok, "a + b = ", "7", 0) == (tok.encode("a + b ="), tok.encode(" 7"))
    assert encode_pair(tok, "", "hi", 0) == ([0], tok.encode("hi"))


def test_rolling_windows_score_each_token_once_within_max_len():
    tokens = list(range(1, 24))
    windows = list(rolling_windows(tokens, 0, 8))
    assert [t for _, cont in windows for t in cont] == tokens
    assert windows[0][0] == [0]
    seq = [0] + tokens  # token t sits at seq[t]
    for ctx, cont in windows:
        full = ctx + cont
        assert len(full) - 1 == 8 or ctx == [0]  # a full input window, or the first one
        assert full == seq[cont[-1] + 1 - len(full):cont[-1] + 1]  # contiguous text before cont


def test_rolling_loglikelihood_equals_token_sum_of_one_forward(char_model):
    cfg, params, _ = char_model
    tokens = np.random.default_rng(1).integers(1, 128, size=30).tolist()  # fits one window of 40
    (total,) = Scorer(params, cfg).loglikelihood_rolling([tokens], prefix_id=0)
    lp, _ = _reference(params, cfg, [0], tokens)
    assert total == pytest.approx(lp, rel=1e-5)
    long = np.random.default_rng(2).integers(1, 128, size=95).tolist()  # three windows
    (total,) = Scorer(params, cfg).loglikelihood_rolling([long], prefix_id=0)
    expected = sum(_reference(params, cfg, c, x)[0] for c, x in rolling_windows(long, 0, 40))
    assert total == pytest.approx(expected, rel=1e-5)
