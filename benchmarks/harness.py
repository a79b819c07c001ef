"""Shared benchmark machinery: thread settings, timing, the GEMM peak, weight copies to torch,
and the JSON + markdown writers. Every number a benchmark writes is measured in its run.

Threads: XLA:CPU runs each op on one intra-op pool sized to the CPUs this process may use
(`os.sched_getaffinity`); `match_torch_threads` gives torch the same count so neither side
gets more cores than the other. Timing: `time_fn` runs warmup calls (compilation, caches),
then N timed calls, each ending in `jax.block_until_ready` (JAX dispatch is asynchronous, a
call returns before the work is done), and reports the median (robust to the noise of a
shared machine) and the min.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

# jax is imported inside the functions that use it, so that a torch-only worker process
# (train_step.py's memory measurement) does not carry jax's memory in its peak RSS.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- threads

def xla_cpu_threads() -> int:
    """Threads in XLA:CPU's intra-op pool: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def match_torch_threads() -> int:
    """Gives torch as many intra-op threads as XLA:CPU has; returns the count."""
    import torch  # only benchmarks that compare with torch import it

    n = xla_cpu_threads()
    torch.set_num_threads(n)
    return n


# -------------------------------------------------------------------------------- timing

def time_fn(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 5) -> dict:
    """Seconds per call of `fn` (which must block until its work is done): median, min, all
    (wall clock), and the median CPU seconds the process used per call (all its threads).

    On a shared machine the wall time grows with the other load while the CPU time mostly
    does not, so cpu_s / threads hints at the quiet-machine time; the wall time is the result.
    """
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "cpu_s": statistics.median(cpu)}


def jax_call(f, *args) -> Callable[[], Any]:
    """A zero-argument call of `f(*args)` that waits for the result (see module docstring)."""
    import jax

    return lambda: jax.block_until_ready(f(*args))


class CompileCounter:
    """Counts XLA compilations while active (`with CompileCounter() as c: ...; c.count`): a
    step that recompiles on its second call shows up here, whatever the jit wrapper is."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __enter__(self):
        from jax import monitoring

        self.count = 0

        def listener(event, duration, **_):
            if event == self.EVENT:
                self.count += 1
        self._listener = listener
        monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        from jax import monitoring

        monitoring.unregister_event_duration_listener(self._listener)


def gemm_peak(n: int = 2048, iters: int = 7) -> dict:
    """FLOP/s of one jitted [n, n] @ [n, n] float32 matmul on this CPU: the MFU denominator.

    Median of `iters` calls, like every other timing here, so that a ratio against it compares
    like with like on a noisy machine; the best call is also reported.
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    t = time_fn(jax_call(jax.jit(jnp.matmul), a, b), warmup=2, iters=iters)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": "float32", "flops_per_s": flops / t["median_s"],
            "best_flops_per_s": flops / t["min_s"], **t}


def pooled_gemm_peak(*peaks: dict) -> dict:
    """One peak from several `gemm_peak` runs, e.g. before and after a timed section, so that
    a slow drift of a shared machine's speed during the section moves both sides of an MFU
    ratio alike: the median and best over all their calls."""
    times = sorted(t for p in peaks for t in p["times_s"])
    flops = 2.0 * peaks[0]["n"] ** 3
    median = statistics.median(times)
    return {**peaks[0], "flops_per_s": flops / median, "best_flops_per_s": flops / times[0],
            "median_s": median, "min_s": times[0], "times_s": times,
            "cpu_s": statistics.fmean(p["cpu_s"] for p in peaks), "runs": len(peaks)}


# ------------------------------------------------------------------ relative error checks

