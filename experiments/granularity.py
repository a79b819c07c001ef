"""Expert granularity at equal compute: 8 experts top-1 vs 32 top-4 vs 64 top-8; finer is better.

Total (E x F) and active (k x F) expert widths are the same in every variant: full 65536 / 8192,
tiny 4096 / 512. Sweep: olmoe sweep granularity --out sweeps/granularity [--scale full].
"""
from experiments._recipes import Variant, ablation_family


def _arm(E: int, k: int) -> Variant:
    return Variant(f"e{E}k{k}", f"{E} experts top-{k} of width {65536 // E} (tiny {4096 // E})",
                   both={"model.num_experts": E, "model.top_k": k},
                   full={"model.expert_dim": 65536 // E}, tiny={"model.expert_dim": 4096 // E})


ablation_family("granularity", [_arm(8, 1), _arm(32, 4), _arm(64, 8)])
