"""Checkpoint integrity and resharding: checksummed steps, fallback to the newest intact step,
restore on another mesh, gs:// workdir paths. In-process on the synthetic stream."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from olmoe_jax.config import ConfigError
from olmoe_jax.parallel.mesh import make_mesh
from olmoe_jax.train import checkpoint, integrity, loop
from olmoe_jax.train import step as step_lib

CKPT_EVERY = 10  # as tests/train/test_train_loop.py: the same config, so its programs are reused


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic):
    """30 steps with checkpoints at 10, 20, 30: (cfg, workdir)."""
    cfg = synthetic.tiny_config(**{"train.ckpt_every": CKPT_EVERY})
    wd = str(tmp_path_factory.mktemp("reliability") / "run")
    loop.train_on(cfg, wd, synthetic.data(cfg))
    return cfg, wd


def _copy(run, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(run[1], dst)
    return dst


def _tree(wd):
    """{path: (size, sha256)} of every file: shows that nothing was changed or deleted."""
    out = {}
    for root, _, files in os.walk(wd):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[p] = (os.path.getsize(p), hashlib.sha256(f.read()).hexdigest())
    return out


def _array_files(wd, step):
    """The OCDBT array data files of the step's train state."""
    root = os.path.join(wd, "checkpoints", str(step), "state")
    files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if os.path.basename(r) == "d"]
    assert files, root
    return sorted(files)


def _warnings(err):
    return [line for line in err.splitlines() if line.startswith("warning:")]


