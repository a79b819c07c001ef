"""`olmoe launch`: the dry-run text for a TPU pod and a SLURM job, the local launcher's process
handling, how a process learns its place in a multi-process run, and usage errors.

The local launcher's real 2-process training run is tests/train/test_multiprocess.py.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import jax
import pytest

from launch import launcher_local as local
from launch.cli import main
from olmoe_jax.config import ConfigError
from olmoe_jax.parallel import distributed
from olmoe_jax.parallel.distributed import Plan, plan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _olmoe(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- dry runs: exactly what would run -------------------------------------------------------

def test_tpu_dry_run_is_one_ssh_to_every_worker(capsys):
    code, out, err = _olmoe(capsys, "launch", "tpu", "--tpu", "pod-256", "--zone", "us-east5-a",
                            "--project", "my-proj", "--remote-dir", "~/olmoe-jax", "--dry-run", "--",
                            "train", "--experiment", "olmoe_1b7b", "--workdir", "gs://bucket/runs/a",
                            "--set", "data.path=/data/mix/*.npy")
    assert code == 0, err
    assert out == (
        "gcloud compute tpus tpu-vm ssh pod-256 --zone=us-east5-a --project=my-proj --worker=all --command "
        "'cd ~/olmoe-jax && OLMOE_JAX_DISTRIBUTED=jax olmoe train --experiment olmoe_1b7b "
        "--workdir gs://bucket/runs/a --set '\"'\"'data.path=/data/mix/*.npy'\"'\"''\n")
    # The printed line is a shell command: the remote command survives the quoting intact.
    argv = shlex.split(out)
    assert argv[-2] == "--command"
    assert shlex.split(argv[-1]) == ["cd", "~/olmoe-jax", "&&", "OLMOE_JAX_DISTRIBUTED=jax", "olmoe", "train",
                                     "--experiment", "olmoe_1b7b", "--workdir", "gs://bucket/runs/a",
                                     "--set", "data.path=/data/mix/*.npy"]


def test_tpu_dry_run_runs_a_sweep_side_by_side_on_two_slices(capsys, tmp_path):
    cmds = tmp_path / "sweep.txt"
    cmds.write_text("# an ablation, 3 runs\n"
                    "olmoe train -e olmoe_1b7b --workdir gs://b/e64 --set model.num_experts=64\n"
                    "train -e olmoe_1b7b --workdir gs://b/e32 --set model.num_experts=32\n"
                    "\n"
                    "train -e olmoe_1b7b --workdir gs://b/e16 --set model.num_experts=16\n")
    code, out, err = _olmoe(capsys, "launch", "tpu", "--tpu", "v5p-64-a,v5p-64-b", "--zone", "z",
                            "--log-dir", "/logs", "--commands", str(cmds), "--dry-run")
    assert code == 0, err
    run = "OLMOE_JAX_DISTRIBUTED=jax olmoe train -e olmoe_1b7b --workdir gs://b/"
    assert out == (
        "(\n"
        "  gcloud compute tpus tpu-vm ssh v5p-64-a --zone=z --worker=all --command "
        f"'( rc=0; {run}e64 --set model.num_experts=64 || rc=$?; "
        f"{run}e16 --set model.num_experts=16 || rc=$?; exit $rc )' > /logs/v5p-64-a.log 2>&1\n"
        ") &\n"
        "(\n"
        "  gcloud compute tpus tpu-vm ssh v5p-64-b --zone=z --worker=all --command "
        f"'{run}e32 --set model.num_experts=32' > /logs/v5p-64-b.log 2>&1\n"
        ") &\n"
        "wait\n")


def test_slurm_dry_run_prints_the_sbatch_script_and_its_submission(capsys):
    code, out, err = _olmoe(capsys, "launch", "slurm", "--nodes", "4", "--gpus-per-node", "8",
                            "--partition", "gpu", "--time", "24:00:00", "--job-name", "moe",
                            "--setup", "source ~/venv/bin/activate", "--dry-run", "--",
                            "train", "--experiment", "olmoe_1b7b", "--workdir", "/shared/runs/a")
    assert code == 0, err
    assert out == """cat > moe.sbatch <<'OLMOE_SBATCH'