def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| (Frobenius) in float64."""
    a = np.asarray(ours, np.float64)
    b = np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(name: str, err: float, tol: float) -> dict:
    """A numerical agreement check; printed now, and written with the results."""
    ok = err <= tol
    print(f"  check {name}: relative error {err:.2e} (tolerance {tol:.0e}) {'ok' if ok else 'FAILED'}",
          flush=True)
    return {"name": name, "rel_err": err, "tol": tol, "ok": ok}


def require(checks: list[dict]) -> None:
    """Stops the benchmark before timing if any check failed: a fast wrong answer is no result."""
    bad = [c["name"] for c in checks if not c["ok"]]
    if bad:
        raise SystemExit(f"numerical checks failed ({', '.join(bad)}); not timing a wrong answer")


# ------------------------------------------------------------- our weights -> transformers

def torch_moe_block(p, cfg):
    """transformers' OlmoeSparseMoeBlock holding the same weights as one layer's `p`.

    p: {router [D,E], w_gate/w_up [E,D,F], w_down [E,F,D]} (float32). transformers 5.x fuses
    the experts: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]; router [E, D].
    The block's expert implementation is the one OlmoeForCausalLM picks by default.
    """
    import torch
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    m = cfg.model
    hf_cfg = OlmoeConfig(hidden_size=m.d_model, intermediate_size=m.expert_dim,
                         num_experts=m.num_experts, num_experts_per_tok=m.top_k,
                         norm_topk_prob=m.norm_topk_prob,
                         experts_implementation=torch_experts_impl())
    block = OlmoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(_t(np.asarray(p["router"]).T))
        gate_up = np.concatenate([np.asarray(p["w_gate"]), np.asarray(p["w_up"])], axis=2)  # [E, D, 2F]
        block.experts.gate_up_proj.copy_(_t(gate_up.transpose(0, 2, 1)))
        block.experts.down_proj.copy_(_t(np.asarray(p["w_down"]).transpose(0, 2, 1)))
    return block


def torch_olmoe(params, cfg):
    """transformers' OlmoeForCausalLM (default attention and experts implementations) holding
    our `params` (see docs/interfaces.md for our layout; float32)."""
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    m = cfg.model
    hf_cfg = OlmoeConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.expert_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        rms_norm_eps=m.norm_eps, num_experts=m.num_experts, num_experts_per_tok=m.top_k,
        norm_topk_prob=m.norm_topk_prob, router_aux_loss_coef=m.lb_loss_weight,
        output_router_logits=True, tie_word_embeddings=False, clip_qkv=None,
        pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = OlmoeForCausalLM(hf_cfg)
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    flat = lambda w: a(w).reshape(w.shape[0], -1)  # noqa: E731  [D, H, hd] -> [D, H*hd]
    sd = {"model.embed_tokens.weight": a(params["embed"]), "model.norm.weight": a(params["final_norm"]),
          "lm_head.weight": a(params["lm_head"]).T}
    lay = params["layers"]
    for i in range(m.num_layers):
        at, pre = jax_tree_index(lay, i), f"model.layers.{i}."
        mo = at["moe"]
        sd.update({
            pre + "self_attn.q_proj.weight": flat(at["wq"]).T,
            pre + "self_attn.k_proj.weight": flat(at["wk"]).T,
            pre + "self_attn.v_proj.weight": flat(at["wv"]).T,
            pre + "self_attn.o_proj.weight": a(at["wo"]).reshape(-1, m.d_model).T,
            pre + "self_attn.q_norm.weight": a(at["q_norm"]).reshape(-1),
            pre + "self_attn.k_norm.weight": a(at["k_norm"]).reshape(-1),
            pre + "input_layernorm.weight": a(at["attn_norm"]),
            pre + "post_attention_layernorm.weight": a(at["mlp_norm"]),
            pre + "mlp.gate.weight": a(mo["router"]).T,
            pre + "mlp.experts.gate_up_proj": np.concatenate(
                [a(mo["w_gate"]), a(mo["w_up"])], axis=2).transpose(0, 2, 1),
            pre + "mlp.experts.down_proj": a(mo["w_down"]).transpose(0, 2, 1),
        })
    missing, unexpected = model.load_state_dict({k: _t(v) for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight copy to transformers: missing {missing}, unexpected {unexpected}")
    return model


def jax_tree_index(tree, i):
    """Layer i of a tree of stacked [L, ...] arrays, as numpy."""
    if isinstance(tree, dict):
        return {k: jax_tree_index(v, i) for k, v in tree.items()}
    return np.asarray(tree[i])


def torch_experts_impl() -> str:
    """The expert implementation transformers' OlmoeForCausalLM selects by default here."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    tiny = OlmoeConfig(hidden_size=16, intermediate_size=8, num_experts=2, num_experts_per_tok=1,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       vocab_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return OlmoeForCausalLM(tiny).config._experts_implementation


