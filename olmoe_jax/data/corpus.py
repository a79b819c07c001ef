"""The built-in multi-domain corpus: a TFDS dataset prepared locally, offline, in seconds.

Four labelled domains, about 8.1 MB of text in all:
  code        chunks of the Python standard library's .py sources (about 3.4 MB)
  prose       stdlib docstrings, the pydoc topic pages and the Python license (about 2.4 MB)
  arithmetic  generated exercise sheets: sums, chained steps, word problems (about 1.2 MB)
  records     generated JSON lines, CSV orders, key-value cards, service logs (about 1.2 MB)

Only the stdlib directory is read (never site-packages, test folders or the machine-specific
`_sysconfigdata`), in sorted order, so the corpus is fixed by `VERSION` and the Python version,
which names the builder config (the stdlib text differs between Python releases).

Train/validation: a document goes to validation when a stable hash of its *group* falls in
the lowest `VALIDATION_PER_MILLE`/1000. Documents cut from one stdlib file (its code chunks
and its docstrings) share a group, so no text of a validation file is ever trained on;
generated documents are their own group.
"""
from __future__ import annotations

import ast
import contextlib
import os
import pathlib
import sys
import sysconfig
from typing import Iterator, NamedTuple

import tensorflow_datasets as tfds

from olmoe_jax.data.generated import arithmetic_documents, records_documents
from olmoe_jax.io import (VALIDATION_PER_MILLE, batched_reads, default_data_dir, file_lock,  # noqa: F401
                          split_of, stable_hash)

DOMAINS = ("code", "prose", "arithmetic", "records")
VERSION = "1.1.0"
CODE_KEEP_PERCENT = 35  # share of stdlib code chunks kept, so code does not swamp the rest
CHUNK_CHARS = 3000  # documents are cut near this size, at line or paragraph boundaries
N_ARITHMETIC, N_RECORDS = 1500, 1250

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class Document(NamedTuple):
    key: str  # unique and stable: where the text came from
    domain: str
    group: str  # split unit: documents sharing a group land in the same split
    text: str


def stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The stdlib .py files, sorted, without tests, site-packages or build-specific files."""
    root = root or stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning (and sorting) in place keeps os.walk out of site-packages entirely.
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                out.append(pathlib.Path(dirpath, name))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _chunks(text: str, boundary: str) -> Iterator[str]:
    """Cuts text at `boundary` ("\\n" or "\\n\\n") into pieces of about CHUNK_CHARS."""
    piece: list[str] = []
    size = 0
    for part in text.split(boundary):
        piece.append(part)
        size += len(part) + len(boundary)
        if size >= CHUNK_CHARS:
            yield boundary.join(piece)
            piece, size = [], 0
    if "".join(piece).strip():
        yield boundary.join(piece)


def _code_chunks(text: str) -> Iterator[str]:
    """Cuts source at a line starting in column 0 (mostly a top-level statement) once a chunk
    has CHUNK_CHARS, and at any line past twice that; chunks need not parse on their own."""
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        top_level = line[:1] not in ("", " ", "\t", "\n", ")", "]", "}", "#")
        if piece and ((size >= CHUNK_CHARS and top_level) or size >= 2 * CHUNK_CHARS):
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if "".join(piece).strip():
        yield "".join(piece)


def _docstrings(tree: ast.Module, module: str) -> Iterator[str]:
    """`qualified.name` + docstring for the module and every class and function in it."""
    stack = [(tree, module)]
    while stack:
        node, name = stack.pop(0)
        doc = ast.get_docstring(node)
        if doc and len(doc) >= 40:  # one-liners like "Return x." carry little prose
            yield f"{name}\n\n{doc}"
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((child, f"{name}.{child.name}"))


def _pydoc_topics(source: str) -> dict[str, str]:
    """The `topics` dict of pydoc_data/topics.py (the language reference pages), parsed, not run."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "topics":
            return ast.literal_eval(node.value)
    return {}


