"""One of two processes of a jax.distributed CPU run (4 devices each) training the synthetic
stream in a workdir until stopped by a signal; prints `SUMMARY <json>` at the end.

Usage: python two_process_train.py PROCESS_ID PORT WORKDIR (run by test_reliability_processes.py).
"""
import json
import os
import sys

from launch.launcher_local import with_device_count  # noqa: E402  (no jax import)

os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), 4)  # the suite's other flags kept
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

pid, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120, heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)

from conftest import dataset, tiny_config  # noqa: E402  (tests/train/conftest.py, beside this file)

from olmoe_jax.train import loop  # noqa: E402

cfg = tiny_config(**{"train.steps": 100_000, "train.ckpt_every": 100_000, "train.log_every": 1})
half = cfg.data.batch_size // 2  # this process's rows of each global batch
rows = dataset(cfg).map(lambda b: {k: v[pid * half:(pid + 1) * half] for k, v in b.items()})
data = loop.Data(train_iter=iter(rows.to_iter_dataset()), eval_batches={}, unigram_entropy={})
print("SUMMARY " + json.dumps(loop.train_on(cfg, workdir, data)), flush=True)
