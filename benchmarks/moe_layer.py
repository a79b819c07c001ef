"""(a) One MoE layer, forward + backward: ours (each `model.moe_impl` / `model.moe_backend`)
against transformers' OlmoeSparseMoeBlock (torch, CPU, same weights, same thread count) and
against the limit, a dense SwiGLU of width k*F on every token (the same expert FLOPs).

    python benchmarks/moe_layer.py                 # 64 experts top-8, d 512, F 256, 2048 tokens
    python benchmarks/moe_layer.py --impls dropless,dense --torch-impls grouped_mm,eager

Forward + backward = y = block(x), then the gradient of <y, dy> for a fixed random dy with
respect to x and every weight (router included), on both sides. Before timing, our output
and gradients are compared with the transformers block's on the same inputs.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402  (sets JAX_PLATFORMS before jax is imported)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from olmoe_jax.config import default_config, validate  # noqa: E402
from olmoe_jax.model import layers, moe  # noqa: E402


def layer_config(d_model, num_experts, top_k, expert_dim, impl="dropless", backend="auto"):
    c = default_config()
    c.model.update(d_model=d_model, num_experts=num_experts, top_k=top_k, expert_dim=expert_dim,
                   moe_impl=impl, moe_backend=backend, compute_dtype="float32",
                   num_heads=8, num_kv_heads=8)
    return validate(c)


def layer_inputs(cfg, tokens: int, seed: int = 0):
    """One layer's MoE weights (std 0.02, as the model's init), x [1, T, D] with unit-RMS rows
    (what the pre-MoE RMSNorm feeds the block) and a random cotangent dy."""
    m = cfg.model
    D, E, F = m.d_model, m.num_experts, m.expert_dim
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    p = {"router": 0.02 * jax.random.normal(ks[0], (D, E)),
         "w_gate": 0.02 * jax.random.normal(ks[1], (E, D, F)),
         "w_up": 0.02 * jax.random.normal(ks[2], (E, D, F)),
         "w_down": 0.02 * jax.random.normal(ks[3], (E, F, D))}
    x = jax.random.normal(ks[4], (1, tokens, D))
    dy = jax.random.normal(ks[5], (1, tokens, D))
    return p, x, dy


def ours_fwd_bwd(cfg):
    """jit((p, x, dy) -> (y, dp, dx)): our block's output and the gradient of <y, dy>."""
    def f(p, x, dy):
        y, vjp = jax.vjp(lambda p, x: moe.moe_block(p, x, cfg)[0], p, x)
        dp, dx = vjp(dy)
        return y, dp, dx
    return jax.jit(f)


def dense_limit_fwd_bwd():
    """jit((w, x, dy) -> grads): one SwiGLU of width k*F on all tokens, forward + backward."""
    def f(w, x, dy):
        y, vjp = jax.vjp(lambda w, x: layers.swiglu(x, *w), w, x)
        return vjp(dy)
    return jax.jit(f)


def dense_limit_weights(cfg, seed: int = 1):
    m = cfg.model
    D, W = m.d_model, m.top_k * m.expert_dim
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (0.02 * jax.random.normal(ks[0], (D, W)), 0.02 * jax.random.normal(ks[1], (D, W)),
            0.02 * jax.random.normal(ks[2], (W, D)))


def torch_fwd_bwd(block, x, dy):
    """A call running the transformers block forward and backward (grads of x and weights)."""
    import torch

    xt = torch.from_numpy(np.array(x)).requires_grad_(True)  # a writable copy
    dyt = torch.from_numpy(np.array(dy))

    def call():
        for q in block.parameters():
            q.grad = None
        xt.grad = None
        y = block(xt)
        y.backward(dyt)
        return y
    return call, xt


def agreement_checks(cfg, p, x, dy, block, tol=1e-4, label="") -> list[dict]:
    """Our forward and gradients vs the transformers block's, on the same weights and inputs.

    tol: float32 sums in a different order differ by ~1e-6 relative; a routing or combine bug
    (a wrong expert, a missing weight) is of order 1."""
    y, dp, dx = ours_fwd_bwd(cfg)(p, x, dy)
    call, xt = torch_fwd_bwd(block, x, dy)
    y_ref = call().detach().numpy()
    F = cfg.model.expert_dim
    d_gate_up = block.experts.gate_up_proj.grad.numpy()  # [E, 2F, D]
    name = label or f"{cfg.model.moe_impl}/{cfg.model.moe_backend}"
    return [
        harness.check(f"{name} output vs transformers", harness.rel_err(y, y_ref), tol),
        harness.check(f"{name} dx", harness.rel_err(dx, xt.grad.numpy()), tol),
        harness.check(f"{name} d w_gate", harness.rel_err(
            dp["w_gate"], d_gate_up[:, :F].transpose(0, 2, 1)), tol),
        harness.check(f"{name} d w_down", harness.rel_err(
            dp["w_down"], block.experts.down_proj.grad.numpy().transpose(0, 2, 1)), tol),
        harness.check(f"{name} d router", harness.rel_err(dp["router"], block.gate.weight.grad.numpy().T), tol),
    ]


def expert_flops(cfg, tokens: int) -> float:
    """Forward + backward matmul FLOPs of the routed experts and router: 3 x (2 * T * k * 3DF
    + 2 * T * D * E) (backward = 2 x forward)."""
    m = cfg.model
    return 3.0 * (2 * tokens * m.top_k * 3 * m.d_model * m.expert_dim + 2 * tokens * m.d_model * m.num_experts)


