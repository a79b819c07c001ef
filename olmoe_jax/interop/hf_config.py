"""Hugging Face config.json <-> our `model` config, for the architectures that compute exactly
our function.

| our model                                   | HF architecture     |
|---------------------------------------------|---------------------|
| MoE, token choice, dropless, RMSNorm, QK-norm | OlmoeForCausalLM  |
| dense, RMSNorm, no QK-norm                  | LlamaForCausalLM    |
| dense, non-parametric LayerNorm, no QK-norm | OlmoForCausalLM (OLMo-1B, the upcycling source) |

Everything else is refused with the reason, because no HF architecture computes it:
shared experts, expert choice and capacity dropping (HF OLMoE is dropless top-k), the LayerNorm
MoE, a MoE without QK-norm (HF OLMoE always applies q_norm/k_norm), and a dense model with
QK-norm: Olmo2/Olmo3 have the same whole-projection QK-norm but put the norms *after* attention
and MLP (x + norm(attn(x))), while ours is pre-norm (x + attn(norm(x))); Llama has no QK-norm.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from olmoe_jax.config import ConfigError, head_dim


class HFFormatError(ConfigError):
    """An HF folder or config we cannot read, or a model HF cannot express; says what to change."""


ARCHITECTURES = {
    "olmoe": "OlmoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "olmo": "OlmoForCausalLM",
}

# OLMo's HF LayerNorm hard-codes eps=1e-5 (modeling_olmo.OlmoLayerNorm).
OLMO_LAYERNORM_EPS = 1e-5


def hf_model_type(cfg) -> str:
    """The HF model_type computing exactly `cfg`'s model, or HFFormatError saying why none does."""
    m = cfg.model
    if m.ffn_type == "moe":
        problems = []
        if m.num_shared_experts:
            problems.append(
                f"model.num_shared_experts={m.num_shared_experts} (HF OLMoE has no shared experts)"
            )
        if m.router_type != "token_choice":
            problems.append(
                f"model.router_type={m.router_type} (HF OLMoE routes tokens to top-k experts)"
            )
        if m.capacity_factor > 0:
            problems.append(
                f"model.capacity_factor={m.capacity_factor} drops tokens (HF OLMoE is dropless)"
            )
        if m.norm_type != "rmsnorm":
            problems.append(f"model.norm_type={m.norm_type} (HF OLMoE uses RMSNorm)")
        if m.moe_every > 1:
            problems.append(f"model.moe_every={m.moe_every} (HF OLMoE has a MoE in every layer)")
        if m.moe_shared_layers:
            problems.append("model.moe_shared_layers=true (HF OLMoE has its own experts in every layer)")
        if not m.qk_norm:
            problems.append("model.qk_norm=false (HF OLMoE always applies QK RMSNorm)")
        if head_dim(cfg) * m.num_heads != m.d_model:
            problems.append(
                f"head dim {head_dim(cfg)} x {m.num_heads} heads != model.d_model={m.d_model} "
                "(HF OLMoE sizes q_norm/k_norm from hidden_size // num_attention_heads)"
            )
        if problems:
            raise HFFormatError(
                "this MoE cannot be written as an HF OlmoeForCausalLM: " + "; ".join(problems)
            )
        return "olmoe"
    if m.qk_norm:
        raise HFFormatError(
            "no HF dense architecture computes this model: it is pre-norm with QK-norm over the "
            "whole projection; Olmo2/Olmo3 have that QK-norm but normalise after attention/MLP "
            "(x + norm(f(x))), and Llama/OLMo have no QK-norm. Train with model.qk_norm=false to "
            "export as Llama (RMSNorm) or OLMo (LayerNorm), or upcycle to a MoE"
        )
    if m.norm_type == "rmsnorm":
        return "llama"
    if m.norm_eps != OLMO_LAYERNORM_EPS:
        raise HFFormatError(
            f"HF OLMo's LayerNorm has eps {OLMO_LAYERNORM_EPS} fixed; "
            f"model.norm_eps={m.norm_eps} cannot be exported"
        )
    if head_dim(cfg) * m.num_heads != m.d_model:
        raise HFFormatError(
            f"HF OLMo needs head dim x heads == d_model; got {head_dim(cfg)} x {m.num_heads}"
        )
    return "olmo"


