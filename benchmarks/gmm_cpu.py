"""Grouped-matmul backends on CPU, forward + backward, against a dense matmul of equal FLOPs.

    python benchmarks/gmm_cpu.py                       # all configs, xla + ragged_dot
    python benchmarks/gmm_cpu.py --backends xla,pallas,megablox --configs small

For each config, T tokens of width D are routed top-k among E experts (uniformly at random,
so groups are ragged), laid out by `kernels.make_layout` and multiplied by [E, D, F] with
`kernels.gmm`; the loss <out, cot> is differentiated w.r.t. both operands. The baseline is the
same for one dense [T*k, D] @ [D, F] (the FLOPs of the unpadded problem). Also timed: the
permute + unpermute pair around it. Prints a markdown table of seconds and ratios and writes
JSON next to it (--out). Pallas and megablox run in interpret mode on CPU (a correctness
path, timed only to show it is not a CPU option).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from olmoe_jax import kernels

CONFIGS = {
    # name: (tokens T, d_model D, experts E, top_k, expert dim F)
    "olmoe_64x8": (8192, 512, 64, 8, 256),
    "gran_32x4": (8192, 512, 32, 4, 256),
    "design_32x1": (8192, 512, 32, 1, 256),  # the 8192x512 @ 32 x 512x256 of DESIGN.md
    "small": (1024, 256, 16, 2, 128),
}


def interleaved_times(fns, reps):
    """{name: best seconds}; every fn is compiled first, then the reps take turns, so a burst
    of load from other processes on a shared machine hits all of them alike."""
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bench_config(name, backends, reps, tm):
    T, D, E, k, F = CONFIGS[name]
    rng = np.random.default_rng(0)
    idx_Tk = jnp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :k], jnp.int32)
    layout = jax.jit(lambda i: kernels.make_layout(i, E, tm))(idx_Tk)
    x_TD = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    w_EDF = jnp.asarray(rng.standard_normal((E, D, F)) * 0.05, jnp.float32)
    buf_GD = kernels.permute(x_TD, layout)
    cot_GF = jnp.asarray(rng.standard_normal((buf_GD.shape[0], F)), jnp.float32)
    x_MD = jnp.asarray(rng.standard_normal((T * k, D)), jnp.float32)
    cot_MF = jnp.asarray(rng.standard_normal((T * k, F)), jnp.float32)
    w_Tk = jnp.full((T, k), 1.0 / k, jnp.float32)

    fns = {"dense": (jax.jit(jax.grad(lambda a, b, c: jnp.sum((a @ b) * c), argnums=(0, 1))),
                     (x_MD, w_EDF[0], cot_MF))}
    for backend in backends:
        f = jax.grad(lambda a, b, s, c, be=backend: jnp.sum(
            kernels.gmm(a, b, s, tm=tm, backend=be) * c), argnums=(0, 1))
        fns[backend] = (jax.jit(f), (buf_GD, w_EDF, layout.padded_sizes_E, cot_GF))
    # The layout is an argument, not a closed-over constant XLA would try to fold.
    rows = jax.grad(lambda a, w, lay: jnp.sum(
        kernels.unpermute(kernels.permute(a, lay) * 2.0, w, lay)), argnums=(0, 1))
    fns["permute_unpermute"] = (jax.jit(rows), (x_TD, w_Tk, layout))
    slow = [b for b in backends if b in ("pallas", "megablox", "ragged_dot")]
    best = interleaved_times({n: f for n, f in fns.items() if n not in slow}, reps)
    best.update(interleaved_times({n: fns[n] for n in slow}, 1))  # the slow ones once

    row = {"config": name, "T": T, "D": D, "E": E, "k": k, "F": F, "tm": tm,
           "padded_rows": int(layout.padded_sizes_E.sum()), "buffer_rows": buf_GD.shape[0]}
    for n, t in best.items():
        row[f"{n}_s"] = t
        row[f"{n}_ratio"] = t / best["dense"]
        if n in backends:
            print(f"  {name} {n}: {t:.4f} s = {t / best['dense']:.2f} x dense", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="olmoe_64x8,gran_32x4,design_32x1")
    ap.add_argument("--backends", default="xla,ragged_dot")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tm", type=int, default=128)
    ap.add_argument("--out", default="gmm_cpu.json")
    args = ap.parse_args()
    backends = args.backends.split(",")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; fwd+bwd seconds, best of "
          f"{args.reps}", flush=True)
    results = [bench_config(c, backends, args.reps, args.tm) for c in args.configs.split(",")]
    head = ("| config | T x D, E top-k, F | dense | " + " | ".join(backends)
            + " | permute+unpermute |")
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    for r in results:
        cells = " | ".join(f"{r[b + '_s']:.4f} s ({r[b + '_ratio']:.2f}x)" for b in backends)
        print(f"| {r['config']} | {r['T']}x{r['D']}, {r['E']} top-{r['k']}, {r['F']} | "
              f"{r['dense_s']:.4f} s | {cells} | {r['permute_unpermute_s']:.4f} s |")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
