"""TPU kernel choices judged ahead of time: compile each alternative for a TPU chip from this
CPU host (libtpu's compiler) at OLMoE-1B-7B's per-device size and compare what the compiler
reports. No TPU runs here: these are estimates, not timings.

For every part of the dropless MoE layer, forward + backward (jax.vjp with a cotangent):
  experts  gmm_swiglu on the tile-padded buffer: backend pallas (the project's gmm/tgmm) vs
           megablox (jax's gmm/tgmm; as gmm.py calls it, and at a larger tiling)
  router   the fused top-k router: impl pallas vs xla (and the forward alone: the backward
           is the same XLA code for both)
  rows     permute + unpermute (the row gathers): impl pallas vs xla
  layer    router + layout + permute + experts + unpermute, all-pallas vs the defaults
Reported per compiled program: cost_analysis flops / bytes accessed (XLA's counts for its
ops, each Pallas call's pl.CostEstimate for the kernels), XLA's own `optimal_seconds`, a
roofline max(flops / peak, bytes / HBM bandwidth) with the chip's published peaks, and
memory_analysis temp bytes (scratch the program needs besides arguments and outputs).

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=$PWD python3 benchmarks/tpu_kernels_aot.py [--chip v5p]

Writes results/tpu_kernels_aot_<chip>.json and .md (with --only, the parts remeasured replace
their rows). docs/tpu_kernels.md discusses the result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

from olmoe_jax.parallel.chips import CHIPS  # noqa: E402  published bf16 FLOP/s, HBM bytes/s

PEAKS = {c: (CHIPS[c].peak_bf16_flops, CHIPS[c].hbm_bytes_per_s) for c in ("v5p", "v6e")}
# OLMoE-1B-7B, one MoE layer on one device: 8,192 tokens (e.g. 2 x 4096), bf16.
T, E, K, D, F = 8192, 64, 8, 2048, 1024
TM = 128  # kernels.tile_rows at this size (average group 1,024 rows)


def parts():
    """name -> (fn, abstract args) for each alternative, forward + backward."""
    import jax
    import jax.numpy as jnp

    from olmoe_jax import kernels
    from olmoe_jax.kernels.permute import Layout

    S = jax.ShapeDtypeStruct
    bf, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    G = kernels.num_rows(T * K, E, TM)

    def fwd_bwd(f, *args):
        y, vjp = jax.vjp(f, *args)
        cot = jax.tree.map(lambda a: jnp.ones_like(a) if jnp.issubdtype(a.dtype, jnp.floating)
                           else None, y)
        return vjp(cot)

    def experts(backend):
        def fn(buf, wg, wu, wd, sizes):
            return fwd_bwd(lambda b, g, u, d: kernels.gmm_swiglu(
                b, g, u, d, sizes, tm=TM, backend=backend, platform="tpu", interpret=False),
                buf, wg, wu, wd)
        return fn, (S((G, D), bf), S((E, D, F), bf), S((E, D, F), bf), S((E, F, D), bf),
                    S((E,), i32))

    def megablox_tiled(tiling):
        # jax's megablox directly, at a larger tiling than gmm.py's (tm, 128, 128): the same
        # two grouped matmuls as gmm_swiglu's non-xla path.
        from jax.experimental.pallas.ops.tpu.megablox import gmm as mgmm

        def swiglu(b, g, u, d, sizes):
            gu = mgmm(b, jnp.concatenate([g, u], axis=2), sizes, b.dtype, tiling, None, None,
                      False, False)
            return mgmm(jax.nn.silu(gu[:, :F]) * gu[:, F:], d, sizes, b.dtype, tiling, None,
                        None, False, False)

        def fn(buf, wg, wu, wd, sizes):
            return fwd_bwd(lambda b, g, u, d: swiglu(b, g, u, d, sizes), buf, wg, wu, wd)
        return fn, experts("megablox")[1]

    def router(impl, backward=True):
        def fn(logits):
            def f(lg):
                out = kernels.router(lg, K, impl=impl, interpret=False)
                return out.weights_Tk, out.prob_mean_E, out.lse_T
            return fwd_bwd(f, logits) if backward else f(logits)
        return fn, (S((T, E), f32),)

    def rows(impl):
        def fn(x, w, dest, src, sizes, padded):
            lay = Layout(dest, src, sizes, padded)
            return fwd_bwd(lambda x, w: kernels.unpermute(
                kernels.permute(x, lay, impl=impl, interpret=False), w, lay, impl=impl,
                interpret=False), x, w)
        return fn, (S((T, D), bf), S((T, K), f32), S((T, K), i32), S((G,), i32), S((E,), i32),
                    S((E,), i32))

    def layer(gmm_backend, router_impl, row_impl):
        def fn(x, logits, wg, wu, wd):
            def f(x, lg, g, u, d):
                r = kernels.router(lg, K, impl=router_impl, interpret=False)
                lay = kernels.make_layout(r.idx_Tk, E, TM)
                buf = kernels.permute(x, lay, impl=row_impl, interpret=False)
                out = kernels.gmm_swiglu(buf, g, u, d, lay.padded_sizes_E, tm=TM,
                                         backend=gmm_backend, platform="tpu", interpret=False)
                return kernels.unpermute(out, r.weights_Tk, lay, impl=row_impl, interpret=False)
            return fwd_bwd(f, x, logits, wg, wu, wd)
        return fn, (S((T, D), bf), S((T, E), f32), S((E, D, F), bf), S((E, D, F), bf),
                    S((E, F, D), bf))

    return {
        "experts/pallas": experts("pallas"), "experts/megablox": experts("megablox"),
        "experts/megablox tiling (128, 512, 1024)": megablox_tiled((TM, 512, 1024)),
        "router/pallas": router("pallas"), "router/xla": router("xla"),
        "router forward/pallas": router("pallas", False),
        "router forward/xla": router("xla", False),
        "rows/pallas": rows("pallas"), "rows/xla": rows("xla"),
        "layer/megablox+xla router+xla rows": layer("megablox", "xla", "xla"),
        "layer/pallas+pallas router+pallas rows": layer("pallas", "pallas", "pallas"),
        "layer/pallas+xla router+xla rows": layer("pallas", "xla", "xla"),
    }


def measure(name, fn, args, chip):
    from olmoe_jax.kernels import tpu_aot

    peak_flops, hbm = PEAKS[chip]
    t0 = time.time()
    compiled = tpu_aot.compile_on_chip(fn, args, chip)
    seconds = time.time() - t0
    cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
    flops, nbytes = cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)
    row = {"part": name, "gflop": flops / 1e9, "gbytes": nbytes / 1e9,
           "roofline_ms": 1e3 * max(flops / peak_flops, nbytes / hbm),
           "bound": "compute" if flops / peak_flops > nbytes / hbm else "memory",
           "xla_optimal_ms": 1e3 * cost.get("optimal_seconds", float("nan")),
           "temp_mib": mem.temp_size_in_bytes / 2**20, "compile_s": seconds}
    print(f"  {name}: {row['roofline_ms']:.3f} ms roofline ({row['bound']}), "
          f"{row['temp_mib']:.0f} MiB temp", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chip", default="v5p", choices=sorted(PEAKS))
    ap.add_argument("--only", default="", help="comma-separated part prefixes (default: all)")
    args = ap.parse_args(argv)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from olmoe_jax.kernels import tpu_aot
    if not tpu_aot.libtpu_available():
        print("needs the libtpu package: pip install 'jax[tpu]'", file=sys.stderr)
        return 2
    only = [p for p in args.only.split(",") if p]
    table = [measure(name, fn, a, args.chip) for name, (fn, a) in parts().items()
             if not only or any(name.startswith(p) for p in only)]
    out = os.path.join(harness.RESULTS_DIR, f"tpu_kernels_aot_{args.chip}.json")
    if only and os.path.exists(out):  # remeasured parts replace theirs; the rest are kept
        new = {r["part"]: r for r in table}
        with open(out) as f:
            old_rows = json.load(f)["table"]
        table = [new.pop(r["part"], r) for r in old_rows] + list(new.values())
    peak_flops, hbm = PEAKS[args.chip]
    harness.write_results(f"tpu_kernels_aot_{args.chip}", {
        "description": (
            f"One OLMoE-1B-7B MoE layer per {args.chip} chip (T={T} tokens, E={E}, top-{K}, "
            f"D={D}, F={F}, bf16, tm={TM}), forward + backward, compiled by libtpu on a CPU "
            f"host; roofline at {peak_flops / 1e12:.0f} TFLOP/s and {hbm / 1e12:.2f} TB/s. "
            "Estimates from the compiler's cost analysis (Pallas calls: their CostEstimate), "
            "not timings."),
        "chip": args.chip, "shape": {"T": T, "E": E, "k": K, "D": D, "F": F, "tm": TM},
    }, table, [("part", "part"), ("gflop", "GFLOP"), ("gbytes", "GB accessed"),
               ("roofline_ms", "roofline ms"), ("bound", "bound"),
               ("xla_optimal_ms", "XLA optimal ms"), ("temp_mib", "temp MiB"),
               ("compile_s", "compile s")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
