"""Pretraining data: OLMoE-Mix vs Dolma 1.7, evaluated on one fixed held-out set; the mix is better.

Full scale: the two corpora's token files (paths to set) with the same data.eval_path. CPU
twin: two mixtures of the built-in corpus's domains (code and math up-weighted, as OLMoE-Mix
adds StarCoder and math to web text, vs prose-heavy), evaluated on its validation split.
"""
from experiments._recipes import Variant, ablation_family

_EVAL = "/data/olmoe-eval/*.npy"
ablation_family("data_mix", [
    Variant("olmoe_mix", "OLMoE-Mix (tiny: code 0.35, prose 0.25, arithmetic 0.2, records 0.2)",
            full={"data.path": "/data/olmoe-mix/*.npy", "data.eval_path": _EVAL},
            tiny={"data.mixture": "code=0.35,prose=0.25,arithmetic=0.2,records=0.2"}),
    Variant("dolma", "Dolma 1.7 (tiny: prose 0.7, code 0.1, arithmetic 0.1, records 0.1)",
            full={"data.path": "/data/dolma-1.7/*.npy", "data.eval_path": _EVAL},
            tiny={"data.mixture": "prose=0.7,code=0.1,arithmetic=0.1,records=0.1"}),
])
