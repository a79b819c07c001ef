"""Where documents come from, and the checks that reject bad input before anything compiles.

Sources (`data.source`):
  builtin  the built-in corpus (corpus.py), domains code/prose/arithmetic/records
  npy      OLMo-style token files: flat arrays of token ids, documents separated by EOS.
           OLMo writes them with np.memmap, so despite the .npy suffix they usually have no
           header (dtype `data.npy_dtype`); real .npy files (with a header) work too.
           Validation is the last 2% of each file's tokens.
  jsonl    one JSON object per line, text in field `data.text_key`, optional "domain"
  tfds     any TFDS dataset by name (`data.path`, e.g. "lm1b" or "c4/en:3.1.0"), prepared
           as ArrayRecord under <data_dir>/tfds; its validation (or test) split if it has one

`data.path` is a glob or a comma-separated list of globs. Text sources that have no
validation split of their own send a document to validation by a stable hash of its text (3%).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Iterator

import numpy as np

from olmoe_jax.data.errors import DataError
from olmoe_jax.io import batched_reads, default_data_dir, split_of, stable_hash

NPY_VALIDATION_FRACTION = 0.02
_NPY_MAGIC = b"\x93NUMPY"


def domain_paths(pattern: str, key: str = "data.path", default: str = "") -> dict[str, list[str]]:
    """{domain: files} of a glob or comma-separated globs, each file once, sorted. A glob may be
    named, `wiki=/data/wiki/*.npy`, which names its files' domain; unnamed globs get `default`."""
    if not pattern.strip():
        raise DataError(f"{key} is empty; give a file, a glob, or comma-separated globs")
    out: dict[str, set[str]] = {}
    seen: dict[str, str] = {}
    for part in (p.strip() for p in pattern.split(",")):
        name, sep, rest = part.partition("=")
        domain, part = (name.strip(), rest.strip()) if sep and name.strip().isidentifier() else (default, part)
        matches = [m for m in glob.glob(os.path.expanduser(part), recursive=True)
                   if os.path.isfile(m)]
        if not matches:
            what = "does not exist" if not glob.has_magic(part) else "matches no file"
            raise DataError(f"{key}: {part!r} {what}; fix {key}")
        for m in map(os.path.abspath, matches):
            if seen.setdefault(m, domain) != domain:
                raise DataError(f"{key}: {m} is in two domains ({seen[m]}, {domain}); name each file once")
            out.setdefault(domain, set()).add(m)
    return {d: sorted(files) for d, files in sorted(out.items())}


def resolve_paths(pattern: str, key: str = "data.path") -> list[str]:
    """Files matching a glob or comma-separated (optionally named) globs, sorted, each once."""
    return sorted({f for files in domain_paths(pattern, key).values() for f in files})


def check_eval_path(cfg) -> None:
    """data.eval_path: held-out files for npy and jsonl sources; the others have their own split."""
    d = cfg.data
    if d.eval_path and d.source not in ("npy", "jsonl"):
        raise DataError(f"data.eval_path is for npy and jsonl sources; data.source={d.source} has its own "
                        "held-out validation split (clear data.eval_path)")
    if d.eval_path:
        overlap = set(resolve_paths(d.path)) & set(resolve_paths(d.eval_path, "data.eval_path"))
        if overlap:
            raise DataError(f"data.eval_path and data.path share {sorted(overlap)[0]}: held-out files must "
                            "not be trained on; remove it from one of them")


# ----------------------------------------------------------------------------- npy

@dataclasses.dataclass(frozen=True)
class Span:
    """Tokens [start, stop) of one token file, opened on demand as a read-only memmap.

    A description rather than an open array, so datasets holding spans pickle cheaply into
    grain worker processes and each process maps the file itself.
    """
    path: str
    dtype: str
    header: int  # bytes before the first token: 0 for raw OLMo files, the header of a .npy
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self) -> np.ndarray:
        """The tokens, [stop - start], memory-mapped (nothing is read until indexed)."""
        if self.stop == self.start:
            return np.zeros((0,), self.dtype)
        whole = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.header)
        return whole[self.start:self.stop]

    def split_at(self, i: int) -> tuple["Span", "Span"]:
        cut = self.start + i
        return dataclasses.replace(self, stop=cut), dataclasses.replace(self, start=cut)


