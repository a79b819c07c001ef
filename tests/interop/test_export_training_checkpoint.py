"""export-hf --step N reads the params out of a full training checkpoint (a TrainState)."""
import jax
import numpy as np
import optax

from launch.cli import main
from olmoe_jax.config import default_config
from olmoe_jax.interop.hf_import import import_hf
from olmoe_jax.train import state as train_state
from olmoe_jax.train.checkpoint import Checkpointer, save_config


def test_export_step_of_training_run(tmp_path, capsys, random_params):
    cfg = default_config()
    cfg.model.update(vocab_size=61, d_model=24, num_layers=2, num_heads=3, num_kv_heads=1,
                     num_experts=3, top_k=2, expert_dim=10, moe_impl="dense", max_seq_len=32)
    cfg.data.update(tokenizer="none", eos_id=0, seq_len=32)
    workdir = tmp_path / "run"
    save_config(workdir, cfg)
    ckpt = Checkpointer(workdir, keep=3, save_every=1)
    steps = {}
    for step, seed in ((10, 1), (20, 2)):
        params = jax.tree.map(np.asarray, random_params(cfg, seed))
        state = train_state.create(params, optax.adam(1e-3), jax.random.PRNGKey(0))
        ckpt.save(step, state, force=True)
        steps[step] = params
    ckpt.close()

    out = tmp_path / "hf"
    assert main(["export-hf", "--workdir", str(workdir), "--out", str(out), "--step", "10"]) == 0
    assert "wrote olmoe (float32)" in capsys.readouterr().out
    assert not (out / "tokenizer.json").exists()  # data.tokenizer=none: ids only, no text side
    _, back = import_hf(str(out), cfg)
    for a, b in zip(jax.tree.leaves(steps[10]), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, np.asarray(b))
