import pytest

from olmoe_jax.config import default_config


@pytest.fixture
def tiny_cfg():
    """A tiny OLMoE: odd-ish sizes, GQA, the dense MoE reference."""
    c = default_config()
    c.model.update(vocab_size=97, d_model=48, num_layers=2, num_heads=6, num_kv_heads=2,
                   max_seq_len=64, num_experts=6, top_k=2, expert_dim=20, mlp_dim=40,
                   moe_impl="dense")
    c.data.update(seq_len=16, batch_size=2)
    return c
