"""Sparse upcycling vs from scratch: dense -> 8 experts top-2; scratch catches up after ~500B tokens.

`dense` is the source model; `scratch` is exactly the model `olmoe upcycle --num-experts 8
--top-k 2` makes of it, trained from a fresh init. The upcycled arm starts from a trained
`dense` run (commands in `scratch`'s entry); `--noise 0.5` is the paper's 50%-noise variant.
"""
from experiments._recipes import Variant, ablation_family
from olmoe_jax.interop.upcycle import upcycle_config


def _as_upcycled(cfg, scale):
    del scale
    return upcycle_config(cfg, num_experts=8, top_k=2, norm_topk_prob=False)


_UPCYCLED = ("the upcycled arm, from a finished dense run:\n"
             "olmoe upcycle --from runs/upcycling/dense{suffix} --workdir runs/upcycling/upcycled{suffix} "
             "--num-experts 8 --top-k 2 && olmoe train --workdir runs/upcycling/upcycled{suffix}")

ablation_family("upcycling", [
    Variant("dense", "the dense source (SwiGLU 8192; tiny 512)", both={"model.ffn_type": "dense"},
            full={"model.mlp_dim": 8192}, tiny={"model.mlp_dim": 512}),
    Variant("scratch", "8 experts top-2, each as wide as the dense FFN, from scratch",
            both={"model.ffn_type": "dense"}, full={"model.mlp_dim": 8192}, tiny={"model.mlp_dim": 512},
            build=_as_upcycled,
            note=_UPCYCLED),
])
