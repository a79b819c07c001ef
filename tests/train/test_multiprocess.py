"""Two processes x 4 CPU devices (gloo collectives on 127.0.0.1), started by `olmoe launch local`,
train 5 steps like one process x 8 devices: the same losses, gradient norms and validation
loss, through a collective checkpoint at step 3 that both processes resume from, with one
writer of the metrics.

The runs cannot match bit for bit everywhere: the loss and gradient sums over devices are
all-reduced in-process by XLA in the reference and through gloo across the processes here,
in another order; float32 sums in another order differ in the last bits. So the comparison
allows 2e-6 relative (4 float32 ulps at these values); a wrong batch, a wrong restore or a
missing reduction changes these numbers in the third digit or earlier.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from launch.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.vocab_size=128", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
        "model.num_kv_heads=2", "model.num_experts=4", "model.top_k=2", "model.expert_dim=32",
        "data.seq_len=16", "data.batch_size=8", "data.eval_batches=1", "train.log_every=1",
        "train.eval_every=100", "train.ckpt_every=3", "optim.warmup_steps=2",
        "data.source=npy", "data.tokenizer=none", "data.eos_id=0"]
RTOL = 2e-6


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _launch(*argv, timeout=600):
    """`olmoe launch local ...` as a subprocess in its own process group, so that a hang
    ends with every process it started killed, not with a stuck test."""
    env = {**os.environ, "PYTHONPATH": REPO, "OLMOE_PEAK_FLOPS": "1e11"}  # no GEMM probe
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", "local", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"olmoe launch local did not finish in {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _train_points(records):
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"}


def test_two_processes_train_and_resume_like_one(npy_tokens, tmp_path, capsys, monkeypatch):
    sets = _sets(TINY + [f"data.path={npy_tokens}"])
    two = str(tmp_path / "two")
    logs = str(tmp_path / "logs")
    launch = ["--processes", "2", "--devices-per-process", "4", "--log-dir", logs, "--"]

    # Steps 1-3 on 2 processes (a checkpoint at step 3), then resumed there to step 5.
    code, out = _launch(*launch, "train", "--experiment", "tiny_moe", "--workdir", two, *sets,
                        "--set", "train.steps=3")
    assert code == 0, out[-3000:]
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["3"]
    code, out = _launch(*launch, "train", "--workdir", two, "--set", "train.steps=5")
    assert code == 0, out[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])  # process 0 prints to the terminal
    assert summary["start_step"] == 3 and summary["step"] == 5
    with open(os.path.join(logs, "group0.run0.p1.log"), encoding="utf-8") as f:
        assert json.loads(f.read().strip().splitlines()[-1])["step"] == 5  # process 1 ran it too

    # The reference: one process, 8 devices (this pytest process), the same two runs (the
    # learning-rate schedule follows train.steps, so 3 + 2 steps is not 5 steps straight).
    monkeypatch.setenv("OLMOE_PEAK_FLOPS", "1e11")
    one = str(tmp_path / "one")
    assert main(["train", "--experiment", "tiny_moe", "--workdir", one, *sets, "--set", "train.steps=3"]) == 0
    assert main(["train", "--workdir", one, "--set", "train.steps=5"]) == 0
    capsys.readouterr()

    got, want = _metrics(two), _metrics(one)
    # Only process 0 writes: one start and one summary line per run, not one per process.
    assert [r["kind"] for r in got if r["kind"] in ("start", "summary")] == ["start", "summary"] * 2
    setup = [r for r in got if r["kind"] == "setup"]
    assert setup[0]["mesh"]["data"] == 8  # 2 processes x 4 devices: one mesh of 8
    # The first step of each run compiles and is not logged: steps 2, 3 (first run) and 5 (resumed).
    got_points, want_points = _train_points(got), _train_points(want)
    assert sorted(got_points) == sorted(want_points) == [2, 3, 5]
    for s, (loss, grad_norm) in got_points.items():
        assert loss == pytest.approx(want_points[s][0], rel=RTOL), s
        assert grad_norm == pytest.approx(want_points[s][1], rel=RTOL), s
    val_two = [r["val_loss"]["npy"] for r in got if r["kind"] == "eval"]
    val_one = [r["val_loss"]["npy"] for r in want if r["kind"] == "eval"]
    assert len(val_two) == 2 and val_two == pytest.approx(val_one, rel=RTOL)  # at steps 3 and 5
    # The loss moved: equal numbers are not equal because nothing trained.
    assert abs(want_points[5][0] - want_points[2][0]) > 1e-3
