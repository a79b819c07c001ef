"""(c) + (d) The whole train step (forward, backward, AdamW) of our model against transformers'
OlmoeForCausalLM + torch.optim.AdamW: tokens/s, MFU against the GEMM peak measured in the
same run, and peak memory.

    python benchmarks/train_step.py                  # d 512, 4 layers, 8 heads, 32 experts top-4,
                                                     # expert dim 256, vocab 8192, batch 8 x 256
    python benchmarks/train_step.py --set model.moe_backend=pallas --iters 3

Both steps do the same work: cross-entropy + load-balancing loss (ours adds the router z-loss,
a [T, E] logsumexp), backward, global-norm clip 1.0, AdamW (lr 4e-4, betas 0.9/0.95, eps 1e-8,
weight decay 0.1), float32. Ours is `olmoe_jax.train.step.make_train_step` (jit, donated state);
theirs uses transformers' default attention (sdpa) and experts implementation.

Each framework runs in its own fresh process, so peak RSS (ru_maxrss) is comparable: we report
it and its growth over the RSS after imports; for ours also XLA's compiled memory_analysis()
(arguments + outputs + temporaries - donated aliases). Before timing, the two models are run on
the same weights and batch in this process and their logits and loss compared.

Model FLOPs per step (the MFU numerator), with N = active non-embedding params (attention,
router, top-k experts, norms), L layers, A = heads x head dim, S sequence length, tokens = B*S:
    6 * N * tokens  +  12 * L * A * S * tokens (attention scores and values, full S x S,
    PaLM's convention)  +  6 * d_model * vocab * tokens (lm_head).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402  (imports no jax: the torch worker stays jax-free)

SCRIPT = os.path.abspath(__file__)


def bench_config(overrides=()):
    from olmoe_jax.config import apply_overrides, default_config, validate

    c = default_config()
    c.name = "bench_train_step"
    c.model.update(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, num_kv_heads=8,
                   max_seq_len=256, num_experts=32, top_k=4, expert_dim=256,
                   compute_dtype="float32", param_dtype="float32", remat="none",
                   moe_impl="dropless", moe_backend="auto")
    c.data.update(seq_len=256, batch_size=8)
    c.optim.update(lr=4e-4, warmup_steps=0, schedule="constant")
    c.mesh.update(data=-1)
    return validate(apply_overrides(c, list(overrides)))


def model_flops_per_step(cfg) -> dict:
    """The MFU numerator (see module docstring), with its parts."""
    from olmoe_jax.config import head_dim
    from olmoe_jax.model import transformer

    m = cfg.model
    tokens = cfg.data.batch_size * cfg.data.seq_len
    _, active = transformer.count_params(cfg)
    embed_params = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    n = active - embed_params
    parts = {"dense_6NT": 6.0 * n * tokens,
             "attention": 12.0 * m.num_layers * m.num_heads * head_dim(cfg) * cfg.data.seq_len * tokens,
             "lm_head": 6.0 * m.d_model * m.vocab_size * tokens}
    return {"active_nonembed_params": n, "tokens": tokens, **parts, "total": sum(parts.values())}


def make_batch(cfg, seed: int = 0):
    """Random tokens: inputs [B, S] and the next-token targets (one stream of S + 1 tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    B, S = cfg.data.batch_size, cfg.data.seq_len
    stream = rng.integers(0, cfg.model.vocab_size, (B, S + 1), dtype=np.int32)
    return {"inputs": stream[:, :S], "targets": stream[:, 1:], "loss_mask": np.ones((B, S), np.float32)}


# --------------------------------------------------------------------------------- workers

def library_step(cfg):
    """(state, batch, step, lowered) from olmoe_jax.train.step: the real training path. `step`
    is what the training loop calls; `lowered` is the same jit, lowered, for XLA's memory
    analysis. The one place here that knows the step module's API."""
    from olmoe_jax.parallel.mesh import make_mesh
    from olmoe_jax.train import step as step_lib

    mesh = make_mesh(cfg)
    shardings = step_lib.state_shardings(cfg, mesh)
    state = step_lib.init_state(cfg, shardings)
    batch = step_lib.global_batch(make_batch(cfg), mesh)
    step = step_lib.make_train_step(cfg, mesh, shardings)
    lowered = step_lib.lower_train_step(cfg, mesh, shardings, state, batch)
    return state, batch, step, lowered


def jax_worker(args) -> dict:
    import jax

    base_rss = harness.rss_bytes()
    cfg = bench_config(args.set)
    peak_before = harness.gemm_peak()
    state, batch, step, lowered = library_step(cfg)
    ma = lowered.compile().memory_analysis()
    mem = {k: int(getattr(ma, k + "_in_bytes")) for k in
           ("argument_size", "output_size", "temp_size", "alias_size", "generated_code_size")}
    mem["xla_peak_estimate"] = mem["argument_size"] + mem["output_size"] + mem["temp_size"] - mem["alias_size"]

    box = {"state": state}

    def call():  # the step donates its input state: thread it through
        box["state"], metrics = step(box["state"], batch)
        jax.block_until_ready((box["state"], metrics))
        box["metrics"] = metrics

    call()  # the first call compiles
    harness.reset_window_peak_rss()
    with harness.CompileCounter() as compiles:
        t = harness.time_fn(call, warmup=args.warmup - 1, iters=args.iters)
    peak = harness.pooled_gemm_peak(peak_before, harness.gemm_peak())
    return {"timing": t, "gemm_peak": peak, "xla_memory": mem, "loss_last": float(box["metrics"]["loss"]),
            "recompiles_after_first_call": compiles.count, "steps_peak_rss": harness.window_peak_rss_bytes(),
            "rss_after_imports": base_rss, "peak_rss": harness.peak_rss_bytes(),
            "devices": [str(d) for d in jax.devices()]}


def torch_worker(args) -> dict:
    import torch
    from transformers import OlmoeForCausalLM

    threads = harness.match_torch_threads()
    base_rss = harness.rss_bytes()
    model = OlmoeForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    model.train()
    data = json.load(open(os.path.join(args.hf_dir, "batch.json")))
    ids = torch.tensor(data["inputs"], dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    out = {}

    def call():
        opt.zero_grad(set_to_none=True)
        res = model(input_ids=ids, labels=ids, output_router_logits=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out["loss"] = float(res.loss)

    call()  # the first step allocates the optimizer state
    harness.reset_window_peak_rss()
    t = harness.time_fn(call, warmup=args.warmup - 1, iters=args.iters)
    return {"timing": t, "threads": threads, "loss_last": out["loss"], "rss_after_imports": base_rss,
            "steps_peak_rss": harness.window_peak_rss_bytes(), "peak_rss": harness.peak_rss_bytes(),
            "attn_implementation": model.config._attn_implementation,
            "experts_implementation": model.config._experts_implementation}


# ------------------------------------------------------------------------------ the check

def agreement(cfg, hf_dir: str) -> list[dict]:
    """Our logits and loss vs OlmoeForCausalLM's on the same weights and batch; saves that
    model (and the batch) to hf_dir for the torch worker, so both time the same weights."""
    import jax
    import numpy as np
    import torch

    from olmoe_jax.model import losses, transformer
    from olmoe_jax.train.step import _keys

    harness.match_torch_threads()
    params = transformer.init(cfg, _keys(cfg.train.seed)[0])  # the train step's own init
    batch = make_batch(cfg)
    logits, _ = jax.jit(lambda p, t: transformer.apply(p, t, cfg))(params, batch["inputs"])
    model = harness.torch_olmoe(params, cfg)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(batch["inputs"], dtype=torch.long)).logits.numpy()
    ce = float(losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])[0])
    ce_ref = float(losses.cross_entropy(ref, batch["targets"], batch["loss_mask"])[0])
    checks = [harness.check("logits vs OlmoeForCausalLM", harness.rel_err(logits, ref), 1e-4),
              harness.check("cross-entropy vs OlmoeForCausalLM", abs(ce - ce_ref) / ce_ref, 1e-5)]
    model.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "batch.json"), "w") as f:
        json.dump({"inputs": np.asarray(batch["inputs"]).tolist()}, f)
    del model
    return checks


