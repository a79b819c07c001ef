"""A model that has learnt the records domain beats chance on the built-in records_field task.

The cheap stand-in for the report's measurement (tiny_moe, 300 steps, every task over
training): a small MoE trained for 60 steps on generated key-value cards only (character
tokens, other documents than the task's), scored before and after training.
"""
import grain
import jax
import numpy as np

import random

from olmoe_jax.data import generated
from olmoe_jax.eval import downstream, tasks
from olmoe_jax.eval.loglik import Scorer
from olmoe_jax.model import transformer
from olmoe_jax.train import checkpoint
from olmoe_jax.train.loop import Data, train_on

STEPS, B, T = 60, 16, 64


def _train_iter(tok):
    """Shuffled batches of packed rows of generated records (a grain iterator, as the loop
    checkpoints it)."""
    stream = []
    rng = random.Random("eval-test-train")  # not the task's seed
    for _ in range(600):
        stream += tok.encode(generated._key_value(rng)) + [tok.eos_id]  # pylint: disable=protected-access
    rows = np.asarray(stream[:len(stream) // (T + 1) * (T + 1)], np.int32).reshape(-1, T + 1)
    example = lambda r: {"inputs": r[:, :-1], "targets": r[:, 1:], "loss_mask": np.ones(r[:, 1:].shape, np.float32)}  # noqa: E731
    ds = grain.MapDataset.source(rows).shuffle(seed=0).repeat().batch(B, drop_remainder=True).map(example)
    return iter(ds.to_iter_dataset())


def test_records_model_beats_chance_on_records_field(tmp_path, char_tools):
    tok = char_tools.CharTokenizer()
    cfg = char_tools.tiny_moe_config(d_model=64, num_heads=4, num_kv_heads=4, max_seq_len=T, expert_dim=64)
    cfg.data.update(seq_len=T, batch_size=B)
    cfg.optim.update(lr=1e-2, warmup_steps=5)
    cfg.train.update(steps=STEPS, log_every=10, eval_every=1000, ckpt_every=1000)
    task = tasks.builtin_task("records_field", 100)

    def acc(params):
        return downstream.evaluate_tasks(Scorer(params, cfg), tok, [task], ["cloze"])["records_field"]["cloze"]

    before = acc(transformer.init(cfg, jax.random.PRNGKey(0)))
    train_on(cfg, str(tmp_path), Data(_train_iter(tok), {}, {}))
    after = acc(checkpoint.load_params(str(tmp_path)))
    print("before", before, "after", after)
    assert after["acc_norm"] >= 0.5, after  # chance 0.25; 0.5 is 5 standard errors above it
    assert after["acc_norm"] > before["acc_norm"] + 0.15