def impl_available(cfg) -> str | None:
    """None if `cfg`'s moe_impl / moe_backend is importable and registered, else why not."""
    try:
        moe._impl(cfg)
    except (ImportError, KeyError) as e:
        return f"not available: {type(e).__name__}: {e}"
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--expert-dim", type=int, default=256)
    ap.add_argument("--impls", default="dropless/auto,dense/auto",
                    help="comma list of moe_impl[/moe_backend] to time")
    ap.add_argument("--torch-impls", default="default",
                    help="transformers experts implementations: default (what OlmoeForCausalLM "
                         "picks), grouped_mm, batched_mm, eager")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--name", default="moe_layer")
    args = ap.parse_args(argv)

    machine = harness.machine_info()
    threads = harness.match_torch_threads()
    base = layer_config(args.d_model, args.experts, args.top_k, args.expert_dim)
    T = args.tokens
    p, x, dy = layer_inputs(base, T)
    flops = expert_flops(base, T)
    print(f"MoE layer: {T} tokens, d_model {args.d_model}, {args.experts} experts top-{args.top_k}, "
          f"expert dim {args.expert_dim}; {flops / 1e9:.1f} GFLOP fwd+bwd; {threads} threads", flush=True)
    peak = harness.gemm_peak()
    print(f"  GEMM peak (jax f32 2048^3, median): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)

    torch_impls = [harness.torch_experts_impl() if s == "default" else s for s in args.torch_impls.split(",")]
    rows, checks = [], []

    def add_row(name, t, note=""):
        row = {"name": name, "median_s": t["median_s"], "min_s": t["min_s"], "iters": len(t["times_s"]),
               "cpu_s": t["cpu_s"], "gflops_per_s": flops / t["median_s"] / 1e9,
               "frac_of_gemm_peak": flops / t["median_s"] / peak["flops_per_s"], "note": note}
        rows.append(row)
        print(f"  {name}: {t['median_s']:.3f} s (median of {len(t['times_s'])})", flush=True)
        return row

    # The limit: the same expert FLOPs as one dense SwiGLU on every token.
    w = dense_limit_weights(base)
    add_row(f"dense SwiGLU width k*F={args.top_k * args.expert_dim} (limit)",
            harness.time_fn(harness.jax_call(dense_limit_fwd_bwd(), w, x[0], dy[0]), iters=args.iters))

    ours = {}
    for spec in args.impls.split(","):
        impl, _, backend = spec.partition("/")
        cfg = layer_config(args.d_model, args.experts, args.top_k, args.expert_dim, impl, backend or "auto")
        why = impl_available(cfg)
        if why:
            rows.append({"name": f"ours {spec}", "note": why})
            print(f"  ours {spec}: {why}", flush=True)
            continue
        block = harness.torch_moe_block(p, cfg)
        checks += agreement_checks(cfg, p, x, dy, block)
        harness.require(checks)
        # The dense reference does E/k times the work: time it less often.
        iters = max(2, args.iters // 2) if impl == "dense" else args.iters
        ours[spec] = add_row(f"ours {spec}", harness.time_fn(
            harness.jax_call(ours_fwd_bwd(cfg), p, x, dy), iters=iters))

    tref = {}
    for impl in torch_impls:
        cfg = layer_config(args.d_model, args.experts, args.top_k, args.expert_dim)
        block = harness.torch_moe_block(p, cfg)
        block.experts.config._experts_implementation = impl
        call, _ = torch_fwd_bwd(block, x, dy)
        iters = max(1, args.iters // 3) if impl == "eager" else args.iters
        tref[impl] = add_row(f"transformers OlmoeSparseMoeBlock ({impl})",
                             harness.time_fn(call, warmup=1, iters=iters))

    targets = []
    main_impl = next((s for s in ours if s.startswith("dropless")), None)
    if main_impl and torch_impls:
        t_ours, t_hf = ours[main_impl]["median_s"], tref[torch_impls[0]]["median_s"]
        targets.append(harness.target(f"transformers ({torch_impls[0]}) time / ours {main_impl}",
                                      t_hf / t_ours, ">=", 3.0))
        targets.append(harness.target(f"ours {main_impl} / dense limit", t_ours / rows[0]["median_s"], "<=", 2.0))
    for r in rows:
        if "median_s" in r and main_impl:
            r["vs_ours"] = r["median_s"] / ours[main_impl]["median_s"]

    result = {
        "description": (f"MoE layer forward+backward (grads of x and all weights), {T} tokens, d_model "
                        f"{args.d_model}, {args.experts} experts top-{args.top_k}, expert dim "
                        f"{args.expert_dim}, float32; {threads} threads for XLA:CPU and torch. "
                        f"GFLOP/s counts the expert + router matmuls ({flops / 1e9:.1f} GFLOP); "
                        f"GEMM peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s (jax f32 2048^3 matmul, median)."),
        "sizes": {"tokens": T, "d_model": args.d_model, "num_experts": args.experts, "top_k": args.top_k,
                  "expert_dim": args.expert_dim}, "threads": threads, "gemm_peak": peak,
        "checks": checks, "targets": targets, "machine": machine,
    }
    harness.write_results(args.name, result, rows, [
        ("name", "implementation"), ("median_s", "median s"), ("min_s", "min s"), ("iters", "n"), ("cpu_s", "CPU s"),
        ("vs_ours", "time / ours dropless"), ("gflops_per_s", "GFLOP/s"),
        ("frac_of_gemm_peak", "of GEMM peak"), ("note", "note")])
    return result


if __name__ == "__main__":
    main()
