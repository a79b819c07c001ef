"""Router z-loss: weight 0.001 vs off; on has fewer spikes and better quality, ~2% slower."""
from experiments._recipes import Variant, ablation_family

ablation_family("z_loss", [
    Variant("on", "router z-loss weight 0.001"),
    Variant("off", "no router z-loss", both={"model.z_loss_weight": 0.0}),
])
