"""AdamW epsilon: 1e-8 vs 1e-5; 1e-8 is significantly better."""
from experiments._recipes import Variant, ablation_family

ablation_family("adam_eps", [
    Variant("eps1e-8", "AdamW eps 1e-8"),
    Variant("eps1e-5", "AdamW eps 1e-5", both={"optim.eps": 1e-5}),
])
