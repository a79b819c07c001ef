"""Shared expert: 32 routed experts top-4 vs 31 routed top-3 + 1 always-on; shared is slightly worse.

Equal compute and parameters: 4 expert widths per token and 32 experts in both.
"""
from experiments._recipes import Variant, ablation_family

ablation_family("shared_expert", [
    Variant("routed", "32 experts top-4, none shared"),
    Variant("shared", "31 routed experts top-3 + 1 shared expert", both={"model.num_experts": 31, "model.top_k": 3,
                                                                      "model.num_shared_experts": 1}),
], base={"full": {"model.num_experts": 32, "model.top_k": 4, "model.expert_dim": 2048},
         "tiny": {"model.num_experts": 32, "model.top_k": 4, "model.expert_dim": 128}})
