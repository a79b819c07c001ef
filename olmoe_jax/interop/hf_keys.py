"""The one parameter-name map between our params and HF checkpoints, used by import and export.

Each `Rule` names one of our leaves, the HF key template of the tensors it is made of and the two
per-tensor transforms. A template's `{i}` indexes the leaf's leading layer axis and `{e}` the
expert axis after it, so a stacked leaf [L, E, ...] is L*E HF tensors. The HF side is the on-disk
layout of the released OLMoE checkpoint (per-expert gate_proj/up_proj/down_proj, which
transformers 5's save_pretrained also writes); the fused in-memory layout of transformers 5 is
presented in these names by `hf_import.FolderReader`.

Our weights are [in, out] (x @ w) and attention weights keep heads as an axis; HF Linear
weights are [out, in] with heads flattened head-major (index h * head_dim + j), which is what
the reshapes below assume.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from olmoe_jax.config import head_dim
from olmoe_jax.interop.hf_config import hf_model_type


class Rule(NamedTuple):
    ours: tuple[str, ...]  # path into the params dict
    hf: str  # key template; {i}: layer, {e}: expert
    to_hf: Callable[[np.ndarray], np.ndarray]  # one [i(, e)] slice of our leaf -> the HF tensor
    to_ours: Callable[[np.ndarray], np.ndarray]  # the HF tensor -> that slice


def _same(x):
    return x


def _transpose(x):
    return x.T


def _heads_in(n: int, hd: int):
    """HF [n*hd, D] <-> ours [D, n, hd] (q/k/v projections)."""
    to_ours = lambda w: w.T.reshape(w.shape[1], n, hd)  # noqa: E731
    to_hf = lambda w: w.reshape(w.shape[0], n * hd).T  # noqa: E731
    return to_hf, to_ours


def _heads_out(n: int, hd: int):
    """HF [D, n*hd] <-> ours [n, hd, D] (output projection)."""
    to_ours = lambda w: w.T.reshape(n, hd, w.shape[0])  # noqa: E731
    to_hf = lambda w: w.reshape(n * hd, w.shape[-1]).T  # noqa: E731
    return to_hf, to_ours


def _flat(n: int, hd: int):
    """HF [n*hd] <-> ours [n, hd] (QK-norm scales over the whole projection)."""
    return (lambda w: w.reshape(n * hd)), (lambda w: w.reshape(n, hd))


def rules(cfg) -> list[Rule]:
    """The rules for `cfg`'s model, in checkpoint order; HFFormatError if HF cannot express it."""
    kind = hf_model_type(cfg)
    m = cfg.model
    H, K, hd = m.num_heads, m.num_kv_heads, head_dim(cfg)
    layer = "model.layers.{i}."
    out = [Rule(("embed",), "model.embed_tokens.weight", _same, _same)]
    out += [
        Rule(("layers", "wq"), layer + "self_attn.q_proj.weight", *_heads_in(H, hd)),
        Rule(("layers", "wk"), layer + "self_attn.k_proj.weight", *_heads_in(K, hd)),
        Rule(("layers", "wv"), layer + "self_attn.v_proj.weight", *_heads_in(K, hd)),
        Rule(("layers", "wo"), layer + "self_attn.o_proj.weight", *_heads_out(H, hd)),
    ]
    if m.qk_norm:
        out += [
            Rule(("layers", "q_norm"), layer + "self_attn.q_norm.weight", *_flat(H, hd)),
            Rule(("layers", "k_norm"), layer + "self_attn.k_norm.weight", *_flat(K, hd)),
        ]
    if m.norm_type == "rmsnorm":  # OLMo's LayerNorm has no weights at all
        out += [
            Rule(("layers", "attn_norm"), layer + "input_layernorm.weight", _same, _same),
            Rule(("layers", "mlp_norm"), layer + "post_attention_layernorm.weight", _same, _same),
        ]
    if kind == "olmoe":
        expert = layer + "mlp.experts.{e}."
        out += [
            Rule(("layers", "moe", "router"), layer + "mlp.gate.weight", _transpose, _transpose),
            Rule(("layers", "moe", "w_gate"), expert + "gate_proj.weight", _transpose, _transpose),
            Rule(("layers", "moe", "w_up"), expert + "up_proj.weight", _transpose, _transpose),
            Rule(("layers", "moe", "w_down"), expert + "down_proj.weight", _transpose, _transpose),
        ]
    else:
        out += [
            Rule(("layers", "mlp", n), layer + f"mlp.{n[2:]}_proj.weight", _transpose, _transpose)
            for n in ("w_gate", "w_up", "w_down")
        ]
    if m.norm_type == "rmsnorm":
        out.append(Rule(("final_norm",), "model.norm.weight", _same, _same))
    if not m.tie_embeddings:
        out.append(Rule(("lm_head",), "lm_head.weight", _transpose, _transpose))
    return out


def expand(rule: Rule, cfg) -> list[tuple[tuple[int, ...], str]]:
    """[(index into our leaf, HF key)] for every HF tensor of `rule`."""
    m = cfg.model
    if "{e}" in rule.hf:
        return [
            ((i, e), rule.hf.format(i=i, e=e))
            for i in range(m.num_layers)
            for e in range(m.num_experts)
        ]
    if "{i}" in rule.hf:
        return [((i,), rule.hf.format(i=i)) for i in range(m.num_layers)]
    return [((), rule.hf)]


def get_leaf(params, path):
    for p in path:
        params = params[p]
    return params


def set_leaf(params, path, value):
    for p in path[:-1]:
        params = params.setdefault(p, {})
    params[path[-1]] = value
