"""Write our params as an HF model folder: config.json, generation_config.json, sharded
safetensors with an index, in the released OLMoE checkpoint's per-expert layout (which both
transformers 4.x and 5.x load), plus whatever tokenizer files the caller writes.

The folder is assembled beside `out` and renamed into place at the end, so a failure leaves no
half-written model behind, and every refusal (a model HF cannot express) comes before any write.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable

import numpy as np
import ml_dtypes
from safetensors.numpy import save_file

from olmoe_jax.interop import hf_keys
from olmoe_jax.interop.hf_config import HFFormatError, hf_model_type, to_hf_config

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def hf_tensors(params, cfg, dtype):
    """Yields (HF key, contiguous numpy array) for every tensor, one at a time, in file order."""
    for rule in hf_keys.rules(cfg):
        leaf = np.asarray(hf_keys.get_leaf(params, rule.ours))
        for idx, key in hf_keys.expand(rule, cfg):
            yield key, np.ascontiguousarray(rule.to_hf(leaf[idx]).astype(dtype))


def check_out_dir(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise HFFormatError(
            f"--out {out} exists and is not empty; choose a new folder or remove it"
        )


def export_hf(
    params,
    cfg,
    out: str,
    *,
    dtype: str = "float32",
    eos_id: int | None = None,
    pad_id: int | None = None,
    shard_bytes: int = 5 * 2**30,
    write_tokenizer: Callable[[str], None] | None = None,
) -> list[str]:
    """Writes the HF folder `out` (must not exist or be empty); returns the file names written.

    dtype: "float32" or "bfloat16" for the weights. shard_bytes: the most bytes of tensors per
    safetensors file. write_tokenizer(folder) adds the tokenizer files.
    """
    if dtype not in DTYPES:
        raise HFFormatError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    hf_model_type(cfg)  # refuses, with the reason, before anything is written
    check_out_dir(out)
    out = os.path.abspath(out)
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write(params, cfg, tmp, DTYPES[dtype], dtype, eos_id, pad_id, shard_bytes)
        if write_tokenizer is not None:
            write_tokenizer(tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(os.listdir(out))


def _write(params, cfg, folder, np_dtype, dtype_name, eos_id, pad_id, shard_bytes):
    shards: list[dict[str, np.ndarray]] = [{}]
    names: list[str] = []
    size = total = 0

    def flush():
        names.append(f"shard-{len(names)}.tmp")
        save_file(shards[0], os.path.join(folder, names[-1]), metadata={"format": "pt"})
        shards[0] = {}

    weight_map: dict[str, int] = {}
    for key, arr in hf_tensors(params, cfg, np_dtype):
        if size and size + arr.nbytes > shard_bytes:
            flush()
            size = 0
        shards[0][key] = arr
        weight_map[key] = len(names)
        size += arr.nbytes
        total += arr.nbytes
    flush()

    if len(names) == 1:
        os.replace(os.path.join(folder, names[0]), os.path.join(folder, "model.safetensors"))
    else:
        final = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))]
        for tmp_name, name in zip(names, final):
            os.replace(os.path.join(folder, tmp_name), os.path.join(folder, name))
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: final[i] for k, i in weight_map.items()},
        }
        write_json(index, os.path.join(folder, "model.safetensors.index.json"))

    write_json(
        to_hf_config(cfg, dtype=dtype_name, eos_id=eos_id, pad_id=pad_id),
        os.path.join(folder, "config.json"),
    )
    write_json(
        {
            "_from_model_config": True,
            "bos_token_id": None,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
        },
        os.path.join(folder, "generation_config.json"),
    )


def write_json(obj, path) -> None:
    """obj as sorted, indented JSON (how HF writes config and tokenizer files)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
