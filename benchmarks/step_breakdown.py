"""Where the train step's time goes: train_step.py's model, taken apart. Each part is jitted
and timed alone (forward + backward where it has a backward), next to the time it would take
at the GEMM peak measured in the same run, so the part furthest from the peak stands out.

    python benchmarks/step_breakdown.py
    python benchmarks/step_breakdown.py --set model.moe_backend=pallas

Parts: the whole step through the jitted (not AOT) `make_train_step` (and whether calling it
again recompiles), the loss forward, its forward + backward, the optimizer update alone, the
same model with a dense SwiGLU of width k*F (equal FLOPs: what the MoE costs over its limit),
and one layer's attention, one layer's MoE block, and the lm_head + cross-entropy, each alone.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks import moe_layer as ml  # noqa: E402
from benchmarks import train_step as ts  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from olmoe_jax import kernels  # noqa: E402
from olmoe_jax.config import head_dim  # noqa: E402
from olmoe_jax.model import layers, losses, moe, transformer  # noqa: E402
from olmoe_jax.train.optimizer import make_optimizer  # noqa: E402


def fwd_bwd(f):
    """jit of (args...) -> grads of sum(f(args) * ct) w.r.t. every argument (ct: last arg)."""
    def g(*args):
        *xs, ct = args
        y, vjp = jax.vjp(f, *xs)
        return vjp(ct)
    return jax.jit(g)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--name", default="step_breakdown")
    args = ap.parse_args(argv)

    machine = harness.machine_info()
    cfg = ts.bench_config(args.set)
    m = cfg.model
    B, S, D = cfg.data.batch_size, cfg.data.seq_len, m.d_model
    N = B * S
    peak = harness.gemm_peak()["flops_per_s"]
    flops = ts.model_flops_per_step(cfg)
    print(f"Step breakdown ({m.moe_impl}/{m.moe_backend}); GEMM peak {peak / 1e9:.1f} GFLOP/s", flush=True)

    rows, times = [], {}

    def add(key, name, t, fl=None, note=""):
        times[key] = t["median_s"]
        row = {"name": name, "median_s": t["median_s"], "min_s": t["min_s"], "iters": len(t["times_s"]),
               "cpu_s": t["cpu_s"], "note": note}
        if fl:
            row.update(gflop=fl / 1e9, at_peak_s=fl / peak, vs_peak=t["median_s"] * peak / fl)
        rows.append(row)
        print(f"  {name}: {t['median_s']:.3f} s" + (f" ({row['vs_peak']:.2f} x the time at peak)" if fl else ""),
              flush=True)

    state, batch, step, _ = ts.library_step(cfg)
    box = {"s": state}

    def call():
        box["s"], metrics = step(box["s"], batch)
        jax.block_until_ready((box["s"], metrics))
    call()  # compiles
    with harness.CompileCounter() as compiles:
        t = harness.time_fn(call, warmup=1, iters=args.iters)
    add("step", "whole step (jit, donated state)", t, flops["total"],
        note=f"compilations after the first call: {compiles.count}")
    params = box["s"].params
    tx = make_optimizer(cfg)

    loss = jax.jit(lambda p, b: losses.loss_fn(p, b, cfg)[0])
    add("fwd", "loss forward", harness.time_fn(harness.jax_call(loss, params, batch), iters=args.iters), flops["total"] / 3)
    grad = jax.jit(jax.grad(lambda p, b: losses.loss_fn(p, b, cfg)[0]))
    add("grad", "loss forward + backward", harness.time_fn(harness.jax_call(grad, params, batch), iters=args.iters),
        flops["total"])
    g = grad(params, batch)
    opt_state = box["s"].opt_state
    update = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
    add("opt", "optimizer update (clip + AdamW)", harness.time_fn(harness.jax_call(update, g, opt_state, params),
                                                           iters=args.iters))

    # The MoE model's dense twin: one SwiGLU of width k*F per layer, the same active FLOPs.
    dcfg = ts.bench_config(args.set + ["model.ffn_type=dense", f"model.mlp_dim={m.top_k * m.expert_dim}"])
    dparams = transformer.init(dcfg, jax.random.PRNGKey(0))
    dgrad = jax.jit(jax.grad(lambda p, b: losses.loss_fn(p, b, dcfg)[0]))
    add("dense", f"dense twin (SwiGLU {m.top_k * m.expert_dim}) forward + backward",
        harness.time_fn(harness.jax_call(dgrad, dparams, batch), iters=args.iters), flops["total"])

    # One layer's parts alone, on activations of the step's shape.
    lay = jax.tree.map(lambda a: a[0], params["layers"])
    x = jax.random.normal(jax.random.PRNGKey(1), (B, S, D))
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    attn_p = {k: v for k, v in lay.items() if k not in ("moe", "mlp_norm", "attn_norm")}
    attn = fwd_bwd(lambda p, x: layers.attention(p, x, pos, cfg)[0])
    A = m.num_heads * head_dim(cfg)
    attn_fl = 3 * (2 * N * D * (2 * A + 2 * m.num_kv_heads * head_dim(cfg)) + 4 * B * m.num_heads * S * S * head_dim(cfg))
    add("attn", f"attention, one layer (x{m.num_layers})", harness.time_fn(harness.jax_call(attn, attn_p, x, x),
                                                                 iters=args.iters), attn_fl)
    block = fwd_bwd(lambda p, x: moe.moe_block(p, x, cfg)[0])
    add("moe", f"MoE block, one layer (x{m.num_layers})", harness.time_fn(harness.jax_call(block, lay["moe"], x, x),
                                                                 iters=args.iters), ml.expert_flops(cfg, N))
    tgt = batch["targets"]

    def head_loss(w, x):  # as loss_fn runs it: fused, in model.ce_chunks sequence chunks
        return kernels.head_cross_entropy(x, w, tgt, batch["loss_mask"], m.ce_chunks)[0]
    head = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
    add("head", "lm_head + cross-entropy (fused, chunked)",
        harness.time_fn(harness.jax_call(head, params["lm_head"], x), iters=args.iters), flops["lm_head"])

    t = times
    parts_s = m.num_layers * (t["attn"] + t["moe"]) + t["head"] + t["opt"]
    notes = [f"Sum of the parts (L x attention + L x MoE block + lm_head/CE + optimizer): {parts_s:.3f} s, "
             f"against {t['step']:.3f} s for the whole step (norms, embedding, residuals and the "
             f"router losses are not in the parts)."]
    result = {
        "description": (f"Parts of train_step.py's step ({m.moe_impl}/{m.moe_backend}, batch {B} x {S}), each "
                        f"jitted alone; 'x at peak' = time / (its matmul FLOPs / GEMM peak "
                        f"{peak / 1e9:.1f} GFLOP/s); parts without a FLOP count are memory-bound."),
        "gemm_peak_flops_per_s": peak, "model_flops": flops, "notes": notes, "machine": machine,
    }
    harness.write_results(args.name, result, rows, [
        ("name", "part"), ("median_s", "median s"), ("min_s", "min s"), ("iters", "n"), ("cpu_s", "CPU s"), ("gflop", "GFLOP"),
        ("at_peak_s", "s at GEMM peak"), ("vs_peak", "x at peak"), ("note", "note")])
    return result


if __name__ == "__main__":
    main()
