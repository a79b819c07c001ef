"""Greedy generation with our KV cache equals transformers' generate on the same weights."""

import pytest
import torch
from hf_reference import build_hf

from olmoe_jax.interop.hf_import import import_hf
from olmoe_jax.eval.generate import generate

PROMPTS = [[5, 17, 99, 4, 8], [7, 7, 1], [100, 2, 3, 4, 5, 6, 7, 8, 9, 60, 61]]


def _hf_generate(model, prompt, n, eos):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen") / "hf"
    model = build_hf("k2_gqa_nonorm", folder, seed=3)
    from olmoe_jax.config import default_config

    base = default_config()
    base.model.moe_impl = "dense"
    cfg, params = import_hf(str(folder), base)
    return model, cfg, params


def test_greedy_32_tokens_equals_transformers(models):
    model, cfg, params = models
    # One batch with prompts of three lengths: rows must not see each other's padding.
    ours = generate(params, cfg, PROMPTS, max_new_tokens=32, eos_id=None)
    for prompt, row in zip(PROMPTS, ours.tokens):
        assert row == _hf_generate(model, prompt, 32, None)
    assert ours.num_tokens == 3 * 32 and ours.tokens_per_s > 0


def test_stops_at_eos_like_transformers(models):
    model, cfg, params = models
    free = _hf_generate(model, PROMPTS[0], 32, None)
    eos = free[5]  # a token greedy decoding emits: the row must stop at its first occurrence
    ours = generate(params, cfg, PROMPTS, max_new_tokens=32, eos_id=eos)
    ref = _hf_generate(model, PROMPTS[0], 32, eos)
    assert ours.tokens[0] == ref == free[: free.index(eos) + 1]
    for prompt, row in zip(PROMPTS[1:], ours.tokens[1:]):
        assert row == _hf_generate(model, prompt, 32, eos)
