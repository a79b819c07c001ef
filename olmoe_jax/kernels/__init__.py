"""Pallas kernels and their pure-XLA references for the dropless MoE, one interface each.

router    fused softmax / top-k / renormalisation / statistics, analytic backward (router.py)
permute   tokens -> expert-sorted, tile-padded rows, and unpermute (weighted combine back)
gmm       grouped matmul over tile-padded groups; backends xla | pallas | megablox |
          ragged_dot | tokamax behind one function, `auto` per platform (gmm.py); gmm_swiglu
          the routed SwiGLU experts on top of it (one fused tile loop on xla); `resolve`
          decides backend, platform, interpret mode, tile size and row/router kernels at once
head_ce   the output layer + cross-entropy in sequence chunks, gradients made on the way
          forward (no [B, T, V] logits kept)
attention splash (TPU) and cuDNN (GPU) causal attention; the XLA reference is
          model.layers (attention.py)
tpu_aot   compile for a TPU chip from any host with libtpu (compile tests, estimates)
All are pure functions on plain arrays (no config, no globals), so a shard_map over experts
can wrap them.
"""
from olmoe_jax.kernels.gmm import (BACKENDS, Engine, default_backend, gmm, gmm_swiglu, resolve,
                                   tile_owners, tile_rows)
from olmoe_jax.kernels.head_ce import head_cross_entropy
from olmoe_jax.kernels.permute import Layout, make_layout, num_rows, permute, unpermute
from olmoe_jax.kernels.router import RouterOut, router, router_reference

__all__ = [
    "BACKENDS", "Engine", "Layout", "RouterOut", "default_backend", "gmm", "gmm_swiglu", "head_cross_entropy",
    "make_layout",
    "num_rows",
    "permute", "resolve", "router", "router_reference", "tile_owners", "tile_rows", "unpermute",
]
