"""(b) Expert granularity at equal active FLOPs: 8 experts top-1, 16/2, 32/4, 64/8, the expert
dim scaled so that k * F (and so every token's FLOPs) stays the same. A grouped-matmul
engine that keeps up with finer experts shows flat times; the issue asks slowest / fastest
<= 1.3.

    python benchmarks/granularity.py                       # d 512, k*F 2048, 2048 tokens
    python benchmarks/granularity.py --impl dropless/xla --tokens 4096

Each configuration is first checked against transformers' OlmoeSparseMoeBlock on the same
weights (output and gradients), then timed forward + backward as in moe_layer.py.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402  (sets JAX_PLATFORMS before jax is imported)
from benchmarks import moe_layer as ml  # noqa: E402

SWEEP = ((8, 1), (16, 2), (32, 4), (64, 8))  # (experts, top-k): OLMoE's granularity ablation


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--active-width", type=int, default=2048, help="k * F, constant over the sweep")
    ap.add_argument("--impl", default="dropless/auto", help="moe_impl[/moe_backend]")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--name", default="granularity")
    args = ap.parse_args(argv)

    machine = harness.machine_info()
    threads = harness.match_torch_threads()
    impl, _, backend = args.impl.partition("/")
    backend = backend or "auto"
    T, D, W = args.tokens, args.d_model, args.active_width
    print(f"Granularity sweep: {T} tokens, d_model {D}, k*F = {W}, {args.impl}; {threads} threads", flush=True)
    peak = harness.gemm_peak()
    print(f"  GEMM peak (jax f32 2048^3, median): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)

    rows, checks = [], []
    # The limit at every point: the same FLOPs as one dense SwiGLU of width k*F.
    base = ml.layer_config(D, SWEEP[0][0], SWEEP[0][1], W // SWEEP[0][1])
    _, x, dy = ml.layer_inputs(base, T)
    t = harness.time_fn(harness.jax_call(ml.dense_limit_fwd_bwd(), ml.dense_limit_weights(base), x[0], dy[0]),
                        iters=args.iters)
    limit_s = t["median_s"]
    rows.append({"name": f"dense SwiGLU width {W} (limit)", "median_s": limit_s, "min_s": t["min_s"],
                 "iters": len(t["times_s"]), "cpu_s": t["cpu_s"]})
    print(f"  dense limit: {limit_s:.3f} s", flush=True)

    times = {}
    for E, k in SWEEP:
        if W % k:
            raise SystemExit(f"--active-width {W} is not divisible by top-k {k}")
        cfg = ml.layer_config(D, E, k, W // k, impl, backend)
        why = ml.impl_available(cfg)
        if why:
            raise SystemExit(f"{args.impl}: {why}")
        p, x, dy = ml.layer_inputs(cfg, T)
        checks += ml.agreement_checks(cfg, p, x, dy, harness.torch_moe_block(p, cfg), label=f"E{E} k{k}")
        harness.require(checks)
        t = harness.time_fn(harness.jax_call(ml.ours_fwd_bwd(cfg), p, x, dy), iters=args.iters)
        flops = ml.expert_flops(cfg, T)
        times[(E, k)] = t["median_s"]
        rows.append({"name": f"{E} experts top-{k}, F={W // k}", "median_s": t["median_s"],
                     "min_s": t["min_s"], "iters": len(t["times_s"]), "cpu_s": t["cpu_s"], "vs_limit": t["median_s"] / limit_s,
                     "gflops_per_s": flops / t["median_s"] / 1e9,
                     "frac_of_gemm_peak": flops / t["median_s"] / peak["flops_per_s"]})
        print(f"  {E} experts top-{k}, F={W // k}: {t['median_s']:.3f} s", flush=True)

    spread = max(times.values()) / min(times.values())
    targets = [harness.target("slowest / fastest over the sweep", spread, "<=", 1.3)]
    result = {
        "description": (f"Granularity at equal active FLOPs: ours {args.impl}, forward+backward, {T} tokens, "
                        f"d_model {D}, k*F = {W}, float32, {threads} threads. GFLOP/s counts expert + "
                        f"router matmuls; GEMM peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
                        f"(jax f32 2048^3 matmul, median)."),
        "sizes": {"tokens": T, "d_model": D, "active_width": W, "sweep": SWEEP}, "impl": args.impl,
        "threads": threads, "gemm_peak": peak, "checks": checks, "targets": targets, "machine": machine,
    }
    harness.write_results(args.name, result, rows, [
        ("name", "configuration"), ("median_s", "median s"), ("min_s", "min s"), ("iters", "n"), ("cpu_s", "CPU s"),
        ("vs_limit", "time / dense limit"), ("gflops_per_s", "GFLOP/s"), ("frac_of_gemm_peak", "of GEMM peak")])
    return result


if __name__ == "__main__":
    main()
