"""MoE vs dense at equal active parameters: the MoE reaches the dense model's quality with ~3x fewer tokens."""
from experiments._recipes import Variant, ablation_family

ablation_family("moe_vs_dense", [
    Variant("moe", "OLMoE-1B-7B (tiny: 16 experts top-4 of 128): active FFN width 8 x 1024 (tiny 4 x 128)"),
    Variant("dense", "dense SwiGLU as wide as the MoE's active experts: 8192 (tiny 512)",
            both={"model.ffn_type": "dense"}, full={"model.mlp_dim": 8192}, tiny={"model.mlp_dim": 512}),
])
