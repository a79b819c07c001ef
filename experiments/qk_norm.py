"""QK-norm: RMSNorm on queries and keys vs none; on is more stable and better, ~10% slower."""
from experiments._recipes import Variant, ablation_family

ablation_family("qk_norm", [
    Variant("on", "QK RMSNorm over the whole q and k projections"),
    Variant("off", "no QK-norm", both={"model.qk_norm": False}),
])
