"""Load-balancing loss: weight 0.01 vs off; on is better, off collapses layer 0 onto 1-2 experts."""
from experiments._recipes import Variant, ablation_family

ablation_family("lb_loss", [
    Variant("on", "load-balancing loss weight 0.01"),
    Variant("off", "no load-balancing loss", both={"model.lb_loss_weight": 0.0}),
])