#!/bin/bash
#SBATCH --job-name=moe
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --partition=gpu
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
# Written by `olmoe launch slurm`. One process per GPU: jax's SLURM detection takes the
# process count from SLURM_NTASKS, the rank from SLURM_PROCID, the GPU from SLURM_LOCALID
# and the coordinator from the step's first node.
set -u
source ~/venv/bin/activate
export OLMOE_JAX_DISTRIBUTED=jax
status=0
srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 olmoe train --experiment olmoe_1b7b --workdir /shared/runs/a || status=$?
exit $status
OLMOE_SBATCH
sbatch moe.sbatch
"""


def test_slurm_sub_slices_split_the_nodes_and_deal_the_commands(capsys, tmp_path):
    cmds = tmp_path / "sweep.txt"
    cmds.write_text("".join(f"sweep-run --x {i}\n".replace("sweep-run", "train") for i in range(3)))
    code, out, err = _olmoe(capsys, "launch", "slurm", "--nodes", "4", "--gpus-per-node", "8",
                            "--sub-slices", "2", "--script", "/tmp/s.sbatch", "--commands", str(cmds), "--dry-run")
    assert code == 0, err
    step = "srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --exclusive olmoe train --x"
    body = out.split("export OLMOE_JAX_DISTRIBUTED=jax\n")[1]
    assert body == f"""status=0
