"""Causal self-attention kernels by platform: jax's splash attention (TPU) and cuDNN (GPU).

The XLA reference (and the CPU path) is `model.layers._attend`; `model.layers.attention`
picks one of these by `model.attention_impl` (`resolve_impl`). Both kernels compute
softmax(q k^T / sqrt(hd) + causal mask) v over positions 0..T-1 with grouped-query heads
(H query heads, K kv heads, head h reads kv head h // (H / K)).

splash  jax.experimental.pallas.ops.tpu.splash_attention: a Mosaic kernel for one example
        [H, T, hd]; vmapped over the batch. Mosaic calls cannot be partitioned by GSPMD, so
        under a multi-device mesh it runs inside a shard_map over the activation layout the
        model gives it (parallel/rules.py: batch over data x fsdp x expert, heads over tensor).
        Blocks of 512 (or 256, 128: the largest dividing T) for forward and backward.
        Compiled for v5p here (tests/kernels/test_attention.py); interpret mode checks
        its numbers on CPU.
cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused attention, BTNH
        layout, bf16/fp16 only. It cannot even be lowered without the CUDA plugin, so it is
        untested here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "splash", "cudnn")


def splash_block(T: int) -> int:
    """The splash block size for sequence length T; 0 when T is not a multiple of 128."""
    return next((b for b in (512, 256, 128) if T % b == 0), 0)


def resolve_impl(impl: str, T: int, dtype, platform: str | None = None, *,
                 mesh_known: bool = True) -> str:
    """The attention implementation to run: `impl`, or for `auto` the platform's kernel where
    it applies (TPU: splash when T is a multiple of 128 and, on several devices, the mesh is
    known, since GSPMD cannot partition a Mosaic call; GPU: cudnn in bf16/fp16), else xla.
    An explicit kernel that cannot run raises ValueError naming model.attention_impl."""
    platform = platform or jax.default_backend()
    if impl not in IMPLS:
        raise ValueError(f"model.attention_impl={impl!r}; expected one of {', '.join(IMPLS)}")
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "auto":
        if platform == "tpu" and splash_block(T) and mesh_known:
            return "splash"
        if platform == "gpu" and half:
            return "cudnn"
        return "xla"
    if impl == "splash" and not splash_block(T):
        raise ValueError(f"model.attention_impl=splash needs a sequence length that is a "
                         f"multiple of 128, got {T}; use auto or xla")
    if impl == "cudnn" and (platform != "gpu" or not half):
        raise ValueError(f"model.attention_impl=cudnn needs a CUDA GPU and bf16/fp16 compute "
                         f"(got {platform}, {jnp.dtype(dtype).name}); use auto or xla")
    return impl


@functools.lru_cache(maxsize=None)
def _splash_kernel(H: int, T: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel

    b = splash_block(T)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sa.MultiHeadMask([sa.CausalMask((T, T))] * H)
    return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_local(q_BTHd, k_BTKd, v_BTKd, interpret):
    B, T, H, hd = q_BTHd.shape
    kernel = _splash_kernel(H, T, interpret)
    to_heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # [B, T, N, hd] -> [B, N, T, hd]
    q = (q_BTHd.astype(jnp.float32) * hd ** -0.5).astype(q_BTHd.dtype)  # splash has no scale
    out_BHTd = jax.vmap(kernel)(to_heads_first(q), to_heads_first(k_BTKd),
                                to_heads_first(v_BTKd))
    return to_heads_first(out_BHTd)


def splash_attention(q_BTHd, k_BTKd, v_BTKd, mesh=None, q_spec=None, kv_spec=None, *,
                     interpret: bool | None = None):
    """Causal attention [B, T, H, hd] from q [B, T, H, hd], k/v [B, T, K, hd] (K divides H).

    mesh, q_spec, kv_spec: with a mesh of more than one device the kernel runs per shard of
    q_spec (q and the output) and kv_spec (k, v): PartitionSpecs over (batch, length, heads,
    head_dim) that must keep length and head_dim whole (the model passes its activation
    table's: batch over data x fsdp x expert, heads over tensor). interpret: run Mosaic's
    interpreter (default: when jax's backend is not TPU).
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    local = functools.partial(_splash_local, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return local(q_BTHd, k_BTKd, v_BTKd)
    if q_spec is None or kv_spec is None:
        raise ValueError("splash_attention under a mesh needs q_spec and kv_spec")
    # check_vma=False: the Mosaic call has no varying-manual-axes rule.
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q_BTHd, k_BTKd, v_BTKd)


def cudnn_attention(q_BTHd, k_BTKd, v_BTKd):
    """Causal attention via cuDNN's fused kernel (GPU, bf16/fp16); same shapes as splash."""
    return jax.nn.dot_product_attention(q_BTHd, k_BTKd, v_BTKd, is_causal=True,
                                        implementation="cudnn")
