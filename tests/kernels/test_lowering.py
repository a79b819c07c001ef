"""Every Pallas kernel lowers for the accelerator it is written for, from this CPU machine.

Lowering runs Pallas's own Mosaic-TPU / Triton lowering (block-shape rules, supported ops)
and fails on what those reject; the final accelerator compile is not checked here.
"""
import jax
import jax.numpy as jnp
import pytest

from olmoe_jax.kernels import gmm_pallas, permute_pallas, router_pallas

S = jax.ShapeDtypeStruct
E, K, N, TM, G, T, D, TOPK = 8, 256, 512, 128, 1024, 512, 256, 4
NT = G // TM
I32, BF16, F32 = jnp.int32, jnp.bfloat16, jnp.float32
TILES = (S((NT,), I32), S((NT,), I32))

TPU_KERNELS = {
    "gmm": (lambda l, r, te, tv: gmm_pallas.gmm(l, r, te, tv, tm=TM, interpret=False),
            (S((G, K), BF16), S((E, K, N), BF16), *TILES)),
    "tgmm": (lambda l, d, te, tv: gmm_pallas.tgmm(l, d, te, tv, E, tm=TM, interpret=False),
             (S((G, K), BF16), S((G, N), BF16), *TILES)),
    "router": (lambda lg: router_pallas.route_topk(lg, 8, True, interpret=False),
               (S((T, 64), F32),)),
    "gather_rows": (lambda x, s, c: permute_pallas.gather_rows(x, s, c, interpret=False),
                    (S((T, D), BF16), S((G,), I32), S((G,), F32))),
    "combine_rows": (lambda b, d, w: permute_pallas.combine_rows(b, d, w, interpret=False),
                     (S((G, D), BF16), S((T, TOPK), I32), S((T, TOPK), F32))),
}
GPU_KERNELS = {
    "gmm_gpu": (lambda l, r, te, tv: gmm_pallas.gmm_gpu(l, r, te, tv, tm=TM, interpret=False),
                (S((G, K), BF16), S((E, K, N), BF16), *TILES)),
    "tgmm_gpu": (lambda l, d, te, tv: gmm_pallas.tgmm_gpu(l, d, te, tv, E, tm=TM,
                                                          interpret=False),
                 (S((G, K), BF16), S((G, N), BF16), *TILES)),
    "router": (lambda lg: router_pallas.route_topk(lg, 8, True, interpret=False,
                                                   platform="gpu"), (S((T, 64), F32),)),
}


def lowered_text(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("name", list(TPU_KERNELS))
def test_lowers_with_mosaic_tpu(name):
    fn, args = TPU_KERNELS[name]
    assert "tpu_custom_call" in lowered_text(fn, args, "tpu")


@pytest.mark.parametrize("name", list(GPU_KERNELS))
def test_lowers_with_triton(name):
    fn, args = GPU_KERNELS[name]
    assert "xla.gpu.triton" in lowered_text(fn, args, "cuda")


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