def _t(a):
    import torch

    return torch.from_numpy(np.array(a, np.float32))  # a writable, contiguous copy


# -------------------------------------------------------------------------------- memory

def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (ru_maxrss, in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_window_peak_rss() -> None:
    """Starts a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM;
    ru_maxrss is not affected), so that compilation and imports stay out of a step's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def window_peak_rss_bytes() -> int:
    """Peak RSS since the last reset_window_peak_rss (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_bytes() -> int:
    """This process's current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker_env() -> dict:
    """The environment of every worker process, ours and torch's alike: this one, plus malloc
    on transparent huge pages where the machine offers them, as `olmoe` runs (launch/host_memory.py)."""
    from launch.host_memory import with_huge_pages  # pylint: disable=import-outside-toplevel

    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return with_huge_pages(env) or env


def run_worker(script: str, args: list[str], timeout: float = 600) -> dict:
    """Runs `python script args` in a fresh process (its own peak RSS, its own thread pools)
    and returns the JSON object it prints on its last stdout line."""
    cmd = [sys.executable, script, *args]
    env = worker_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    sys.stdout.write("".join(l + "\n" for l in proc.stdout.splitlines()[:-1]))
    return json.loads(proc.stdout.splitlines()[-1])


# ------------------------------------------------------------------------------- results

def machine_info() -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cpus_usable": xla_cpu_threads(), "load_avg_1_5_15": list(os.getloadavg()),
        "python": platform.python_version(), "jax": version("jax"), "jaxlib": version("jaxlib"),
        "torch": version("torch"), "transformers": version("transformers"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "git_commit": _git_commit(),
        "workers_glibc_tunables": worker_env().get("GLIBC_TUNABLES", ""),
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "olmoe_jax"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out + ("+uncommitted olmoe_jax changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def target(name: str, value: float, op: str, bound: float) -> dict:
    """A pass/fail line of the issue's targets: value `op` bound, op one of >=, <=."""
    ok = value >= bound if op == ">=" else value <= bound
    print(f"  target {name}: {value:.3g} {op} {bound:g} {'MET' if ok else 'NOT MET'}", flush=True)
    return {"name": name, "value": value, "op": op, "bound": bound, "met": ok}


def write_results(name: str, result: dict, table: list[dict], columns: list[tuple[str, str]]) -> str:
    """Writes results/<name>.json (everything) and results/<name>.md (the table, targets,
    checks, machine); returns the markdown. columns: (key in each table row, header)."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    result = dict(result, table=table, machine=result.get("machine") or machine_info())
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    md = markdown(name, result, table, columns)
    with open(os.path.join(RESULTS_DIR, f"{name}.md"), "w") as f:
        f.write(md)
    print(md, flush=True)
    return md


def markdown(name: str, result: dict, table: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = [f"## {name}", "", result.get("description", ""), ""]
    lines.append("| " + " | ".join(h for _, h in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in table:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |")
    if result.get("targets"):
        lines += ["", "| target | measured | required | |", "|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['name']} | {t['value']:.3g} | {t['op']} {t['bound']:g} | "
                         f"{'met' if t['met'] else '**not met**'} |")
    if result.get("checks"):
        cs = result["checks"]
        worst = max(cs, key=lambda c: c["rel_err"] / c["tol"])
        lines += ["", f"Numerical checks against transformers before timing: {sum(c['ok'] for c in cs)} of "
                  f"{len(cs)} passed; largest relative error {worst['rel_err']:.1e} ({worst['name']}, "
                  f"tolerance {worst['tol']:.0e}). Every check is in the JSON."]
    for note in result.get("notes", []):
        lines += ["", note]
    mach = result["machine"]
    lines += ["", f"Measured {mach['date']} on {mach['cpus_usable']} x {mach['cpu']}, load average "
              f"{', '.join(f'{x:.2f}' for x in mach['load_avg_1_5_15'])} at start; jax {mach['jax']}, "
              f"torch {mach['torch']}, transformers {mach['transformers']}; commit {mach['git_commit']}.", ""]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)
