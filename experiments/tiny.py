"""CPU-scale main job: the same code path as the paper's runs with small numbers, minutes on 2 cores."""
from __future__ import annotations

from experiments import register
from experiments._recipes import tiny_recipe


@register(scale="tiny")
def tiny_moe():
    """Tiny OLMoE (16 experts top-4, 4 layers, d 128) on the built-in corpus: the main job, minutes on CPU.

    olmoe train --experiment tiny_moe --workdir runs/tiny_moe
    """
    return tiny_recipe()


@register(scale="tiny")
def tiny_dense():
    """tiny_moe's dense twin: one SwiGLU of 512 (= 4 x 128) per layer, equal active FLOPs.

    olmoe train --experiment tiny_dense --workdir runs/tiny_dense
    """
    c = tiny_recipe()
    c.model.update(ffn_type="dense")
    return c