def stdlib_documents(root: pathlib.Path | None = None) -> Iterator[Document]:
    """Documents of the `code` and `prose` domains, in a fixed order."""
    root = root or stdlib_dir()
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if "decoding_table = (" in text:
            continue  # encodings/cp*.py are generated character tables, not code anyone writes
        if rel == "pydoc_data/topics.py":
            for name, page in sorted(_pydoc_topics(text).items()):
                for i, chunk in enumerate(_chunks(page, "\n\n")):
                    yield Document(f"{rel}:{name}:{i}", "prose", f"{rel}:{name}", chunk)
            continue
        try:
            tree = ast.parse(text)  # the slow step (2 s for the stdlib): skipped files go first
        except (SyntaxError, ValueError):
            continue  # a file this Python cannot parse is skipped the same way every time
        for i, chunk in enumerate(_code_chunks(text)):
            if stable_hash(f"{rel}:{i}") % 100 < CODE_KEEP_PERCENT:
                yield Document(f"{rel}:code:{i}", "code", rel, chunk)
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        prose = "\n\n".join(_docstrings(tree, module))
        for i, chunk in enumerate(_chunks(prose, "\n\n") if prose else ()):
            yield Document(f"{rel}:doc:{i}", "prose", rel, chunk)
    license_path = root / "LICENSE.txt"
    if license_path.exists():
        for i, chunk in enumerate(_chunks(license_path.read_text(encoding="utf-8"), "\n\n")):
            yield Document(f"LICENSE.txt:{i}", "prose", "LICENSE.txt", chunk)


def all_documents() -> Iterator[Document]:
    """Every document of the corpus (both splits), in a fixed order."""
    yield from stdlib_documents()
    for i, text in enumerate(arithmetic_documents(VERSION, N_ARITHMETIC)):
        yield Document(f"arithmetic:{i}", "arithmetic", text, text)
    for i, text in enumerate(records_documents(VERSION, N_RECORDS)):
        yield Document(f"records:{i}", "records", text, text)


def python_tag() -> str:
    return "py" + "_".join(str(v) for v in sys.version_info[:3])


class OlmoeBuiltinCorpus(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the built-in corpus; one config per Python version (see module doc)."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {
        "1.0.0": "code, prose, arithmetic, records; 3% validation by group hash",
        "1.1.0": "stores each document's split group",
    }
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=python_tag(), description="stdlib of this Python")]
    # TFDS finds a checksums file next to a builder's code through `importlib_resources`, a
    # package it does not install on Python >= 3.9. Nothing is downloaded here, so there is
    # no checksums file to find: no code path.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "domain": tfds.features.Text(),
                "key": tfds.features.Text(),
                "group": tfds.features.Text(),
            }),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the text is on this machine or generated
        docs = list(all_documents())
        return {split: self._generate_examples(docs, split) for split in ("train", "validation")}

    def _generate_examples(self, docs, split):
        for doc in docs:
            if split_of(doc.group) == split:
                yield doc.key, doc._asdict()


def corpus_builder(data_dir: str = "") -> OlmoeBuiltinCorpus:
    """The builder, prepared under `<data_dir>/tfds` on first use (a few seconds)."""
    data_dir = default_data_dir(data_dir)
    tfds_dir = os.path.join(data_dir, "tfds")
    with _quiet_tfds():
        builder = OlmoeBuiltinCorpus(data_dir=tfds_dir, file_format="array_record")
        prepared = builder.is_prepared()
    if not prepared:  # cheap check first, then the lock for the slow path
        with file_lock(data_dir, "corpus"):
            with _quiet_tfds():
                builder = OlmoeBuiltinCorpus(data_dir=tfds_dir, file_format="array_record")
                prepared = builder.is_prepared()
            if not prepared:
                print(f"preparing the built-in corpus in {tfds_dir} (first use only)", flush=True)
                with _quiet_tfds():
                    builder.download_and_prepare(
                        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS's progress bars, "downloading" banners and absl notes about its temporary folders
    say nothing to a user of a local corpus: keep only errors (exceptions still propagate)."""
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    tfds.disable_progress_bar()
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        tfds.enable_progress_bar()
        absl_logging.set_verbosity(level)


def read_split(data_dir: str, split: str,
               fields: tuple[str, ...] = ("domain", "text")) -> list[tuple[str, ...]]:
    """[(domain, text)] (or other `Document` fields) of one split in stored order.

    Prepares the corpus first if needed; reading the train split takes about 0.3 s."""
    source = corpus_builder(data_dir).as_data_source(split=split)
    return [tuple(ex[f].decode() for f in fields) for ex in batched_reads(source)]