def to_hf_config(cfg, *, dtype: str, eos_id: int | None, pad_id: int | None) -> dict[str, Any]:
    """config.json for `cfg` (which `hf_model_type` accepts). dtype: "float32" | "bfloat16"."""
    m = cfg.model
    kind = hf_model_type(cfg)
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "max_position_embeddings": m.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        # transformers 5 reads rope_parameters, 4.x rope_theta: both name the same default RoPE.
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_theta": m.rope_theta,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the 4.x name of "dtype"
    }
    if kind == "olmoe":
        out.update(
            intermediate_size=m.expert_dim,
            num_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            norm_topk_prob=m.norm_topk_prob,
            rms_norm_eps=m.norm_eps,
            clip_qkv=None,
            router_aux_loss_coef=m.lb_loss_weight,
            output_router_logits=False,
        )
    elif kind == "llama":
        out.update(
            intermediate_size=m.mlp_dim,
            rms_norm_eps=m.norm_eps,
            head_dim=head_dim(cfg),
            mlp_bias=False,
            pretraining_tp=1,
        )
    else:
        out.update(intermediate_size=m.mlp_dim, clip_qkv=None)
    return out


def _rope_theta(hf: dict) -> float:
    """RoPE base from a 5.x `rope_parameters` or a 4.x `rope_theta`; only the default RoPE maps."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    kind = params.get("rope_type", params.get("type", "default"))
    if scaling or kind != "default":
        raise HFFormatError(
            f"config.json: RoPE type {kind!r} / rope_scaling={scaling!r} is not supported "
            "(only the default RoPE); remove the scaling or convert another checkpoint"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _require(hf: dict, keys, where: str):
    missing = [k for k in keys if k not in hf]
    if missing:
        raise HFFormatError(
            f"{where}: missing {', '.join(missing)}; is this a complete HF config.json?"
        )


def from_hf_config(
    hf: dict, base: ml_collections.ConfigDict, where: str = "config.json"
) -> ml_collections.ConfigDict:
    """`base` (a full config) with its model section set from an HF config.json dict.

    data.eos_id takes the HF eos_token_id when it is one integer. Raises HFFormatError naming
    the field for anything our model does not compute.
    """
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise HFFormatError(
            f"{where}: model_type={kind!r} is not supported; this importer reads "
            f"{', '.join(ARCHITECTURES)} ({', '.join(ARCHITECTURES.values())})"
        )
    _require(
        hf,
        (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ),
        where,
    )
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(
            f"{where}: hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is supported"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise HFFormatError(f"{where}: {flag}=true; our model has no biases")
    if hf.get("clip_qkv") is not None:
        raise HFFormatError(f"{where}: clip_qkv={hf['clip_qkv']}; our model does not clip q/k/v")
    if hf.get("pretraining_tp", 1) != 1:
        raise HFFormatError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not supported")

    cfg = ml_collections.ConfigDict(base.to_dict())
    m = cfg.model
    D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    K = int(hf.get("num_key_value_heads") or H)
    hd = int(hf.get("head_dim") or D // H)
    if kind != "llama" and hd * H != D:
        raise HFFormatError(
            f"{where}: head_dim={hd} x {H} heads != hidden_size={D}, which "
            f"{ARCHITECTURES[kind]} does not support"
        )
    m.update(
        vocab_size=int(hf["vocab_size"]),
        d_model=D,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=H,
        num_kv_heads=K,
        head_dim=0 if hd * H == D else hd,
        max_seq_len=int(hf.get("max_position_embeddings", m.max_seq_len)),
        rope_theta=_rope_theta(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", m.init_std)),
    )
    if kind == "olmoe":
        _require(hf, ("num_experts", "num_experts_per_tok"), where)
        m.update(
            ffn_type="moe",
            norm_type="rmsnorm",
            qk_norm=True,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            num_experts=int(hf["num_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            expert_dim=int(hf["intermediate_size"]),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            num_shared_experts=0,
            router_type="token_choice",
            capacity_factor=0.0,
            lb_loss_weight=float(hf.get("router_aux_loss_coef", m.lb_loss_weight)),
        )
    else:  # dense: Llama is RMSNorm, OLMo a non-parametric LayerNorm of fixed eps
        llama = kind == "llama"
        m.update(
            ffn_type="dense",
            norm_type="rmsnorm" if llama else "layernorm",
            qk_norm=False,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)) if llama else OLMO_LAYERNORM_EPS,
            mlp_dim=int(hf["intermediate_size"]),
        )
    eos = hf.get("eos_token_id")
    if isinstance(eos, int) and 0 <= eos < m.vocab_size:
        cfg.data.eos_id = eos
    if cfg.data.seq_len > m.max_seq_len:
        cfg.data.seq_len = m.max_seq_len
    return cfg
