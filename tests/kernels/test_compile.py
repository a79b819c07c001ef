"""Every Pallas kernel compiles for the accelerator it is written for, from this CPU machine.

TPU (Mosaic): compiled, not only lowered, through libtpu's ahead-of-time compiler for v5p and
v6e chips (olmoe_jax/kernels/tpu_aot.py), at small sizes and at OLMoE-1B-7B's size per device
(8,192 tokens, 64 experts, top-8, d_model 2048, expert_dim 1024, bf16). A kernel that needs
more SMEM or VMEM than the chip has fails to compile (RESOURCE_EXHAUSTED), so these tests
are the memory check. The compiled cost analysis of a kernel is its pl.CostEstimate.
GPU (Triton): lowered only; compiling needs the CUDA plugin.
"""
import jax
import jax.numpy as jnp
import pytest

from olmoe_jax.kernels import gmm_pallas, permute_pallas, router_pallas, tpu_aot
from olmoe_jax.kernels.permute import num_rows

S = jax.ShapeDtypeStruct
I32, BF16, F32 = jnp.int32, jnp.bfloat16, jnp.float32

needs_libtpu = pytest.mark.skipif(
    not tpu_aot.libtpu_available(),
    reason="TPU compiles need the libtpu package (pip install 'jax[tpu]'); CI installs it")


def tpu_kernels(T, k, E, D, F, tm):
    """name -> (fn, args) for every Mosaic kernel at one MoE layer's size per device."""
    G = num_rows(T * k, E, tm)
    tiles = (S((G // tm,), I32), S((G // tm,), I32))
    gmm = lambda l, r, te, tv: gmm_pallas.gmm(l, r, te, tv, tm=tm, interpret=False)
    return {
        "gmm_gate_up": (gmm, (S((G, D), BF16), S((E, D, 2 * F), BF16), *tiles)),
        "gmm_down": (gmm, (S((G, F), BF16), S((E, F, D), BF16), *tiles)),
        # The backward's dout @ w_down^T, reading w_down [E, F, D] in place.
        "gmm_down_transposed": (lambda l, r, te, tv: gmm_pallas.gmm(
            l, r, te, tv, tm=tm, interpret=False, transpose_rhs=True),
            (S((G, D), BF16), S((E, F, D), BF16), *tiles)),
        "tgmm_gate_up": (lambda l, d, te, tv: gmm_pallas.tgmm(l, d, te, tv, E, tm=tm,
                                                              interpret=False),
                         (S((G, D), BF16), S((G, 2 * F), BF16), *tiles)),
        "router": (lambda lg: router_pallas.route_topk(lg, k, True, interpret=False),
                   (S((T, E), F32),)),
        "gather_rows": (lambda x, s, c: permute_pallas.gather_rows(x, s, c, interpret=False),
                        (S((T, D), BF16), S((G,), I32), S((G,), F32))),
        "combine_rows": (lambda b, d, w: permute_pallas.combine_rows(b, d, w, interpret=False),
                         (S((G, D), BF16), S((T, k), I32), S((T, k), F32))),
    }


# tm=64: the tile the MoE picks for small groups; F=192: a contraction not a multiple of 128.
SMALL = dict(T=512, k=4, E=8, D=256, F=192, tm=64)
OLMOE = dict(T=8192, k=8, E=64, D=2048, F=1024, tm=128)


@needs_libtpu
@pytest.mark.parametrize("name", list(tpu_kernels(**SMALL)))
def test_compiles_for_tpu_at_small_size(name):
    fn, args = tpu_kernels(**SMALL)[name]
    tpu_aot.compile_on_chip(fn, args, "v5p")


@needs_libtpu
@pytest.mark.parametrize("chip", ["v5p", "v6e"])
@pytest.mark.parametrize("name", list(tpu_kernels(**OLMOE)))
def test_compiles_for_tpu_at_olmoe_size(name, chip):
    fn, args = tpu_kernels(**OLMOE)[name]
    tpu_aot.compile_on_chip(fn, args, chip)


@needs_libtpu
def test_compiled_cost_analysis_reports_the_kernels_cost_estimate():
    # A Mosaic custom call is opaque to XLA: its cost analysis is exactly the CostEstimate.
    T, k, E, D, F, tm = OLMOE.values()
    G = num_rows(T * k, E, tm)
    fn, args = tpu_kernels(**OLMOE)["gmm_gate_up"]
    cost = tpu_aot.compile_on_chip(fn, args, "v5p").cost_analysis()
    K, N, tn = D, 2 * F, 512
    assert cost["flops"] == 2 * G * K * N
    # lhs once per 512-wide N block, every expert's weights once, the output once (bf16).
    assert cost["bytes accessed"] == 2 * (G * K * (N // tn) + E * K * N + G * N)
    assert 0 < cost["optimal_seconds"] < 1  # a roofline time, where it was NaN without one


E, K, N, TM, G, T = 8, 256, 512, 128, 1024, 512
TILES = (S((G // TM,), I32), S((G // TM,), I32))
GPU_KERNELS = {
    "gmm_gpu": (lambda l, r, te, tv: gmm_pallas.gmm_gpu(l, r, te, tv, tm=TM, interpret=False),
                (S((G, K), BF16), S((E, K, N), BF16), *TILES)),
    "tgmm_gpu": (lambda l, d, te, tv: gmm_pallas.tgmm_gpu(l, d, te, tv, E, tm=TM,
                                                          interpret=False),
                 (S((G, K), BF16), S((G, N), BF16), *TILES)),
    "router": (lambda lg: router_pallas.route_topk(lg, 8, True, interpret=False,
                                                   platform="gpu"), (S((T, 64), F32),)),
}


@pytest.mark.parametrize("name", list(GPU_KERNELS))
def test_lowers_with_triton(name):
    fn, args = GPU_KERNELS[name]
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text


@pytest.mark.parametrize("fn", [
    lambda: gmm_pallas.gmm_gpu(*(jnp.zeros(a.shape, a.dtype) for a in (
        S((G, K), F32), S((E, K, 192), F32), *TILES)), tm=TM, interpret=True),
    lambda: gmm_pallas.tgmm_gpu(*(jnp.zeros(a.shape, a.dtype) for a in (
        S((G, 192), F32), S((G, N), F32), *TILES)), E, tm=TM, interpret=True),
])
def test_triton_style_refuses_dims_its_grid_would_not_cover(fn):
    # 192 columns at a block of 128 would leave 64 uncomputed; a clear error instead.
    with pytest.raises(ValueError, match="=192 is not a multiple of its block 128"):
        fn()


@needs_libtpu
def test_live_tiles_hint_counts_the_flops_of_the_expected_tiles_and_all_streamed_bytes():
    # Expert parallelism's receive buffer holds X times the rows a device gets on average; the
    # kernel skips invalid tiles' FLOPs but its index maps still stream every tile's blocks.
    T, k, E, D, F, tm = OLMOE.values()
    G = num_rows(T * k, E, tm)
    live = G // 4 // tm

    def fn(l, r, te, tv):
        return gmm_pallas.gmm(l, r, te, tv, tm=tm, interpret=False, live_tiles=live)

    _, args = tpu_kernels(**OLMOE)["gmm_gate_up"]
    cost = tpu_aot.compile_on_chip(fn, args, "v5p").cost_analysis()
    K, N, tn = D, 2 * F, 512
    assert cost["flops"] == 2 * live * tm * K * N
    assert cost["bytes accessed"] == 2 * (G * K * (N // tn) + E * K * N + G * N)
