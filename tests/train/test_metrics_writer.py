"""MetricsWriter writes metrics.jsonl and TensorBoard events, and does not import torch for
tensorboardX (3.4 s of a tiny CPU run's start-up where torch is installed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHILD = """
import glob, json, sys
from olmoe_jax.train.metrics import MetricsWriter
w = MetricsWriter(sys.argv[1], total_steps=2, start_step=0)
w.train(1, {"loss": 1.5, "lr": 1e-3, "tokens_per_s": 10.0, "mfu": 0.1}, {"expert_load": [[0.5, 0.5]]})
loaded_torch = "torch" in sys.modules
import torch  # importable as usual afterwards
print(json.dumps({"torch_loaded": loaded_torch, "torch_after": torch.zeros(2).shape[0],
                  "events": glob.glob(sys.argv[1] + "/tb/events.*")}))
"""


def test_writes_jsonl_and_events_without_importing_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch_loaded"] is False and got["torch_after"] == 2 and len(got["events"]) == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["start", "train"] and records[1]["loss"] == 1.5