def open_token_file(path: str, dtype: str) -> Span:
    """All tokens of one file, checked: 1-D integers, a whole number of tokens. Raw
    (headerless) files are read as `dtype`; .npy files with a header use their own dtype."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        has_header = f.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    if has_header:
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise DataError(f"{path}: has a .npy header but cannot be read ({e}); "
                            "rewrite it") from e
        if arr.ndim != 1 or arr.dtype.kind not in "ui":
            raise DataError(f"{path}: a .npy token file must be 1-D integers, got shape "
                            f"{arr.shape} dtype {arr.dtype}")
        if arr.size == 0:
            raise DataError(f"{path}: holds no tokens; remove it from data.path")
        return Span(path, arr.dtype.str, int(arr.offset), 0, int(arr.size))
    itemsize = np.dtype(dtype).itemsize
    if size == 0:
        raise DataError(f"{path}: is empty; remove it from data.path")
    if size % itemsize:
        raise DataError(
            f"{path}: {size} bytes is not a multiple of {itemsize} (data.npy_dtype={dtype}); "
            f"the file is truncated or data.npy_dtype is wrong")
    return Span(path, np.dtype(dtype).str, 0, 0, size // itemsize)


def npy_streams(cfg) -> dict[str, dict[str, list[Span]]]:
    """{split: {domain: [one span per file]}}; domain "npy" unless the glob is named (domain_paths).

    With data.eval_path, validation is those files and every data.path file trains whole;
    else validation is the last 2% of each data.path file."""
    d = cfg.data
    opened = {dom: [open_token_file(p, d.npy_dtype) for p in files]
              for dom, files in domain_paths(d.path, default="npy").items()}
    if d.eval_path:
        held_out = {dom: [open_token_file(p, d.npy_dtype) for p in files]
                    for dom, files in domain_paths(d.eval_path, "data.eval_path", default="npy").items()}
        return {"train": opened, "validation": held_out}
    cut = {dom: [s.split_at(len(s) - math.ceil(len(s) * NPY_VALIDATION_FRACTION)) for s in spans]
           for dom, spans in opened.items()}
    return {"train": {dom: [h for h, _ in parts] for dom, parts in cut.items()},
            "validation": {dom: [t for _, t in parts] for dom, parts in cut.items()}}


def _check_token_ids(path: str, span: Span, vocab_size: int) -> None:
    # Only a prefix: a full scan of a multi-GB file is not an up-front check.
    head = np.asarray(span.read()[: 1 << 20])
    if head.size and int(head.max()) >= vocab_size:
        raise DataError(
            f"{path}: token id {int(head.max())} >= model.vocab_size={vocab_size}; "
            "wrong data.npy_dtype, or the data needs a larger model.vocab_size")


# ----------------------------------------------------------------------------- jsonl

def iter_jsonl(path: str, text_key: str,
               default_domain: str = "jsonl") -> Iterator[tuple[str, str]]:
    """(domain, text) per non-blank line; DataError naming the file and line on bad input."""
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                                    "each line must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: a JSON {type(obj).__name__}, "
                                    "expected an object")
                if text_key not in obj:
                    fields = ", ".join(sorted(obj)[:10]) or "none"
                    raise DataError(f"{path}:{lineno}: no field {text_key!r} (fields: {fields}); "
                                    "set data.text_key to the field holding the text")
                if not isinstance(obj[text_key], str):
                    raise DataError(f"{path}:{lineno}: field {text_key!r} is "
                                    f"{type(obj[text_key]).__name__}, expected a string")
                yield str(obj.get("domain") or default_domain), obj[text_key]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e}); re-encode it as UTF-8") from None


# ----------------------------------------------------------------------------- tfds

def tfds_builder(cfg):
    """The TFDS builder of `data.path`, under <data_dir>/tfds, ArrayRecord format."""
    import tensorflow_datasets as tfds
    data_dir = os.path.join(default_data_dir(cfg.data.data_dir), "tfds")
    try:
        builder = tfds.builder(cfg.data.path, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, ValueError)
        raise DataError(f"data.path={cfg.data.path!r}: no such TFDS dataset ({e})") from e
    features = builder.info.features
    if cfg.data.text_key not in features:
        raise DataError(f"TFDS dataset {cfg.data.path!r} has no feature {cfg.data.text_key!r} "
                        f"(features: {', '.join(features)}); set data.text_key")
    return builder


def _tfds_splits(builder) -> tuple[str, str | None]:
    """(train split, validation split or None when validation is hashed out of train)."""
    names = set(builder.info.splits.keys())
    if "train" not in names:
        raise DataError(f"TFDS dataset {builder.name} has no train split (splits: {sorted(names)})")
    return "train", next((s for s in ("validation", "test") if s in names), None)


def iter_tfds(cfg, split: str) -> Iterator[tuple[str, str]]:
    builder = tfds_builder(cfg)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise DataError(f"TFDS dataset {cfg.data.path!r} is not prepared under "
                            f"{builder.data_dir} and preparing it failed ({e})") from e
    train_split, val_split = _tfds_splits(builder)
    use_val = split == "validation" and val_split is not None
    source = builder.as_data_source(split=val_split if use_val else train_split)
    name = builder.name
    for ex in batched_reads(source):
        text = ex[cfg.data.text_key]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        if val_split is None and split_of(text) != split:
            continue
        domain = ex.get("domain", name)
        yield (domain.decode() if isinstance(domain, bytes) else str(domain)), text


# ----------------------------------------------------------------------------- text, any source

def text_documents(cfg, split: str) -> Iterator[tuple[str, str]]:
    """(domain, text) of every document of `split` ("train" | "validation"), in a fixed order."""
    source = cfg.data.source
    if source == "builtin":
        from olmoe_jax.data import corpus  # pylint: disable=import-outside-toplevel  (imports TFDS)
        yield from corpus.read_split(cfg.data.data_dir, split)
    elif source == "jsonl":
        held_out = bool(cfg.data.eval_path)  # else 3% of documents by hash
        pattern, key = (cfg.data.eval_path, "data.eval_path") if held_out and split == "validation" \
            else (cfg.data.path, "data.path")
        for default, paths in domain_paths(pattern, key, default="jsonl").items():
            for path in paths:
                for domain, text in iter_jsonl(path, cfg.data.text_key, default):
                    if held_out or split_of(text) == split:
                        yield domain, text
    elif source == "tfds":
        yield from iter_tfds(cfg, split)
    else:
        raise DataError(f"data.source={source!r} has no text documents")


def text_fingerprint(cfg) -> str:
    """Names the documents a text source yields; changes when they may change."""
    d = cfg.data
    if d.source == "builtin":
        from olmoe_jax.data import corpus  # pylint: disable=import-outside-toplevel
        return f"builtin-{corpus.VERSION}-{corpus.python_tag()}"
    if d.source == "jsonl":
        held_out = files_fingerprint(d.eval_path) if d.eval_path else ""
        return f"jsonl-{files_fingerprint(d.path, d.text_key, held_out)}"
    return f"tfds-{stable_hash(json.dumps([d.path, d.text_key])):016x}"


def files_fingerprint(pattern: str, *extra) -> str:
    """Changes when a matched file is added, removed, resized or rewritten (size, mtime)."""
    stats = [(d, p, os.path.getsize(p), os.stat(p).st_mtime_ns)
             for d, paths in domain_paths(pattern).items() for p in paths]
    return f"{stable_hash(json.dumps([stats, *extra])):016x}"


def check_data(cfg) -> str:
    """Cheap up-front checks of `cfg.data` against the files; raises DataError, else returns
    a one-line summary. Call it before compiling anything. (make_tokenizer checks the
    tokenizer against model.vocab_size; call it up front too.)"""
    d = cfg.data
    if d.tokenizer == "none" and d.source != "npy":
        raise DataError(f"data.tokenizer=none only works with pre-tokenized data.source=npy, "
                        f"not {d.source}; set data.tokenizer to sentencepiece or hf")
    if d.tokenizer == "none" and d.eos_id < 0:
        raise DataError("data.tokenizer=none needs data.eos_id (50279 for OLMoE-Mix)")
    if d.tokenizer == "hf":
        tok_file = d.tokenizer_path
        if os.path.isdir(tok_file):
            tok_file = os.path.join(tok_file, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise DataError(f"data.tokenizer_path={d.tokenizer_path!r}: no tokenizer.json there")
    if d.tokenizer == "sentencepiece" and d.tokenizer_path and not os.path.isfile(d.tokenizer_path):
        raise DataError(f"data.tokenizer_path={d.tokenizer_path!r} is not a file")
    check_eval_path(cfg)
    if d.source == "builtin":
        from olmoe_jax.data import corpus  # pylint: disable=import-outside-toplevel
        where = default_data_dir(d.data_dir)
        return f"builtin corpus {corpus.VERSION} ({corpus.python_tag()}) in {where}"
    if d.source == "npy":
        files = resolve_paths(d.path) + (resolve_paths(d.eval_path, "data.eval_path") if d.eval_path else [])
        tokens = 0
        for path in files:
            span = open_token_file(path, d.npy_dtype)
            _check_token_ids(path, span, cfg.model.vocab_size)
            tokens += len(span)
        return f"npy: {len(files)} files, {tokens} tokens"
    if d.source == "jsonl":
        files = resolve_paths(d.path)
        docs = sum(1 for path in files for _ in iter_jsonl(path, d.text_key))
        if not docs:
            raise DataError(f"data.path={d.path!r}: the jsonl files hold no documents")
        return f"jsonl: {len(files)} files, {docs} documents"
    if d.source == "tfds":
        builder = tfds_builder(cfg)
        splits = sorted(builder.info.splits.keys()) or "not prepared yet"
        return f"tfds: {builder.name}, splits {splits}"
    raise DataError(f"data.source={d.source!r} is not one of builtin, npy, jsonl, tfds")
