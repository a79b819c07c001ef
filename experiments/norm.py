"""Normalisation: RMSNorm vs non-parametric LayerNorm; RMSNorm is better despite ~15% lower throughput."""
from experiments._recipes import Variant, ablation_family

ablation_family("norm", [
    Variant("rmsnorm", "RMSNorm with learnt scales (QK-norm included)"),
    Variant("layernorm", "non-parametric LayerNorm (no scales, no QK-norm)",
            both={"model.norm_type": "layernorm", "model.qk_norm": False}),
])
