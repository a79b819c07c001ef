"""The paper's model and recipe: OLMoE-1B-7B (6.9B total, 1.3B active) and its dense baseline."""
from __future__ import annotations

from experiments import register
from experiments._recipes import full_recipe


@register
def olmoe_1b7b():
    """OLMoE-1B-7B: 64 experts top-8, dropless, 6.9B total / 1.3B active; the paper's recipe.

    olmoe train --experiment olmoe_1b7b --workdir W \\
      --set data.path='/data/olmoe-mix/*.npy' --set data.tokenizer_path=/tok/tokenizer.json
    """
    return full_recipe()


@register
def dense_1b():
    """Dense 1.3B baseline of the paper: OLMoE-1B-7B with one SwiGLU of 8192 (= 8 x 1024) per layer."""
    c = full_recipe()
    c.model.update(ffn_type="dense", mlp_dim=8192)
    return c
