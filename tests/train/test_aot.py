"""`olmoe compile`: ahead-of-time TPU compilation of the train step from this CPU host.

The TPU compiles need libtpu (the `tpu` extra); without it those tests skip, saying so.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import experiments
from launch.cli import main
from olmoe_jax.config import apply_overrides
from olmoe_jax.parallel import chips
from olmoe_jax.train import aot, hlo_stats
from olmoe_jax.train.metrics import model_flops_per_token

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]')")

# tiny_dense, smaller still: the TPU compile is the test's cost (seconds on an idle 2-core host).
SMALL = ["--set", "mesh.data=1", "--set", "mesh.fsdp=-1", "--set", "model.num_layers=2",
         "--set", "data.seq_len=64", "--set", "data.batch_size=8", "--set", "model.vocab_size=512"]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name, topology, n", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-256", "v5p:4x4x8", 128), ("v5p-512", "v5p:4x8x8", 256),
    ("v4-16", "v4:2x2x2", 8), ("v5litepod-256", "v5e:16x16", 256), ("v5e-32", "v5e:4x8", 32),
    ("v6e-8", "v6e:2x4", 8), ("v5p:4x8x8", "v5p:4x8x8", 256), ("V5E:2X2", "v5e:2x2", 4),
])
def test_slice_names_follow_cloud_accelerator_types(name, topology, n):
    sl = chips.parse_slice(name)
    assert (sl.topology, sl.chips) == (topology, n)


@pytest.mark.parametrize("name", ["v5p-6", "v9-8", "v5p:2x2", "banana", "v5e:2x2x2", "v5p-7"])
def test_bad_topology_is_one_error_line_listing_the_forms(capsys, name):
    code, out, err = _run(capsys, "compile", "--experiment", "tiny_dense", "--topology", name)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not out, err
    assert name in lines[0] and "v5p-256" in lines[0] and "v5p:4x8x8" in lines[0]


def test_missing_libtpu_names_the_install(capsys, monkeypatch):
    find = importlib.util.find_spec
    monkeypatch.setattr(aot.importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else find(name, *a))
    code, _, err = _run(capsys, "compile", "-e", "tiny_dense", "-t", "v5p-8")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install -e '.[tpu]'" in err, err


def _scan_matmuls(w_LDD, x_BD):
    def body(h, w):
        return jnp.tanh(h @ w), None
    return jnp.sum(jax.lax.scan(body, x_BD, w_LDD)[0])


@needs_libtpu
def test_hlo_stats_counts_loop_bodies_per_iteration():
    """A 16-layer scan of matmuls, FSDP over 4 v5p chips: XLA's cost_analysis counts the loop
    body once; hlo_stats counts the exact FLOPs of 16 forward + 32 backward matmuls and one
    weight all-gather per layer and direction."""
    devices, sl = aot.tpu_devices("v5p:2x2x1")
    mesh = Mesh(np.array(devices), ("fsdp",))
    L, B, D = 16, 2048, 512
    w = jax.ShapeDtypeStruct((L, D, D), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp")))
    x = jax.ShapeDtypeStruct((B, D), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
    compiled = jax.jit(jax.grad(_scan_matmuls)).lower(w, x).compile()
    stats = hlo_stats.analyze(compiled.as_text(), num_devices=4, peak_flops=sl.chip.peak_bf16_flops,
                              hbm_bytes_per_s=sl.chip.hbm_bytes_per_s)
    exact = 3 * L * 2 * (B // 4) * D * D  # per chip: x@w forward; dx and dw backward
    assert stats["xla"]["flops"] == exact
    assert compiled.cost_analysis()["flops"] < exact / 8  # what hlo_stats exists to correct
    assert stats["unknown_trip_counts"] == [] and sorted(stats["loops"].values()) == [L, L]
    gathers = stats["collectives"]["all-gather"]
    assert gathers["count"] == 2 * L
    assert gathers["bytes"] == 2 * L * D * D * 2 / 4  # each gathers one bf16 layer from 4 shards
    assert gathers["wire_bytes"] == 3 * gathers["bytes"]  # ring: (n - 1) shards in


def test_hlo_stats_reads_known_trip_counts_on_cpu():
    """XLA:CPU states the trip count in the loop's backend config; the same totals follow."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
    L, B, D = 8, 64, 32
    w = jax.ShapeDtypeStruct((L, D, D), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
    x = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    text = jax.jit(jax.grad(_scan_matmuls)).lower(w, x).compile().as_text()
    stats = hlo_stats.analyze(text, num_devices=4, peak_flops=1e12, hbm_bytes_per_s=1e11)
    assert stats["xla"]["flops"] == 3 * L * 2 * (B // 4) * D * D
    assert stats["unknown_trip_counts"] == [] and stats["collectives"]


# A loop body in the form libtpu writes it: splash attention's custom call carries its
# kernel_metadata over several lines, one of them starting with "}" (the HLO walk once stopped
# reading the body there and missed everything after, the all-to-all included).
_MULTILINE_HLO = """HloModule m

FileNames
1 "/src/olmoe_jax/kernels/attention.py"

FunctionNames
1 "splash_attention"

FileLocations
1 {file_name_id=1 function_name_id=1 line=93 end_line=93 column=4 end_column=4}

StackFrames
1 {file_location_id=1 parent_frame_id=1}

%cond (c.p: (s32[], bf16[2,4,256,64])) -> pred[] {
  %c.p = (s32[], bf16[2,4,256,64]) parameter(0)
  %c.i = s32[] get-tuple-element(%c.p), index=0
  %c.n = s32[] constant(3)
  ROOT %c.lt = pred[] compare(%c.i, %c.n), direction=LT
}

%body (b.p: (s32[], bf16[2,4,256,64])) -> (s32[], bf16[2,4,256,64]) {
  %b.p = (s32[], bf16[2,4,256,64]) parameter(0)
  %b.i = s32[] get-tuple-element(%b.p), index=0
  %b.q = bf16[2,4,256,64]{3,2,1,0} get-tuple-element(%b.p), index=1
  %b.m = s8[1,2,2]{2,1,0} constant({...})
  %splash_mha_fwd.1 = bf16[2,4,256,64]{3,2,1,0} custom-call(%b.m, %b.q, %b.q, %b.q), custom_call_target="tpu_custom_call", operand_layout_constraints={s8[1,2,2]{2,1,0}, bf16[2,4,256,64]{3,2,1,0}, bf16[2,4,256,64]{3,2,1,0}, bf16[2,4,256,64]{3,2,1,0}}, frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128}"
}}, backend_config={"custom_call_config": {}}, metadata={op_name="jit(f)/splash" stack_frame_id=1}
  %b.a2a = bf16[2,4,256,64]{3,2,1,0} all-to-all(%splash_mha_fwd.1), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %b.one = s32[] constant(1)
  %b.next = s32[] add(%b.i, %b.one)
  ROOT %b.t = (s32[], bf16[2,4,256,64]) tuple(%b.next, %b.a2a)
}

ENTRY %main (q: bf16[2,4,256,64]) -> bf16[2,4,256,64] {
  %q = bf16[2,4,256,64]{3,2,1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[2,4,256,64]) tuple(%zero, %q)
  %loop = (s32[], bf16[2,4,256,64]) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[2,4,256,64]{3,2,1,0} get-tuple-element(%loop), index=1
}
"""


def test_hlo_walk_reads_instructions_that_span_lines():
    stats = hlo_stats.analyze(_MULTILINE_HLO, num_devices=4, peak_flops=1e12, hbm_bytes_per_s=1e11)
    assert stats["incomplete"] == [] and stats["loops"] == {"loop": 3}
    a2a = 2 * 4 * 256 * 64 * 2  # bytes of the exchanged buffer
    assert stats["collectives"]["all-to-all"]["count"] == 3
    assert stats["collectives"]["all-to-all"]["bytes"] == 3 * a2a
    # Splash's forward: QK^T and PV over 3 of the 2 x 2 blocks, for B 2 x H 4, T 256, hd 64.
    assert stats["pallas"]["calls"] == 3 and stats["pallas"]["without_cost"] == 0
    assert stats["pallas"]["flops"] == 3 * 2 * 2.0 * 2 * 4 * 256 * 256 * 64 * 3 / 4
    # The step time's parts by the source line that traced them.
    spot = next(h for h in stats["hotspots"] if h["where"] == "attention.py:93 splash_attention")
    assert spot["flops"] == stats["pallas"]["flops"] and spot["seconds"] > 0


def test_hlo_walk_flags_a_computation_it_could_not_read_whole():
    truncated = _MULTILINE_HLO.replace("  ROOT %b.t = (s32[], bf16[2,4,256,64]) tuple(%b.next, %b.a2a)\n", "")
    stats = hlo_stats.analyze(truncated, num_devices=4, peak_flops=1e12, hbm_bytes_per_s=1e11)
    assert stats["incomplete"] == ["body"]
    from olmoe_jax.parallel import chips  # pylint: disable=import-outside-toplevel
    est = aot._estimate(stats, chips.CHIPS["v5p"], 1.0, model_flops_device=1.0)
    assert est["mfu"] is None and "could not be read whole" in est["incomplete"]


@needs_libtpu
def test_compile_reports_memory_flops_collectives_and_estimate(tmp_path, capsys):
    out_json = tmp_path / "report.json"
    code, out, err = _run(capsys, "compile", "-e", "tiny_dense", "-t", "v5p-8", *SMALL, "--json", str(out_json))
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["target"] == "v5p:2x2x1" and r["chips"] == 4 and r["mesh"]["fsdp"] == 4
    mem = r["memory"]
    assert 0 < mem["argument_bytes"] and 0 < mem["temp_bytes"] and mem["total_bytes"] < mem["hbm_bytes"]
    assert mem["alias_bytes"] > 0  # the state is donated
    cfg = experiments.get("tiny_dense")
    apply_overrides(cfg, SMALL[1::2])
    assert r["model_flops"]["per_step"] == model_flops_per_token(cfg) * 8 * 64
    # FSDP over 4 chips: weights gathered, gradients reduced.
    assert r["collectives"]["all-gather"]["count"] > 0 and r["collectives"]["all-gather"]["bytes"] > 0
    assert {"all-reduce", "reduce-scatter"} & set(r["collectives"])
    assert r["unknown_trip_counts"] == [] and set(r["loops"].values()) >= {2}  # the layer scan
    # The compiled matmuls cover at least the model's (PaLM-counted) FLOPs, within reason.
    assert 0.5 < r["compiled"]["xla_flops"] / r["model_flops"]["per_device"] < 3
    est = r["estimate"]
    assert est["step_s"] == pytest.approx(est["xla_ops_s"] + est["pallas_s"] + est["collectives_s"])
    assert 0 < est["step_s_overlapped"] <= est["step_s"] and 0 < est["mfu"] <= est["mfu_overlapped"] < 1
    assert "memory per device" in out and "estimated step" in out


@needs_libtpu
def test_step_that_does_not_fit_is_one_line_and_exit_2(capsys):
    # tiny_dense with a 512 x 1024-token batch per v5e chip: far past its 16 GiB.
    code, out, err = _run(capsys, "compile", "-e", "tiny_dense", "-t", "v5e:2x2", "--set", "mesh.data=-1",
                          "--set", "data.batch_size=2048", "--set", "data.seq_len=1024")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not out, err
    assert "does not fit" in lines[0] and "v5e:2x2" in lines[0] and "HBM" in lines[0]


@needs_libtpu
def test_mesh_that_splits_a_torus_axis_is_one_error_line(capsys):
    # 4x8x8 chips: a mesh axis of 2 would split a physical axis, which jax.make_mesh refuses.
    code, out, err = _run(capsys, "compile", "-e", "tiny_dense", "-t", "v5p:4x8x8", "--set", "mesh.data=1",
                          "--set", "mesh.fsdp=128", "--set", "mesh.tensor=2", "--set", "data.batch_size=128")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not out, err
    assert "does not map onto the slice's torus" in lines[0] and "'tensor': 2" in lines[0]


@pytest.mark.skipif(not HAS_LIBTPU, reason="without libtpu there are no libtpu warnings to keep quiet")
def test_commands_other_than_compile_do_not_start_libtpu(tmp_path):
    """On a host without TPU devices, the CLI sets JAX_PLATFORMS before jax starts, so jax
    never opens libtpu (whose start-up prints warnings); without the guard it does."""
    if any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio")):
        pytest.skip("this host has TPU devices")
    code = ("import launch.cli as c; c._platforms_without_tpu(); import jax; "
            "print(jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    # Ignore other processes' libtpu lock, so that an unguarded start always reaches the warnings.
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[2])
    guarded = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert guarded.stdout.strip() == "cpu"
    assert "TPU" not in guarded.stderr and "libtpu" not in guarded.stderr, guarded.stderr
    bare = subprocess.run([sys.executable, "-c", code.replace("c._platforms_without_tpu(); ", "")],
                          env=env, capture_output=True, text=True, check=True)
    assert "TPU" in bare.stderr  # the warnings the guard keeps away (so this test can fail)


def test_estimate_gives_no_mfu_when_the_program_was_not_fully_weighed():
    """A program whose counted FLOPs fall short of the model's gets times as a lower bound and
    no MFU (a partial HLO walk once reported an MFU of 200%)."""
    from olmoe_jax.parallel import chips  # pylint: disable=import-outside-toplevel
    from olmoe_jax.train import aot  # pylint: disable=import-outside-toplevel
    stats = {"xla": {"seconds": 0.1, "flops": 1e12}, "pallas": {"seconds": 0.0, "flops": 0.0},
             "collectives": {}}
    chip = chips.CHIPS["v5p"]
    short = aot._estimate(stats, chip, 1.0, model_flops_device=1e13)
    assert short["mfu"] is None and "lower bound" in short["incomplete"]
    full = aot._estimate(stats, chip, 1.0, model_flops_device=1.5e12)
    assert full["incomplete"] is None and full["mfu"] == pytest.approx(1.5e12 / (0.1 * chip.peak_bf16_flops))
