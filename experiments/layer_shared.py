"""Layer-shared MoE vs dense (paper appendix): one set of experts used by every layer; about equal quality, ~20% slower.

Equal total and active parameters: the dense model's L FFNs of width W become L x k experts
of width W / k, stored once and shared by all layers; each layer has its own router and
picks k of them (full: 128 experts of 1024, top-8; tiny: 16 of 128, top-4).
"""
from experiments._recipes import Variant, ablation_family

ablation_family("layer_shared", [
    Variant("dense", "dense SwiGLU 8192 (tiny 512) per layer", both={"model.ffn_type": "dense"},
            full={"model.mlp_dim": 8192}, tiny={"model.mlp_dim": 512}),
    Variant("shared", "layer-shared MoE: 128 experts of 1024, top-8 (tiny 16 of 128, top-4), a router per layer",
            both={"model.moe_shared_layers": True},
            full={"model.num_experts": 128, "model.top_k": 8, "model.expert_dim": 1024},
            tiny={"model.num_experts": 16, "model.top_k": 4, "model.expert_dim": 128}),
])
