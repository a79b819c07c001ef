"""The paper's model and recipe: OLMoE-1B-7B (6.9B total, 1.3B active) and its dense baseline."""
from __future__ import annotations

from experiments import register
from olmoe_jax.config import default_config


def _olmoe_recipe():
    """OLMoE-1B-7B-0924 architecture and pretraining recipe (paper Table 10).

    The defaults of olmoe_jax.config already are this model; restated here so the registry
    entry does not change if a default does. 5.1T tokens at 1024 x 4096 tokens per step.
    """
    c = default_config()
    m = c.model
    m.update(vocab_size=50304, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=16,
             max_seq_len=4096, rope_theta=10000.0, norm_type="rmsnorm", norm_eps=1e-5, qk_norm=True,
             tie_embeddings=False, ffn_type="moe", num_experts=64, top_k=8, expert_dim=1024,
             norm_topk_prob=False, router_type="token_choice", capacity_factor=0.0,
             moe_impl="dropless", lb_loss_type="olmoe", lb_loss_weight=0.01, z_loss_weight=0.001,
             init="truncated_normal", init_std=0.02, init_cutoff=3.0,
             param_dtype="float32", compute_dtype="bfloat16", remat="full")
    c.data.update(source="npy", tokenizer="hf", seq_len=4096, batch_size=1024, eos_id=50279)
    c.optim.update(lr=4e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_all_params=True,
                   clip_norm=1.0, warmup_steps=2500, schedule="cosine", final_lr_ratio=0.1)
    c.train.update(steps=1_215_000, log_every=10, eval_every=5000, ckpt_every=1000)
    c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
    return c


@register
def olmoe_1b7b():
    """OLMoE-1B-7B: 64 experts top-8, dropless, 6.9B total / 1.3B active; the paper's recipe.

    olmoe train --experiment olmoe_1b7b --workdir W \\
      --set data.path='/data/olmoe-mix/*.npy' --set data.tokenizer_path=/tok/tokenizer.json
    """
    return _olmoe_recipe()


@register
def dense_1b():
    """Dense 1.3B baseline of the paper: OLMoE-1B-7B with one SwiGLU of 8192 (= 8 x 1024) per layer."""
    c = _olmoe_recipe()
    c.model.update(ffn_type="dense", mlp_dim=8192)
    return c
