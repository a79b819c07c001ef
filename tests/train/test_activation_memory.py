"""Per-chip temporaries follow the per-chip batch: compiled on 8 simulated devices, a step
whose batch is 8 x b rows needs about the temporaries of a one-device step on b rows.

If any layer's activations were held for the global batch on every chip (GSPMD inferring
layouts from the FSDP-sharded weights, or a MoE that sorts the whole batch), the 8-device
program would need several times the one-device temporaries: the model is sized so that
activations dominate them (long sequence, narrow model).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from olmoe_jax.config import validate
from olmoe_jax.parallel.mesh import make_mesh
from olmoe_jax.train import step as step_lib

ROWS_PER_DEVICE = 2


def _temp_bytes(cfg, devices) -> int:
    mesh = make_mesh(cfg, devices)
    sh = step_lib.state_shardings(cfg, mesh)
    state = step_lib.abstract_state(cfg, sh)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in ("inputs", "targets", "loss_mask")}
    compiled = step_lib.lower_train_step(cfg, mesh, sh, state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


# Measured without the activation constraints (rules.constrain a no-op), before expert
# parallelism: the MoE step needed 6.3x (fsdp 8) and 3.9x (2, 2, 2) the one-device temporaries.
@pytest.mark.parametrize("ffn, mesh", [
    ("dense", {"data": 1, "fsdp": 8}),
    ("moe", {"data": 1, "fsdp": 8}),
    ("moe", {"data": 2, "fsdp": 2, "expert": 2}),
])
def test_temporaries_follow_the_per_chip_batch(synthetic, ffn, mesh):
    def cfg_for(n):
        c = synthetic.tiny_config(**{"model.ffn_type": ffn, "model.moe_impl": "dropless"})
        c.model.update(max_seq_len=512, d_model=64, num_heads=2, num_kv_heads=2, num_layers=2,
                       vocab_size=256, expert_dim=32, mlp_dim=128)
        c.data.update(seq_len=512, batch_size=ROWS_PER_DEVICE * n)
        c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
        if n > 1:
            c.mesh.update(**mesh)
        return validate(c, num_devices=n)

    one = _temp_bytes(cfg_for(1), jax.devices()[:1])
    eight = _temp_bytes(cfg_for(8), jax.devices())
    # Held for the global batch, the 8-device temporaries would be ~8x; per-chip, ~1x plus
    # the collectives' buffers.
    assert eight < 2.0 * one, f"per-chip temporaries {eight} B vs {one} B on one device"
