"""Runs every benchmark, one fresh process each (own thread pools, own peak RSS), in one
sitting, and writes benchmarks/results/summary.md (+ .json): the issue's targets from all of
them in one table, then each benchmark's own table.

    python benchmarks/run_all.py                 # all of them: about 10 minutes on a quiet 2-core CPU
    python benchmarks/run_all.py --only moe_layer,granularity
    python benchmarks/run_all.py --set model.moe_backend=xla   # passed to train_step.py

Timings on a shared machine are noisy: the load average before and after each benchmark is
recorded, and a warning is printed when the 1-minute load was above 1 at the start.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import harness  # noqa: E402

BENCHMARKS = ("moe_layer", "granularity", "train_step", "step_breakdown")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(BENCHMARKS))
    ap.add_argument("--set", action="append", default=[], help="config override for train_step / step_breakdown")
    args = ap.parse_args(argv)

    machine = harness.machine_info()
    if machine["load_avg_1_5_15"][0] > 1:
        print(f"warning: load average {machine['load_avg_1_5_15'][0]:.2f} > 1 at start: other work "
              "shares these CPUs and the timings will be noisy", flush=True)
    runs = []
    for name in args.only.split(","):
        if name not in BENCHMARKS:
            raise SystemExit(f"--only: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        extra = sum((["--set", s] for s in args.set), []) if name in ("train_step", "step_breakdown") else []
        load0, t0 = os.getloadavg(), time.time()
        print(f"=== {name} (load {load0[0]:.2f})", flush=True)
        proc = subprocess.run([sys.executable, os.path.join(HERE, f"{name}.py"), *extra], cwd=os.path.dirname(HERE),
                              env=harness.worker_env())
        runs.append({"name": name, "returncode": proc.returncode, "wall_s": time.time() - t0,
                     "load_before": list(load0), "load_after": list(os.getloadavg())})
        print(f"=== {name}: exit {proc.returncode}, {runs[-1]['wall_s']:.0f} s", flush=True)

    summary = {"machine": machine, "runs": runs, "results": {}}
    lines = ["# Benchmark summary", "",
             f"One run of `python benchmarks/run_all.py`, started {machine['date']} on {machine['cpus_usable']} x "
             f"{machine['cpu']} (load average at start {machine['load_avg_1_5_15'][0]:.2f}); jax "
             f"{machine['jax']}, torch {machine['torch']}, transformers {machine['transformers']}; commit "
             f"{machine['git_commit']}; every benchmark process started with GLIBC_TUNABLES="
             f"'{machine['workers_glibc_tunables']}' (launch/host_memory.py).", "",
             "| benchmark | target | measured | required | |", "|---|---|---|---|---|"]
    sections = []
    for run in runs:
        path = os.path.join(harness.RESULTS_DIR, f"{run['name']}.json")
        if run["returncode"] or not os.path.exists(path):
            lines.append(f"| {run['name']} | (failed: exit {run['returncode']}) | | | |")
            continue
        res = json.load(open(path))
        summary["results"][run["name"]] = {"targets": res.get("targets", []), "checks": res.get("checks", [])}
        for t in res.get("targets", []):
            lines.append(f"| {run['name']} | {t['name']} | {t['value']:.3g} | {t['op']} {t['bound']:g} | "
                         f"{'met' if t['met'] else '**not met**'} |")
        with open(os.path.join(harness.RESULTS_DIR, f"{run['name']}.md")) as f:
            sections.append(f.read())
        sections.append(f"(load average {run['load_before'][0]:.2f} before, {run['load_after'][0]:.2f} after; "
                        f"{run['wall_s']:.0f} s wall)\n")
    md = "\n".join(lines + [""] + sections)
    with open(os.path.join(harness.RESULTS_DIR, "summary.md"), "w") as f:
        f.write(md)
    with open(os.path.join(harness.RESULTS_DIR, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(lines), flush=True)
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
