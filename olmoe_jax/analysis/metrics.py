"""The four routing analyses of the OLMoE paper (section 5) as pure numpy functions.

Inputs are top-k expert ids per token, [N, k] for one layer or [L, N, k] for all; each
token's k ids are distinct (top-k of one softmax).

- router saturation: mean over tokens of |E(t) ∩ E_final(t)| / k, the overlap of a
  checkpoint's top-k set with the final checkpoint's on the same token;
- expert co-activation: N(Ei, Ej) / N(Ei), the share of tokens routed to Ei that are also
  routed to Ej (the diagonal, trivially 1, is set to 0 as in the paper's figure);
- domain specialisation: per expert, the share of a domain's tokens routed to it (top-k);
  uniform routing gives k / E;
- vocabulary specialisation: per token id (input, or predicted next), the share of its
  occurrences routed to its most frequent expert; k / E would be uniform, but a finite count
  puts the maximum above it by chance, so compare models on the same data.
"""
from __future__ import annotations

import numpy as np


def one_hot_counts(experts_Nk: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, E] 0/1: whether token n is routed to expert e."""
    out = np.zeros((experts_Nk.shape[0], num_experts), np.int64)
    np.put_along_axis(out, experts_Nk.astype(np.int64), 1, axis=1)
    return out


def saturation(experts_LNk: np.ndarray, final_LNk: np.ndarray) -> np.ndarray:
    """[L] float: mean over tokens of |top-k ∩ final top-k| / k, per layer."""
    if experts_LNk.shape != final_LNk.shape:
        raise ValueError(f"routing shapes differ: {experts_LNk.shape} vs {final_LNk.shape}")
    k = experts_LNk.shape[-1]
    same = (experts_LNk[..., :, None] == final_LNk[..., None, :]).any(-1)  # [L, N, k]
    return same.sum(-1).mean(-1) / k


def coactivation(experts_Nk: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(ratio [E, E] = N(Ei, Ej) / N(Ei) with a zero diagonal (0 where Ei got no token),
    counts [E, E] = N(Ei, Ej) with N(Ei) on the diagonal)."""
    m_NE = one_hot_counts(experts_Nk, num_experts)
    counts = m_NE.T @ m_NE
    n_i = np.diag(counts).astype(np.float64)
    ratio = np.divide(counts, n_i[:, None], out=np.zeros(counts.shape, np.float64), where=n_i[:, None] > 0)
    np.fill_diagonal(ratio, 0.0)
    return ratio, counts


def expert_share(experts_Nk: np.ndarray, num_experts: int) -> np.ndarray:
    """[E]: share of the N tokens routed (top-k) to each expert; sums to k."""
    return one_hot_counts(experts_Nk, num_experts).sum(0) / max(experts_Nk.shape[0], 1)


def vocab_specialisation(experts_Nk: np.ndarray, ids_N: np.ndarray, num_experts: int,
                         min_count: int = 1) -> dict[str, np.ndarray]:
    """Per token id occurring at least min_count times: {ids [U], count [U], top_expert [U],
    share [U] = occurrences routed to the top expert / occurrences} (ids ascending; ties
    go to the lower expert id)."""
    uniq, inverse = np.unique(ids_N, return_inverse=True)
    per_id = np.zeros((uniq.size, num_experts), np.int64)
    np.add.at(per_id, inverse, one_hot_counts(experts_Nk, num_experts))
    count = np.bincount(inverse, minlength=uniq.size)
    keep = count >= min_count
    top = per_id.argmax(1)
    share = per_id[np.arange(uniq.size), top] / np.maximum(count, 1)
    return {"ids": uniq[keep], "count": count[keep], "top_expert": top[keep], "share": share[keep]}
