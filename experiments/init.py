"""Initialisation: normal vs truncated normal (std 0.02, cut at 3 std); normal diverges at ~450B tokens."""
from experiments._recipes import Variant, ablation_family

ablation_family("init", [
    Variant("truncated", "truncated normal, std 0.02, cut at +-3 std"),
    Variant("normal", "normal, std 0.02, untruncated", both={"model.init": "normal"}),
])