pids=()
(  # nodes group 0: 2 run(s)
  rc=0
  {step} 0 || rc=$?
  {step} 2 || rc=$?
  exit $rc
) &
pids+=($!)
(  # nodes group 1: 1 run(s)
  rc=0
  {step} 1 || rc=$?
  exit $rc
) &
pids+=($!)
for pid in "${{pids[@]}}"; do wait "$pid" || status=$?; done
exit $status
OLMOE_SBATCH
sbatch /tmp/s.sbatch
"""


def test_local_dry_run_lists_every_process_with_its_environment(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    code, out, err = _olmoe(capsys, "launch", "local", "--processes", "2", "--devices-per-process", "4",
                            "--port", "4321", "--log-dir", "/logs", "--dry-run", "--",
                            "train", "--experiment", "tiny_moe", "--workdir", "w")
    assert code == 0, err
    env = ("OLMOE_JAX_COORDINATOR=127.0.0.1:4321 OLMOE_JAX_NUM_PROCESSES=2 OLMOE_JAX_PROCESS_ID={i} "
           "OLMOE_JAX_INIT_TIMEOUT=60 JAX_PLATFORMS=cpu "
           "XLA_FLAGS='--xla_cpu_foo=1 --xla_force_host_platform_device_count=4'")
    cmd = f"{shlex.quote(sys.executable)} -m launch.cli train --experiment tiny_moe --workdir w"
    assert out == (f"{env.format(i=0)} {cmd} &\n"
                   f"{env.format(i=1)} {cmd} > /logs/group0.run0.p1.log 2>&1 &\n"
                   "wait\n")


def test_local_sub_slices_are_process_groups_with_their_own_coordinators(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    cmds = tmp_path / "runs.txt"
    cmds.write_text("train -e a\ntrain -e b\ntrain -e c\n")
    code, out, err = _olmoe(capsys, "launch", "local", "--processes", "4", "--devices-per-process", "2",
                            "--sub-slices", "2", "--port", "5000", "--log-dir", "/l", "--commands", str(cmds),
                            "--dry-run")
    assert code == 0, err

    def proc(port, i, exp, log):
        return (f"  OLMOE_JAX_COORDINATOR=127.0.0.1:{port} OLMOE_JAX_NUM_PROCESSES=2 OLMOE_JAX_PROCESS_ID={i} "
                "OLMOE_JAX_INIT_TIMEOUT=60 JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 "
                f"{shlex.quote(sys.executable)} -m launch.cli train -e {exp} > /l/{log}.p{i}.log 2>&1 &\n")

    assert out == ("(\n" + proc(5000, 0, "a", "group0.run0") + proc(5000, 1, "a", "group0.run0") + "  wait\n"
                   + proc(5000, 0, "c", "group0.run1") + proc(5000, 1, "c", "group0.run1") + "  wait\n"
                   ") &\n(\n" + proc(5001, 0, "b", "group1.run0") + proc(5001, 1, "b", "group1.run0")
                   + "  wait\n) &\nwait\n")


@pytest.mark.parametrize("argv, message", [
    (["local", "--processes", "2"], "give the olmoe command to run after `--`"),
    (["local", "--processes", "2", "--commands", "f", "--", "train"], "not both"),
    (["local", "--processes", "2", "--", "trian", "-e", "x"], "'trian -e x' is not an olmoe command"),
    (["local", "--processes", "2", "--", "launch", "local"], "is not an olmoe command"),
    (["local", "--processes", "3", "--sub-slices", "2", "--", "train"], "--sub-slices 2 must divide --processes 3"),
    (["local", "--processes", "2", "--sub-slices", "2", "--", "train"], "only 1 command(s)"),
    (["local", "--processes", "0", "--", "train"], "--processes 0 must be at least 1"),
    (["tpu", "--tpu", "a,a", "--zone", "z", "--", "train"], "names a slice twice"),
    (["tpu", "--tpu", "a,b", "--zone", "z", "--", "train"], "2 TPU slices but only 1 command(s)"),
    (["slurm", "--nodes", "3", "--gpus-per-node", "8", "--sub-slices", "2", "--", "train"], "must divide --nodes 3"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, message):
    code, out, err = _olmoe(capsys, "launch", argv[0], "--dry-run", *argv[1:])
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1, err


# --- the local launcher's processes ---------------------------------------------------------

def _py(code: str) -> local.Proc:
    return local.Proc((sys.executable, "-c", code))


def test_a_failed_process_stops_the_rest_of_its_job():
    t = time.monotonic()
    code = local.run_job([_py("import time; time.sleep(120)"), _py("import sys; sys.exit(3)")])
    assert code == 3
    assert time.monotonic() - t < 60  # the sleeper was stopped, not waited for


def test_queues_run_in_turn_and_side_by_side(tmp_path):
    out = tmp_path / "order.txt"

    def job(tag, delay):
        return [_py(f"import time; time.sleep({delay}); open({str(out)!r}, 'a').write('{tag} ')")]

    # Queue 0: a slow job, then a quick one; queue 1: a quick one that fails, then another.
    # Side by side, queue 1 finishes both before queue 0's first; a failure stops nothing else.
    queues = [[job("a1", 3.0), job("a2", 0)], [job("b1", 0) + [_py("import sys; sys.exit(5)")], job("b2", 0)]]
    done = []
    assert local.run_queues(queues, lambda q, j, c: done.append((q, j, c))) == 5
    assert out.read_text().split() == ["b1", "b2", "a1", "a2"]
    assert sorted(done) == [(0, 0, 0), (0, 1, 0), (1, 0, 5), (1, 1, 0)]


def test_local_launch_of_a_bad_command_exits_2_with_each_process_error(tmp_path):
    # Both processes join (gloo, a free port), then refuse the command: one error line each,
    # process 0's on this terminal, process 1's in its log; the launcher passes exit code 2 on.
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-m", "launch.cli", "launch", "local", "--processes", "2",
                        "--log-dir", str(tmp_path), "--", "train"],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 2, r.stderr
    error = "olmoe train: error: pass --experiment NAME"
    assert error in r.stderr and "Traceback" not in r.stderr
    log = (tmp_path / "group0.run0.p1.log").read_text()
    assert error in log and "Traceback" not in log


# --- joining a run: olmoe_jax/parallel/distributed.py ---------------------------------------

def test_plan_from_flags_env_and_cluster_detection():
    assert plan(env={}, tpu_chips=0) == Plan("single")
    explicit = Plan("explicit", "127.0.0.1:1234", 2, 1)
    assert plan("127.0.0.1:1234", 2, 1, env={}) == explicit
    assert plan(env={"OLMOE_JAX_COORDINATOR": "127.0.0.1:1234", "OLMOE_JAX_NUM_PROCESSES": "2",
                     "OLMOE_JAX_PROCESS_ID": "1"}) == explicit
    assert plan(process_id=1, env={"OLMOE_JAX_COORDINATOR": "127.0.0.1:1234",  # a flag beats the env
                                   "OLMOE_JAX_NUM_PROCESSES": "2", "OLMOE_JAX_PROCESS_ID": "0"}) == explicit
    assert plan("h:1", 1, 0, env={}) == Plan("single")
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-04]", "SLURM_NTASKS": "32",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "5"}
    assert plan(env=slurm, tpu_chips=0) == Plan("slurm")
    assert plan(env={**slurm, "SLURM_NTASKS": "1"}, tpu_chips=0) == Plan("single")  # one task: nothing to join
    assert plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "32"}, tpu_chips=0) == Plan("single")  # the batch script
    assert plan(env={}, tpu_chips=4) == Plan("tpu")
    assert plan(env={"JAX_PLATFORMS": "cpu"}, tpu_chips=4) == Plan("single")
    assert plan(env={**slurm, "OLMOE_JAX_DISTRIBUTED": "off"}, tpu_chips=4) == Plan("single")
    assert plan(env={"OLMOE_JAX_DISTRIBUTED": "jax"}, tpu_chips=0) == Plan("jax")


@pytest.mark.parametrize("kwargs, env, message", [
    ({"num_processes": 2, "process_id": 0}, {}, "missing --coordinator"),
    ({}, {"OLMOE_JAX_PROCESS_ID": "0"}, "missing --coordinator, --num-processes"),
    ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, {}, "is not HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, "--process-id 2 must be in [0, --num-processes 2)"),
    ({"coordinator": "h:1", "num_processes": "two", "process_id": 0}, {}, "--num-processes='two' is not an integer"),
    ({}, {"OLMOE_JAX_DISTRIBUTED": "yes"}, "OLMOE_JAX_DISTRIBUTED='yes'"),
])
def test_plan_errors_name_the_flag(kwargs, env, message):
    with pytest.raises(ConfigError) as e:
        plan(**kwargs, env=env, tpu_chips=0)
    assert message in str(e.value)


def test_joining_after_the_backend_started_is_refused():
    jax.devices()  # this pytest process already runs a backend
    with pytest.raises(ConfigError, match="already running"):
        distributed.initialize(Plan("explicit", "127.0.0.1:1", 2, 0))
    distributed.initialize(Plan("single"))  # a no-op, whatever the backend does


def test_cli_takes_the_distributed_flags_before_the_command(capsys):
    code, _, err = _olmoe(capsys, "--num-processes", "2", "--process-id", "0", "experiments")
    assert code == 2 and "missing --coordinator" in err and len(err.strip().splitlines()) == 1
    code, _, err = _olmoe(capsys, "--num-processes=two", "experiments")
    assert code == 2 and "--num-processes 'two' is not an integer" in err
    code, _, err = _olmoe(capsys, "--coordinator")
    assert code == 2 and "--coordinator needs a value" in err
    code, out, err = _olmoe(capsys, "--coordinator", "h:1", "--num-processes", "1", "--process-id", "0",
                            "experiments")
    assert code == 0 and "tiny_moe" in out, err  # one process: nothing to join
