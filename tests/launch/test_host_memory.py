"""The `olmoe` entry point's malloc setting: huge pages where the kernel offers them on request."""
import os
import subprocess
import sys

import pytest

from launch import host_memory


@pytest.fixture
def thp(monkeypatch):
    def set_mode(mode):
        monkeypatch.setattr(host_memory, "thp_mode", lambda: mode)
    return set_mode


def test_tunable_added_once_and_kept_beside_others(thp):
    thp("madvise")
    env = host_memory.with_huge_pages({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert host_memory.with_huge_pages(env) is None  # already there: no second re-exec
    other = host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert other["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("mode, env", [("always", {}), ("never", {}), (None, {}),
                                       ("madvise", {"OLMOE_JAX_HUGE_PAGES": "0"})])
def test_not_applied_where_it_does_nothing_or_is_turned_off(thp, mode, env):
    thp(mode)
    assert host_memory.with_huge_pages(env) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path, monkeypatch):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    monkeypatch.setattr(host_memory, "_THP_MODE", str(f))
    assert host_memory.thp_mode() == "madvise"
    monkeypatch.setattr(host_memory, "_THP_MODE", str(tmp_path / "missing"))
    assert host_memory.thp_mode() is None


def test_entry_reexecs_with_the_tunable_and_runs_the_command():
    """The real entry point in a child process: the command runs once, in a process whose
    environment carries the tunable where this machine's kernel offers THP on madvise."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "OLMOE_JAX_HUGE_PAGES")}
    code = ("import os, sys; from launch import cli; "
            "cli.main = lambda: print('ran with', os.environ.get('GLIBC_TUNABLES')) or 0; cli.entry()")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    expected = "glibc.malloc.hugetlb=1" if host_memory.with_huge_pages(env) else "None"
    assert out.splitlines() == [f"ran with {expected}"]
