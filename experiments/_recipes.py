"""Shared pieces of the registry: the paper's recipe, its CPU-scale twin, and `ablation_family`,
which registers every variant of an ablation at both scales from one description.

A variant is a set of config changes on top of a base; the same changes apply at both scales
unless a scale gives its own (equal-compute variants size experts differently at each scale).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections

from experiments import register_entry
from olmoe_jax.config import default_config

# What a full-scale run needs from the user: the OLMoE-Mix token files and the GPT-NeoX tokenizer.
FULL_DATA_SETS = "--set data.path='/data/olmoe-mix/*.npy' --set data.tokenizer_path=/data/tokenizer"


def full_recipe() -> ml_collections.ConfigDict:
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


def tiny_recipe() -> ml_collections.ConfigDict:
    """tiny_moe: 16 experts top-4 of 128, 4 layers, d 128, the built-in corpus; ~3 min on 2 cores."""
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


BASES: dict[str, Callable[[], ml_collections.ConfigDict]] = {"full": full_recipe, "tiny": tiny_recipe}


def set_keys(cfg: ml_collections.ConfigDict, changes: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """cfg with {"section.key": value} applied (in place)."""
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        if key not in cfg[section]:
            raise KeyError(f"registry: unknown config key {dotted}")
        cfg[section][key] = value
    return cfg


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of an ablation. `both` applies at both scales, then `full` or `tiny`;
    `build(cfg, scale)`, when given, makes the config from the base instead (e.g. upcycling)."""
    name: str
    doc: str
    both: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    full: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tiny: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    build: Callable[[ml_collections.ConfigDict, str], ml_collections.ConfigDict] | None = None
    note: str = ""  # more docstring lines (commands beyond `olmoe train`); {suffix}: "" or "-tiny"


def twin_name(name: str) -> str:
    """The CPU twin of a full-scale entry."""
    return f"{name}-tiny"


def run_command(name: str, scale: str) -> str:
    if scale == "tiny":
        return f"olmoe train --experiment {name}"
    return f"olmoe train --experiment {name} {FULL_DATA_SETS}"


def ablation_family(family: str, variants: list[Variant], *, base: Mapping[str, Any] | None = None) -> None:
    """Registers `family/<variant>` (the paper's setting) and `family/<variant>-tiny` (its CPU
    twin) for each variant. base: {"full": {...}, "tiny": {...}} changes shared by all variants."""
    base = base or {}
    for v in variants:
        for scale in ("full", "tiny"):
            name = f"{family}/{v.name}" if scale == "full" else twin_name(f"{family}/{v.name}")

            def build(v=v, scale=scale):
                cfg = set_keys(BASES[scale](), base.get(scale, {}))
                cfg = set_keys(cfg, v.both)
                cfg = set_keys(cfg, v.full if scale == "full" else v.tiny)
                return v.build(cfg, scale) if v.build else cfg

            what = v.doc if scale == "full" else f"{v.doc} (CPU twin)"
            doc = f"{what}\n\n{run_command(name, scale)}\n{v.note.format(suffix='' if scale == 'full' else '-tiny')}"
            register_entry(name, family, scale, build, doc)
