"""Processes for `olmoe launch`: N local JAX processes on 127.0.0.1, and running queues of jobs.

A *job* is a set of processes that start together and succeed together (the processes of one
multi-process run; or one `gcloud ... ssh` / `sbatch`). A *queue* is jobs run one after
another; queues run side by side. When one process of a job fails, the rest of that job are
stopped (they would otherwise wait for it until the distributed heartbeat times out).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import launch
from olmoe_jax.parallel import distributed

REPO_ROOT = str(Path(launch.__file__).resolve().parent.parent)
STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL


@dataclasses.dataclass(frozen=True)
class Proc:
    """One process: argv, extra environment (on top of this process's), and where its output
    goes (a file path; None: this terminal)."""
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    log: str | None = None

    def shell(self) -> str:
        """The process as one shell line: `K=V ... argv`."""
        return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env] + [shlex.join(self.argv)])


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports on 127.0.0.1 that nothing listens on now (the OS picks them; all
    held open until all are picked, so none comes twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def with_device_count(xla_flags: str, n: int) -> str:
    """XLA_FLAGS with --xla_force_host_platform_device_count set to n (replacing any)."""
    kept = re.sub(r"--xla_force_host_platform_device_count=\S*", "", xla_flags).split()
    return " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])


def local_job(command: list[str], *, processes: int, devices_per_process: int | None, port: int,
              init_timeout_s: int, log_prefix: str, terminal: bool) -> list[Proc]:
    """The processes of one run of `olmoe COMMAND...` over `processes` CPU processes joined at
    127.0.0.1:port (olmoe_jax/parallel/distributed.py reads the OLMOE_JAX_* variables).

    Output of process i to `<log_prefix>.p<i>.log`, but process 0's to this terminal if `terminal`.
    """
    procs = []
    for i in range(processes):
        env = [(distributed.ENV_COORDINATOR, f"127.0.0.1:{port}"),
               (distributed.ENV_NUM_PROCESSES, str(processes)),
               (distributed.ENV_PROCESS_ID, str(i)),
               (distributed.ENV_TIMEOUT, str(init_timeout_s)),
               ("JAX_PLATFORMS", "cpu")]
        if devices_per_process:
            env.append(("XLA_FLAGS", with_device_count(os.environ.get("XLA_FLAGS", ""), devices_per_process)))
        log = None if (i == 0 and terminal) else f"{log_prefix}.p{i}.log"
        procs.append(Proc((sys.executable, "-m", "launch.cli", *command), tuple(env), log))
    return procs


def _start(p: Proc) -> subprocess.Popen:
    env = {**os.environ, **dict(p.env)}
    # The children import this checkout's `launch` and `olmoe_jax`, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(x for x in (REPO_ROOT, os.environ.get("PYTHONPATH")) if x)
    out = None
    if p.log is not None:
        Path(p.log).parent.mkdir(parents=True, exist_ok=True)
        out = open(p.log, "w", encoding="utf-8")  # noqa: SIM115  # closed when the process ends
    try:
        return subprocess.Popen(p.argv, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor


def _stop(popens: list[subprocess.Popen]) -> None:
    for q in popens:
        if q.poll() is None:
            q.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for q in popens:
        try:
            q.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            q.kill()
            q.wait()


def run_job(procs: list[Proc], stop: threading.Event | None = None) -> int:
    """Starts the processes together and waits: 0 if all exit 0; else the first failure's exit
    code (the others are stopped then). `stop` set from outside stops them too (returns 130)."""
    popens = [_start(p) for p in procs]
    try:
        while True:
            codes = [q.poll() for q in popens]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or (stop is not None and stop.is_set()):
                _stop(popens)
                return failed[0] if failed else 130
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except BaseException:  # Ctrl-C (or anything) in the launcher: leave no process behind
        _stop(popens)
        raise


def run_queues(queues: list[list[list[Proc]]], on_done=None) -> int:
    """Runs each queue's jobs one after another, the queues side by side; a failed job does
    not stop its queue's later jobs (a sweep's other runs still run). `on_done(queue, job,
    code)` is called after each job. Returns 0, or the first nonzero job exit code."""
    codes: list[int] = []
    stop = threading.Event()
    lock = threading.Lock()

    def work(qi: int, queue: list[list[Proc]]) -> None:
        for ji, job in enumerate(queue):
            if stop.is_set():
                return
            code = run_job(job, stop)
            with lock:
                codes.append(code)
                if on_done is not None:
                    on_done(qi, ji, code)

    if len(queues) == 1:  # in this thread: Ctrl-C reaches run_job directly
        work(0, queues[0])
    else:
        threads = [threading.Thread(target=work, args=(qi, q), daemon=True) for qi, q in enumerate(queues)]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                time.sleep(0.2)
        except KeyboardInterrupt:
            stop.set()
            for t in threads:
                t.join()
            raise
    return next((c for c in codes if c), 0)


def as_shell(queues: list[list[list[Proc]]]) -> str:
    """What run_queues would run, as a bash script: a queue's jobs one after another, a job's
    processes and the queues in the background (`&`), then `wait`."""
    def job_text(job: list[Proc], indent: str) -> list[str]:
        lines = [f"{indent}{p.shell()}{f' > {shlex.quote(p.log)} 2>&1' if p.log else ''}"
                 + (" &" if len(job) > 1 else "") for p in job]
        return lines + ([f"{indent}wait"] if len(job) > 1 else [])

    if len(queues) == 1:
        return "\n".join(line for job in queues[0] for line in job_text(job, "")) + "\n"
    out = []
    for q in queues:
        out.append("(")
        for job in q:
            out.extend(job_text(job, "  "))
        out.append(") &")
    return "\n".join(out + ["wait"]) + "\n"
