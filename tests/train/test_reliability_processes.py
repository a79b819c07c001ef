"""`olmoe train` in subprocesses: SIGTERM mid-run saves that step and exits 0, and the resumed
run's losses equal an uninterrupted run's bit for bit; a second signal stops at once; a run
resumes on 8, then 4, then 1 device(s); two jax.distributed processes save the same step."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from launch.launcher_local import with_device_count
from olmoe_jax.train import checkpoint, integrity

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.vocab_size=128", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
        "model.num_kv_heads=2", "model.num_experts=4", "model.top_k=2", "model.expert_dim=32",
        "data.seq_len=16", "data.batch_size=8", "data.eval_batches=0", "train.eval_every=1000",
        "train.log_every=1", "optim.warmup_steps=2", "data.source=npy", "data.tokenizer=none",
        "data.eos_id=0"]


@pytest.fixture(scope="module")
def npy(npy_tokens):
    """conftest's .npy token file: about 44k tokens, enough for the 80 steps run here."""
    return npy_tokens


def _start(npy, wd, *overrides, devices=8, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), devices))
    sets = [a for o in (*TINY, f"data.path={npy}", *overrides) for a in ("--set", o)]
    cmd = [sys.executable, "-m", "launch.cli", "train", "--experiment", "tiny_moe", "--workdir", wd, *sets]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _records(wd, kind):
    """metrics.jsonl records of `kind`; only whole lines (the run may be writing the file)."""
    path = os.path.join(wd, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _losses(wd):
    return {r["step"]: r["loss"] for r in _records(wd, "train")}


def _wait_for_step(proc, wd, step, timeout=600):
    t = time.monotonic()
    while not any(r["step"] >= step for r in _records(wd, "train")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t < timeout
        time.sleep(0.02)


def test_sigterm_saves_the_step_and_the_resumed_losses_are_bit_identical(npy, tmp_path):
    steps, every = 80, 20
    at = random.Random().randint(5, 50)  # the step after which the signal is sent
    args = (f"train.steps={steps}", f"train.ckpt_every={every}")
    ref_wd, wd = str(tmp_path / "reference"), str(tmp_path / "preempted")
    run = _start(npy, wd, *args)
    _wait_for_step(run, wd, 2)  # compiled: the reference loads the same program from the cache
    ref = _start(npy, ref_wd, *args)
    _wait_for_step(run, wd, at)
    run.send_signal(signal.SIGTERM)
    summary = _finish(run, timeout=300)
    saved = summary["step"]
    assert summary["preempted"] == "SIGTERM" and at <= saved < steps, (at, summary)
    assert max(checkpoint.checkpoint_steps(wd)) == saved, (at, saved)
    assert integrity.verify(os.path.join(wd, "checkpoints", str(saved))).status == "ok"
    assert _records(wd, "preempted")[0]["step"] == saved

    resumed = _finish(_start(npy, wd, *args))
    assert resumed["start_step"] == saved and resumed["step"] == steps
    _finish(ref)
    want, got = _losses(ref_wd), _losses(wd)
    after = [s for s in got if s > saved]
    assert len(after) >= steps - saved - 1, (saved, sorted(got))  # all but the resumed compile step
    assert {s: got[s] for s in got} == {s: want[s] for s in got}, f"signal after step {at}, saved {saved}"
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(checkpoint.load_params(wd)),
                 jax.device_get(checkpoint.load_params(ref_wd)))


def test_a_second_signal_stops_at_once(npy, tmp_path):
    wd = str(tmp_path / "twice")
    run = _start(npy, wd, "train.steps=100000", "train.ckpt_every=100000")
    _wait_for_step(run, wd, 3)
    heard = threading.Event()

    def read_stderr():
        for line in run.stderr:
            if line.startswith("received SIGTERM"):
                heard.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    run.send_signal(signal.SIGTERM)
    assert heard.wait(120)
    run.send_signal(signal.SIGTERM)
    run.wait(60)
    assert run.returncode == -signal.SIGTERM
    assert not _records(wd, "preempted") and checkpoint.checkpoint_steps(wd) == []


def test_resume_on_8_then_4_then_1_devices(npy, tmp_path):
    ref_wd, wd = str(tmp_path / "reference"), str(tmp_path / "moving")
    # optim.decay_steps fixed: with 0 the schedule would follow train.steps, which changes here.
    same = ("train.ckpt_every=4", "optim.decay_steps=12")
    first = _start(npy, wd, "train.steps=4", "mesh.data=8", *same)
    _wait_for_step(first, wd, 2)  # compiled: the reference loads the same program from the cache
    ref = _start(npy, ref_wd, "train.steps=12", "mesh.data=8", *same)
    _finish(first)
    _finish(_start(npy, wd, "train.steps=8", "mesh.data=4", *same, devices=4))
    _finish(_start(npy, wd, "train.steps=12", "mesh.data=1", *same, devices=1))
    _finish(ref)
    changes = {r["step"]: r["changes"] for r in _records(wd, "config_change")}
    assert changes == {4: ["mesh.data: 8 -> 4", "train.steps: 4 -> 8"],
                       8: ["mesh.data: 4 -> 1", "train.steps: 8 -> 12"]}
    want, got = _losses(ref_wd), _losses(wd)
    assert set(got) >= {2, 3, 4, 6, 7, 8, 10, 11, 12}
    assert [got[s] for s in (2, 3, 4)] == [want[s] for s in (2, 3, 4)]  # the same 8-device program
    # Another mesh sums the batch in another order: equal to float32 rounding, not bitwise.
    # Measured: relative differences of 0 or about 1e-7 (one float32 ulp) on steps 6-12.
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(checkpoint.load_params(wd)), jax.device_get(checkpoint.load_params(ref_wd)))


def _two_processes(wd):
    port = random.Random().randint(20_000, 40_000)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, here]))
    return [subprocess.Popen([sys.executable, os.path.join(here, "two_process_train.py"), str(i), str(port), wd],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in (0, 1)]


def _summaries(procs):
    out = []
    for p in procs:
        stdout, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        out.append(json.loads(stdout.split("SUMMARY ")[-1]))
    return out


def test_two_processes_agree_on_the_step_to_save(tmp_path):
    """jax.distributed on localhost: SIGTERM to process 1 only (jax's preemption service), then,
    resumed, SIGINT to process 0 only (flags compared at log steps): both processes save the
    same step and exit 0."""
    wd = str(tmp_path / "two")
    procs = _two_processes(wd)
    _wait_for_step(procs[0], wd, 3)
    procs[1].send_signal(signal.SIGTERM)
    first = _summaries(procs)
    assert first[0] == {**first[1], "wall_s": first[0]["wall_s"]} and first[0]["preempted"] == "SIGTERM"
    saved = first[0]["step"]
    assert checkpoint.checkpoint_steps(wd) == [saved]
    assert integrity.verify(os.path.join(wd, "checkpoints", str(saved))).status == "ok"

    procs = _two_processes(wd)
    _wait_for_step(procs[0], wd, saved + 2)
    procs[0].send_signal(signal.SIGINT)
    second = _summaries(procs)
    assert [s["start_step"] for s in second] == [saved, saved]
    assert second[0]["step"] == second[1]["step"] > saved and second[0]["preempted"] == "SIGINT"
    assert checkpoint.checkpoint_steps(wd) == [saved, second[0]["step"]]
