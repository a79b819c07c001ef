"""CPU-scale variants: the same code path as the paper's runs with small numbers.

The default main job is tiny_moe on the built-in corpus: a few minutes on 2 CPU cores.
"""
from __future__ import annotations

from experiments import register
from olmoe_jax.config import default_config


def _tiny():
    c = default_config()
    c.model.update(vocab_size=4096, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4,
                   max_seq_len=1024, num_experts=16, top_k=4, expert_dim=128, mlp_dim=512,
                   compute_dtype="float32", remat="none")
    c.data.update(source="builtin", tokenizer="sentencepiece", seq_len=256, batch_size=16,
                  eval_batches=4)
    c.optim.update(lr=3e-3, warmup_steps=30, weight_decay=0.1)
    c.train.update(steps=300, log_every=10, eval_every=100, ckpt_every=100)
    c.mesh.update(data=-1)
    return c


@register
def tiny_moe():
    """Tiny OLMoE (16 experts top-4, 4 layers, d 128) on the built-in corpus: the main job, minutes on CPU.

    olmoe train --experiment tiny_moe --workdir runs/tiny_moe
    """
    return _tiny()


@register
def tiny_dense():
    """tiny_moe's dense twin: one SwiGLU of 512 (= 4 x 128) per layer, equal active FLOPs."""
    c = _tiny()
    c.model.update(ffn_type="dense")
    return c
