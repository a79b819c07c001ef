"""Small file helpers shared by the data layer, checkpoints and sweeps: the cache folder,
a stable hash (and the hash split built on it), an inter-process file lock, atomic writes,
batched reads of a random-access source. No heavy imports (no TFDS, no jax)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from typing import Any, Iterator

VALIDATION_PER_MILLE = 30  # hash split: 3% of groups go to validation


def default_data_dir(data_dir: str = "") -> str:
    """`data_dir`, else $OLMOE_JAX_CACHE, else ~/.cache/olmoe_jax."""
    return data_dir or os.environ.get("OLMOE_JAX_CACHE") or os.path.expanduser("~/.cache/olmoe_jax")


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and Python run (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def split_of(group: str) -> str:
    """'validation' for the VALIDATION_PER_MILLE / 1000 of groups with the lowest hash, else 'train'."""
    return "validation" if stable_hash(group) % 1000 < VALIDATION_PER_MILLE else "train"


@contextlib.contextmanager
def file_lock(folder: str, name: str):
    """An exclusive lock under `folder`, so processes sharing a cache prepare it only once."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f".{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes `path` through a temporary file and a rename: readers (and a crash mid-write)
    never see half a file. The folder is created if needed."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def batched_reads(source, batch: int = 1024) -> Iterator[Any]:
    """Every record of a random-access source (a TFDS / ArrayRecord data source), read `batch`
    records per call, in order."""
    for start in range(0, len(source), batch):
        yield from source.__getitems__(range(start, min(start + batch, len(source))))
