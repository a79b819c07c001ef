"""PNG figures of the analyses and of training curves, in the manner of the OLMoE paper's.

Each function takes the JSON-ready dict its analysis returns (analyses.py, curves.py) and a
path; matplotlib runs headless (Agg) and is imported only here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _plt():
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    return plt


def _pick_layers(n: int) -> list[int]:
    """First, middle and last layer (the paper shows 0, 7 and 15 of 16)."""
    return sorted({0, n // 2, n - 1})


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def saturation(result: dict, path: str) -> None:
    """Top-k overlap with the final checkpoint (%) against training progress, one line per layer."""
    plt = _plt()
    steps = result["steps"]
    sat = np.array([result["saturation"][str(s)] for s in steps])  # [S, L]
    x = 100.0 * np.array(steps) / result["final_step"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for layer in range(sat.shape[1]):
        ax.plot(x, 100 * sat[:, layer], marker="o", ms=3, label=f"layer {layer}")
    ax.set_xlabel("training progress (% of final step)")
    ax.set_ylabel(f"router saturation (% of top-{result['k']} shared with final)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def coactivation(result: dict, path: str) -> None:
    """Heat maps of N(Ei, Ej) / N(Ei) for the first, middle and last layer."""
    plt = _plt()
    layers = _pick_layers(len(result["layers"]))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        im = ax.imshow(np.array(result["layers"][layer]["ratio"]), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert j")
    axes[0, 0].set_ylabel("expert i")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="N(Ei, Ej) / N(Ei)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def domain_specialisation(result: dict, path: str) -> None:
    """Per layer (first, middle, last), the share of each domain's tokens per expert, with the
    uniform k/E as a dashed line."""
    plt = _plt()
    labels = list(result["share"])
    n_layers = len(next(iter(result["share"].values())))
    layers = _pick_layers(n_layers)
    E = result["num_experts"]
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(6, 0.28 * E * len(labels) / 2), 2.4 * len(layers)),
                             squeeze=False)
    width = 0.8 / len(labels)
    for ax, layer in zip(axes[:, 0], layers):
        for i, label in enumerate(labels):
            ax.bar(np.arange(E) + i * width - 0.4 + width / 2, result["share"][label][layer], width, label=label)
        ax.axhline(result["uniform"], color="k", ls="--", lw=1, label=f"uniform k/E = {result['uniform']:.3f}")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_ylabel("share of tokens")
        ax.set_xticks(np.arange(E))
        ax.tick_params(labelsize=6)
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].legend(fontsize=7, ncol=len(labels) + 1)
    _save(fig, path)


def vocab_specialisation(result: dict, path: str) -> None:
    """Mean share routed to a token id's top expert, per layer, for input and predicted ids."""
    plt = _plt()
    L = len(result["input"]["mean_share"])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    w = 0.38
    ax.bar(np.arange(L) - w / 2, result["input"]["mean_share"], w, label="input token id")
    ax.bar(np.arange(L) + w / 2, result["predicted"]["mean_share"], w, label="predicted token id")
    ax.axhline(result["uniform"], color="k", ls="--", lw=1, label="uniform k/E")
    ax.set_xlabel("layer")
    ax.set_ylabel("share routed to the token's top expert")
    ax.set_ylim(0, 1.15)
    ax.set_xticks(np.arange(L))
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    _save(fig, path)


def curves(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], path: str, *, ylabel: str,
           title: str = "", logx: bool = False) -> None:
    """Lines of (label, x = steps, y) on one axis, e.g. training loss of several runs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, x, y in series:
        ax.plot(x, y, label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
