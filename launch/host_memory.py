"""Transparent huge pages for malloc in CPU runs on Linux (glibc).

XLA:CPU allocates a step's temporaries afresh on every call (1.07 GB for the step of
benchmarks/train_step.py), glibc serves blocks that big with new mmap'd pages, and the first
touch of each 4 KiB page faults into the kernel, which zeroes it. The glibc tunable
`glibc.malloc.hugetlb=1` makes malloc advise transparent huge pages for its memory: 2 MiB
pages, 512x fewer faults. Measured on the 2-core dev machine (three alternating runs each of
that step): 2.79 / 2.13 / 2.01 s without, 2.08 / 2.01 / 1.89 s with; CPU time per step 5-8%
lower. The kernel must offer THP on request (`madvise` mode; `always` needs nothing).

glibc reads tunables when a process starts, so the `olmoe` entry point re-executes itself once
with the tunable added (`OLMOE_JAX_HUGE_PAGES=0` turns that off). The benchmarks start every
worker, ours and torch's alike, with the same environment.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "OLMOE_JAX_HUGE_PAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's THP mode (always / madvise / never), None where there is no such file."""
    try:
        with open(_THP_MODE) as f:
            text = f.read()
    except OSError:
        return None
    return next((w[1:-1] for w in text.split() if w.startswith("[")), None)


def with_huge_pages(env) -> dict | None:
    """A copy of `env` with the tunable added; None where it does not apply (not Linux, the
    kernel does not offer THP on madvise, turned off, or the tunable is already set)."""
    if not sys.platform.startswith("linux") or env.get(OPT_OUT, "1") == "0" or thp_mode() != "madvise":
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def reexec_with_huge_pages() -> None:
    """Replaces this process by itself started with the tunable, where with_huge_pages applies.
    Call first thing in an entry point: nothing before it runs twice in effect, but it runs."""
    env = with_huge_pages(os.environ)
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
