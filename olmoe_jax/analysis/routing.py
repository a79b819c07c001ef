"""Routing decisions of a checkpoint on labelled text: the input of every routing analysis.

`labelled_rows` tokenizes (domain, text) documents into rows per domain; `collect` runs the
model over rows and returns, per token, its id, the id the model predicts next (argmax) and
each layer's top-k experts (`transformer.apply(..., return_routing=True)`). For expert-choice
models the top-k are the router's preferences (what the token would pick), as in the paper's
analyses of token-choice models.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from olmoe_jax.data.errors import DataError
from olmoe_jax.eval.tasks import read_jsonl
from olmoe_jax.model import transformer


class Routed(NamedTuple):
    experts_LNk: np.ndarray  # int32 [L, N, k] top-k expert ids per layer and token
    inputs_N: np.ndarray  # int32 [N] token id at each position
    predicted_N: np.ndarray  # int32 [N] the model's argmax next-token id at each position


def read_labelled_jsonl(path: str, text_key: str = "text", label_key: str = "domain") -> list[tuple[str, str | list[int]]]:
    """[(label, text or token ids)] from a JSONL file of {"text": ..., "domain": ...} lines; a
    line may give "tokens": [ids] instead of text (pre-tokenized data)."""
    out: list[tuple[str, str | list[int]]] = []
    for n, d in read_jsonl(path, f"--data: a JSONL file of {{\"{text_key}\": ..., \"{label_key}\": ...}} lines"):
        body = d.get(text_key, d.get("tokens"))
        ok_body = isinstance(body, str) or (isinstance(body, list) and all(isinstance(t, int) for t in body))
        if not ok_body or not isinstance(d.get(label_key), str):
            raise DataError(f"{path}:{n}: each line needs a string \"{label_key}\" and a string \"{text_key}\" "
                            "(or \"tokens\": a list of token ids)")
        out.append((d[label_key], body))
    if not out:
        raise DataError(f"--data {path} holds no documents")
    return out


def labelled_rows(tokenizer, docs: Sequence[tuple[str, str | Sequence[int]]], seq_len: int,
                  tokens_per_label: int) -> dict[str, np.ndarray]:
    """{label: int32 [R, seq_len]}: each label's documents (text, or token ids as given), EOS
    after each, concatenated in order and cut into rows; at most tokens_per_label tokens (whole
    rows) per label; labels with less than one row are left out."""
    by_label: dict[str, list] = {}
    for label, body in docs:
        by_label.setdefault(label, []).append(body)
    out = {}
    for label, bodies in sorted(by_label.items()):
        texts = [b for b in bodies if isinstance(b, str)]
        encoded = iter(tokenizer.encode_batch(texts) if texts else [])
        stream: list[int] = []
        for b in bodies:
            stream.extend(next(encoded) if isinstance(b, str) else b)
            stream.append(tokenizer.eos_id)
            if len(stream) >= tokens_per_label:
                break
        rows = min(len(stream), tokens_per_label) // seq_len
        if rows:
            out[label] = np.asarray(stream[:rows * seq_len], np.int32).reshape(rows, seq_len)
    return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _route(params, tokens_BT, cfg):
    logits_BTV, aux = transformer.apply(params, tokens_BT, cfg, return_routing=True)
    return aux["routing"], jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)


def collect(params, cfg, rows_RT: np.ndarray, batch_size: int = 8) -> Routed:
    """Routing of every token of rows [R, T] (run batch_size rows at a time; the last batch
    is padded with copies of the first row, which are dropped). Needs an MoE model."""
    if cfg.model.ffn_type != "moe":
        raise DataError("routing analyses need an MoE model; this checkpoint has model.ffn_type="
                        f"{cfg.model.ffn_type}")
    fcfg = ml_collections.FrozenConfigDict(cfg)
    R = rows_RT.shape[0]
    experts, preds = [], []
    for start in range(0, R, batch_size):
        chunk = rows_RT[start:start + batch_size]
        n = chunk.shape[0]
        if n < batch_size:  # one program for every batch
            chunk = np.concatenate([chunk, np.repeat(rows_RT[:1], batch_size - n, axis=0)])
        r_LBTk, p_BT = jax.device_get(_route(params, jnp.asarray(chunk), cfg=fcfg))
        experts.append(r_LBTk[:, :n])
        preds.append(p_BT[:n])
    L, k = experts[0].shape[0], experts[0].shape[-1]
    return Routed(np.concatenate(experts, axis=1).reshape(L, -1, k).astype(np.int32),
                  rows_RT.reshape(-1).astype(np.int32),
                  np.concatenate(preds).reshape(-1).astype(np.int32))
