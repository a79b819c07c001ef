"""Fixtures for the evaluation tests: a tiny random MoE and a character-level tokenizer."""
from __future__ import annotations

import types

import pytest

from olmoe_jax.config import default_config, validate
from olmoe_jax.data.tokenizers import Tokenizer


class CharTokenizer(Tokenizer):
    """One token per ASCII character (id = code point; others become '?'), EOS = 0."""

    vocab_size, eos_id, pad_id = 128, 0, 0

    def encode(self, text):
        return [ord(c) if 0 < ord(c) < 128 else ord("?") for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)

    @property
    def fingerprint(self):
        return "char128"


def tiny_moe_config(**model):
    c = default_config()
    c.name = "eval_test"
    c.model.update(vocab_size=128, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, max_seq_len=40,
                   num_experts=4, top_k=2, expert_dim=16, moe_impl="dropless", compute_dtype="float32",
                   remat="none")
    c.model.update(**model)
    c.data.update(seq_len=32)
    c.mesh.update(data=-1)
    return validate(c)


@pytest.fixture(scope="module")
def char_model(random_params):
    """(cfg, params, tokenizer): random weights large enough to give peaked distributions."""
    cfg = tiny_moe_config()
    return cfg, random_params(cfg, seed=3, std=0.3), CharTokenizer()


@pytest.fixture(scope="session")
def char_tools():
    """CharTokenizer and tiny_moe_config(**model overrides) for tests that build their own model."""
    return types.SimpleNamespace(CharTokenizer=CharTokenizer, tiny_moe_config=tiny_moe_config)