def _equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_every_finished_step_has_a_manifest_of_all_its_files(run):
    _, wd = run
    for step in checkpoint.checkpoint_steps(wd):
        d = os.path.join(wd, "checkpoints", str(step))
        with open(os.path.join(d, integrity.MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
        on_disk = {os.path.relpath(os.path.join(r, n), d) for r, _, ns in os.walk(d) for n in ns} - {integrity.MANIFEST}
        assert set(files) == on_disk and any("/d/" in n for n in files)  # array data included
        name = sorted(files)[0]
        with open(os.path.join(d, name), "rb") as f:  # what `sha256sum` would print
            assert files[name]["sha256"] == hashlib.sha256(f.read()).hexdigest()
        assert integrity.verify(d).status == "ok"


def test_flipped_bytes_fall_back_to_the_previous_step(run, tmp_path, capsys):
    wd = _copy(run, tmp_path)
    for path in _array_files(wd, 30):  # one flipped byte in every array file of the newest step
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    before = _tree(wd)
    capsys.readouterr()
    step, params = checkpoint.load_params_and_step(wd)
    warnings = _warnings(capsys.readouterr().err)
    assert step == 20
    assert len(warnings) == 1 and "step 30" in warnings[0] and "does not match its checksum" in warnings[0] \
        and "using step 20" in warnings[0], warnings
    _equal(params, checkpoint.load_params(run[1], 20))
    assert _tree(wd) == before  # reading falls back without changing or deleting anything
    # Asked for explicitly, the failed step is an error, not a silent substitute.
    with pytest.raises(ConfigError, match=r"no intact checkpoint.*step 30.*pass another --step"):
        checkpoint.load_params(wd, 30)


def test_truncated_file_is_skipped_and_training_resumes_from_the_step_before(run, synthetic, tmp_path, capsys):
    cfg, ref_wd = run
    wd = _copy(run, tmp_path)
    victim = _array_files(wd, 30)[0]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    truncated = _tree(os.path.join(wd, "checkpoints", "30"))
    capsys.readouterr()
    summary = loop.train_on(cfg, wd, synthetic.data(cfg))
    warnings = _warnings(capsys.readouterr().err)
    assert summary["start_step"] == 20 and summary["step"] == 30
    skipped = [w for w in warnings if "unusable" in w]
    assert len(skipped) == 1 and "step 30" in skipped[0] and "bytes" in skipped[0] and "using step 20" in skipped[0]
    # Training writes step 30 again, so the failed one was moved aside, intact, not deleted.
    moved = [n for n in os.listdir(os.path.join(wd, "checkpoints")) if n.startswith("30.failed-")]
    assert len(moved) == 1 and any("moved checkpoint step 30" in w for w in warnings)
    kept = {p.replace(os.path.join("checkpoints", moved[0]), os.path.join("checkpoints", "30")): v
            for p, v in _tree(os.path.join(wd, "checkpoints", moved[0])).items()}
    assert kept == truncated
    # The resumed run retrains 21..30 to the same bits as the run that was never damaged.
    _equal(checkpoint.load_params(wd), checkpoint.load_params(ref_wd))
    assert integrity.verify(os.path.join(wd, "checkpoints", "30")).status == "ok"


def test_no_intact_step_is_one_clear_error(run, tmp_path):
    wd = _copy(run, tmp_path)
    for step in (10, 20, 30):
        with open(_array_files(wd, step)[0], "ab") as f:
            f.write(b"x")
    before = _tree(wd)
    with pytest.raises(ConfigError) as e:
        checkpoint.load_params(wd)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no intact checkpoint in")
    assert all(f"step {s}" in msg for s in (10, 20, 30)) and "Nothing was changed" in msg
    assert _tree(wd) == before


def test_unfinished_and_unverified_steps(run, synthetic, tmp_path, capsys):
    cfg, _ = run
    wd = _copy(run, tmp_path)
    # An empty integer-named directory (a crash before Orbax wrote anything) is never a step.
    os.makedirs(os.path.join(wd, "checkpoints", "35"))
    assert checkpoint.checkpoint_steps(wd) == [10, 20, 30]
    assert checkpoint.load_params_and_step(wd)[0] == 30
    # A finished step without a manifest (saved before checksums, or the process died between
    # Orbax's commit and the manifest) is read, with a note that it was not verified.
    os.remove(os.path.join(wd, "checkpoints", "30", integrity.MANIFEST))
    capsys.readouterr()
    summary = loop.train_on(cfg, wd, synthetic.data(cfg))
    warnings = _warnings(capsys.readouterr().err)
    assert summary["start_step"] == 30
    assert len(warnings) == 1 and "step 30" in warnings[0] and "unverified" in warnings[0]


def _mesh(cfg, n, **axes):
    c = cfg.copy_and_resolve_references()
    c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    c.mesh.update(axes)
    return make_mesh(c, jax.devices()[:n])


@pytest.mark.parametrize("write,read", [((8, {"fsdp": 8}), (4, {"fsdp": 2, "data": 2})),
                                        ((8, {"fsdp": 8}), (1, {})),
                                        ((1, {}), (8, {"fsdp": 4, "expert": 2}))])
def test_restore_on_another_mesh_is_exact(run, tmp_path, write, read):
    """The train state written on one mesh restores on another with the same bits."""
    cfg, wd = run
    src_mesh, dst_mesh = _mesh(cfg, write[0], **write[1]), _mesh(cfg, read[0], **read[1])
    src_sh = step_lib.state_shardings(cfg, src_mesh)
    reader = checkpoint.Checkpointer(wd, keep=3, save_every=CKPT_EVERY)
    try:
        _, state = reader.restore_latest(step_lib.abstract_state(cfg, src_sh))
    finally:
        reader.close()
    other = str(tmp_path / "other")
    writer = checkpoint.Checkpointer(other, keep=1, save_every=1)
    writer.save(30, state)
    writer.close()
    dst_sh = step_lib.state_shardings(cfg, dst_mesh)
    reader = checkpoint.Checkpointer(other, keep=1, save_every=1)
    try:
        step, got = reader.restore_latest(step_lib.abstract_state(cfg, dst_sh))
    finally:
        reader.close()
    assert step == 30
    _equal(got, state)
    assert got.params["embed"].sharding == dst_sh.params["embed"]


def test_gs_workdir_keeps_its_scheme():
    """No network: the path handling only (etils.epath, which Orbax uses too)."""
    wd = checkpoint.workdir_path("gs://bucket/run")
    assert str(wd) == "gs://bucket/run"
    assert str(checkpoint._ckpt_dir("gs://bucket/run")) == "gs://bucket/run/checkpoints"  # pylint: disable=protected-access
    assert str(wd / "config.json") == "gs://bucket/run/config.json"
    local = checkpoint.workdir_path("runs/x")
    assert str(local) == os.path.join(os.getcwd(), "runs", "x")


def test_object_store_appender_rewrites_whole_objects(tmp_path):
    """metrics.jsonl on gs:// (no append there): the object is rewritten with every line so far,
    at most every every_s seconds and on close. Exercised on a local epath."""
    from etils import epath  # pylint: disable=import-outside-toplevel

    from olmoe_jax.train import paths  # pylint: disable=import-outside-toplevel

    path = epath.Path(tmp_path / "metrics.jsonl")
    path.write_text('{"old": 1}\n')
    out = paths.ObjectAppender(path, every_s=3600)
    out.write('{"a": 1}\n')
    out.flush()  # the first flush writes; the next ones wait every_s
    out.write('{"b": 2}\n')
    out.flush()
    assert path.read_text() == '{"old": 1}\n{"a": 1}\n'
    out.close()
    assert path.read_text() == '{"old": 1}\n{"a": 1}\n{"b": 2}\n'
    assert paths.is_remote("gs://b/run") and not paths.is_remote(str(tmp_path))


def test_saving_replicated_arrays_on_cpu_runs_no_device_programs(tmp_path):
    """A CPU process's devices live in host memory: a replicated array is written from one
    copy, not sliced across its replicas by device programs (Orbax's replica-parallel saving,
    which compiled and ran a slice per replica: about 1 s of each save of the tiny model)."""
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = np.random.default_rng(0)
    state = {"w": jax.device_put(rng.standard_normal((24, 40), np.float32), replicated),
             "b": jax.device_put(rng.standard_normal((72,), np.float32), replicated)}
    jax.block_until_ready(state)
    compiles = []

    def listen(event, _secs, **_):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    writer = checkpoint.Checkpointer(str(tmp_path / "wd"), keep=1, save_every=1)
    try:
        writer.save(1, state)
    finally:
        writer.close()
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
    reader = checkpoint.Checkpointer(str(tmp_path / "wd"), keep=1, save_every=1)
    try:
        step, got = reader.restore_latest(jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state))
    finally:
        reader.close()
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(state))