# ------------------------------------------------------------------------------ the driver

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. model.moe_backend=xla")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--torch-iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="calls before timing, the compiling one included")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="train_step")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(jax_worker(args) if args.worker == "jax" else torch_worker(args)))
        return None

    machine = harness.machine_info()
    cfg = bench_config(args.set)
    m = cfg.model
    flops = model_flops_per_step(cfg)
    tokens = flops["tokens"]
    print(f"Train step: d {m.d_model}, {m.num_layers} layers, {m.num_heads} heads, {m.num_experts} experts "
          f"top-{m.top_k}, expert dim {m.expert_dim}, vocab {m.vocab_size}, batch {cfg.data.batch_size} x "
          f"{cfg.data.seq_len}; {m.moe_impl}/{m.moe_backend}; {flops['total'] / 1e9:.1f} model GFLOP/step",
          flush=True)
    sets = sum((["--set", s] for s in args.set), [])
    with tempfile.TemporaryDirectory(prefix="olmoe_bench_") as hf_dir:
        checks = agreement(cfg, hf_dir)
        harness.require(checks)
        ours = harness.run_worker(SCRIPT, ["--worker", "jax", "--iters", str(args.iters),
                                           "--warmup", str(args.warmup), *sets])
        theirs = harness.run_worker(SCRIPT, ["--worker", "torch", "--hf-dir", hf_dir, "--iters",
                                             str(args.torch_iters), "--warmup", "1"])
    peak = ours["gemm_peak"]["flops_per_s"]

    def row(name, w, note):
        s = w["timing"]["median_s"]
        return {"name": name, "step_s": s, "min_s": w["timing"]["min_s"], "iters": len(w["timing"]["times_s"]),
                "cpu_s": w["timing"]["cpu_s"], "tokens_per_s": tokens / s, "mfu": flops["total"] / s / peak,
                "steps_peak_rss_mib": w["steps_peak_rss"] / 2**20, "peak_rss_mib": w["peak_rss"] / 2**20,
                "imports_rss_mib": w["rss_after_imports"] / 2**20, "note": note}

    mem = ours["xla_memory"]
    rows = [row(f"ours ({m.moe_impl}/{m.moe_backend}, jit, donated)", ours,
                f"XLA memory_analysis: {mem['xla_peak_estimate'] / 2**20:.0f} MiB "
                f"(args {mem['argument_size'] / 2**20:.0f}, temp {mem['temp_size'] / 2**20:.0f}, "
                f"aliased {mem['alias_size'] / 2**20:.0f}); recompiles after the first call: "
                f"{ours['recompiles_after_first_call']}"),
            row("transformers OlmoeForCausalLM + torch AdamW", theirs,
                f"attention {theirs['attn_implementation']}, experts {theirs['experts_implementation']}, "
                f"{theirs['threads']} threads")]
    speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    rows[0]["vs_transformers"], rows[1]["vs_transformers"] = speedup, 1.0
    targets = [harness.target("tokens/s ours / transformers", speedup, ">=", 3.0),
               harness.target("MFU of ours (aim)", rows[0]["mfu"], ">=", 0.5)]
    result = {
        "description": (
            f"Train step (fwd, bwd, clip, AdamW), float32, batch {cfg.data.batch_size} x {cfg.data.seq_len} = "
            f"{tokens} tokens; d_model {m.d_model}, {m.num_layers} layers, {m.num_heads} heads, "
            f"{m.num_experts} experts top-{m.top_k}, expert dim {m.expert_dim}, vocab {m.vocab_size}. "
            f"MFU = model FLOPs per step / step time / GEMM peak; model FLOPs = 6 x "
            f"{flops['active_nonembed_params'] / 1e6:.2f}M active non-embedding params x tokens + 12 x L x "
            f"heads x head_dim x seq x tokens (attention) + 6 x d_model x vocab x tokens (lm_head) = "
            f"{flops['total'] / 1e9:.1f} GFLOP; GEMM peak {peak / 1e9:.1f} GFLOP/s (jax f32 2048^3 matmul, "
            f"median of 7 calls before and 7 after the timed steps, in our worker). Memory, one fresh process per framework: peak RSS "
            f"during the timed steps (VmHWM, reset after the first step, so imports, init and "
            f"compilation are out), the process's peak RSS (ru_maxrss, everything included) and the "
            f"RSS after imports. CPU s = process CPU time per step, all threads."),
        "config": cfg.to_dict(), "model_flops": flops, "ours": ours, "transformers": theirs,
        "checks": checks, "targets": targets, "machine": machine,
    }
    harness.write_results(args.name, result, rows, [
        ("name", "step"), ("step_s", "median s/step"), ("min_s", "min s"), ("iters", "n"),
        ("cpu_s", "CPU s/step"), ("tokens_per_s", "tokens/s"), ("vs_transformers", "x transformers"),
        ("mfu", "MFU"), ("steps_peak_rss_mib", "peak RSS in steps MiB"), ("peak_rss_mib", "process peak RSS MiB"),
        ("imports_rss_mib", "RSS after imports MiB"), ("note", "note")])
    return result


if __name__ == "__main__":
    main()
