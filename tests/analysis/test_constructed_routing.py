"""The four routing analyses on a checkpoint whose routing is known by construction.

The model: attention and expert outputs are zero (wo = 0, w_down = 0), so every layer's
router sees the token's own embedding; embed[t] is the unit vector of dimension t mod E, and
layer l's router scores expert (t + l + j) mod E with weight w_j (w_0 > w_1 > 0 = the rest).
So token t goes exactly to experts {(t + l) mod E, (t + l + 1) mod E} in layer l (k = 2).
The output layer predicts id 40 + (t mod 4): residues r and r + 4 predict the same id.
"""
import json

import numpy as np
import pytest

from launch.cli import main
from olmoe_jax.analysis import analyses, metrics, routing
from olmoe_jax.config import default_config, validate
from olmoe_jax.train import checkpoint

E, K, L, V, D = 8, 2, 2, 64, 16


def _cfg():
    c = default_config()
    c.name = "constructed"
    c.model.update(vocab_size=V, d_model=D, num_layers=L, num_heads=2, num_kv_heads=2, max_seq_len=16,
                   num_experts=E, top_k=K, expert_dim=8, moe_impl="dropless", compute_dtype="float32",
                   remat="none")
    c.data.update(seq_len=16, tokenizer="none", eos_id=0)
    c.mesh.update(data=-1)
    return validate(c)


def _params(cfg, random_params, shift: int = 0):
    """The constructed weights; `shift` moves every layer's choice by that many experts."""
    p = random_params(cfg, seed=0, std=0.0)  # zeros, norms at one
    p["embed"] = np.eye(D, dtype=np.float32)[np.arange(V) % E]
    w = np.zeros(E, np.float32)
    w[:2] = (4.0, 2.0)
    router = np.zeros((L, D, E), np.float32)
    for layer in range(L):
        for d in range(E):
            router[layer, d] = np.roll(w, d + layer + shift)  # router[l, d, e] = w[(e - d - l - shift) % E]
    p["layers"]["moe"]["router"] = router
    head = np.zeros((D, V), np.float32)
    head[np.arange(E), 40 + np.arange(E) % 4] = 1.0
    p["lm_head"] = head
    return p


ROWS = np.tile(np.arange(V, dtype=np.int32).reshape(4, 16), (2, 1))  # every id twice


def _expected(t, layer, shift=0):
    return {(t + layer + shift) % E, (t + layer + shift + 1) % E}


def test_routing_is_as_constructed(random_params):
    cfg = _cfg()
    r = routing.collect(_params(cfg, random_params), cfg, ROWS, batch_size=3)
    assert r.experts_LNk.shape == (L, ROWS.size, K)
    for layer in range(L):
        for n, t in enumerate(ROWS.reshape(-1)):
            assert set(r.experts_LNk[layer, n].tolist()) == _expected(t, layer)
    assert (r.predicted_N == 40 + ROWS.reshape(-1) % 4).all()


def test_analyses_give_the_numbers_of_the_construction(random_params):
    cfg = _cfg()
    final = routing.collect(_params(cfg, random_params), cfg, ROWS)
    # Saturation: a shift of 1 keeps one of two experts, a shift of 4 none.
    by_step = {10: routing.collect(_params(cfg, random_params, 4), cfg, ROWS),
               20: routing.collect(_params(cfg, random_params, 1), cfg, ROWS), 30: final}
    sat = analyses.saturation({s: analyses.pooled({"all": r}) for s, r in by_step.items()}, 30)
    assert sat["saturation"] == {"10": [0.0, 0.0], "20": [0.5, 0.5], "30": [1.0, 1.0]}
    # Co-activation: Ei is always paired with exactly one neighbour, i-1 or i+1, half the time each.
    co = analyses.coactivation({"all": final}, E)
    expect = np.zeros((E, E))
    for i in range(E):
        expect[i, (i + 1) % E] = expect[i, (i - 1) % E] = 0.5
    for layer in range(L):
        assert np.array_equal(np.array(co["layers"][layer]["ratio"]), expect)
    # Domain: ids with residue 0 use experts {l, l+1} only; all ids spread evenly (k/E each).
    low = ROWS.reshape(-1)[ROWS.reshape(-1) % E == 0].reshape(1, -1)
    dom = analyses.domain_specialisation({"low": routing.collect(_params(cfg, random_params), cfg, low),
                                          "all": final}, E)
    assert dom["uniform"] == K / E
    for layer in range(L):
        assert dom["share"]["low"][layer] == [1.0 if e in (layer, layer + 1) else 0.0 for e in range(E)]
        assert dom["share"]["all"][layer] == [K / E] * E
    # Vocabulary: an input id always goes to the same experts (share 1); a predicted id comes
    # from two residues with disjoint expert pairs, equally often (share 1/2).
    voc = analyses.vocab_specialisation({"all": final}, E, min_count=1)
    assert voc["input"]["mean_share"] == [1.0, 1.0]
    assert voc["predicted"]["mean_share"] == [0.5, 0.5]
    assert voc["predicted"]["ids"] == [4, 4]


def test_coactivation_counts_against_a_loop():
    rng = np.random.default_rng(0)
    experts = np.stack([rng.choice(6, 3, replace=False) for _ in range(200)])
    ratio, counts = metrics.coactivation(experts, 6)
    for i in range(6):
        n_i = sum(i in row for row in experts)
        assert counts[i, i] == n_i
        for j in range(6):
            if i != j:
                assert ratio[i, j] == pytest.approx(sum(i in row and j in row for row in experts) / n_i)


def test_analyze_command_writes_json_and_png(random_params, tmp_path, capsys):
    cfg = _cfg()
    wd = tmp_path / "wd"
    for step, shift in ((10, 4), (20, 1), (30, 0)):
        checkpoint.save_params(str(wd), _params(cfg, random_params, shift), cfg, step=step)
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"domain": "all", "tokens": row.tolist()}) + "\n" for row in ROWS))
    out = tmp_path / "out"
    # The EOS (id 0) after each document shifts the rows: 17 tokens per document, rows of 16.
    assert main(["analyze", "all", "--workdir", str(wd), "--data", str(data), "--out", str(out),
                 "--seq-len", "16", "--min-count", "1"]) == 0
    for name in ("saturation", "coactivation", "domain", "vocab"):
        assert (out / f"{name}.png").stat().st_size > 1000
    sat = json.loads((out / "saturation.json").read_text())
    assert sat["saturation"] == {"10": [0.0, 0.0], "20": [0.5, 0.5], "30": [1.0, 1.0]}
    assert json.loads((out / "vocab.json").read_text())["input"]["mean_share"] == [1.0, 1.0]
    assert main(["analyze", "nope", "--workdir", str(wd)]) == 2
    assert "choose from saturation" in capsys.readouterr().err
