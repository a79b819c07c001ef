"""Expert choice vs token choice: 8 experts in every 2nd layer, TC top-2 vs EC capacity 2; TC is better, EC ~20% faster.

Both process 2 expert slots per token on average (EC: each expert takes 2 x tokens / 8).
Experts and the dense FFNs between them are the dense model's width (8192; tiny 512).
"""
from experiments._recipes import Variant, ablation_family

ablation_family("expert_choice", [
    Variant("token_choice", "token choice: each token picks its top-2 of 8 experts", both={"model.top_k": 2}),
    Variant("expert_choice", "expert choice: each expert picks its 2 x T / 8 highest-scoring tokens",
            both={"model.router_type": "expert_choice", "model.top_k": 1, "model.capacity_factor": 2.0,
                  "model.moe_impl": "capacity"}),
], base={"full": {"model.moe_every": 2, "model.num_experts": 8, "model.expert_dim": 8192, "model.mlp_dim": 8192},
         "tiny": {"model.moe_every": 2, "model.num_experts": 8, "model.expert_dim": 512, "model.mlp_dim": 512}})
