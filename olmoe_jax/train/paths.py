"""Workdir paths that may be local or on an object store (`gs://bucket/run`), via etils.epath
(which Orbax uses too): `pathlib.Path("gs://b/run")` would silently become the local `gs:/b/run`."""
from __future__ import annotations

import os
import time

from etils import epath


def is_remote(path) -> bool:
    """Whether `path` (str or epath.Path) names an object store location (a `scheme://`)."""
    return "://" in str(path)


def workdir_path(workdir) -> epath.Path:
    """The workdir as an epath.Path: `gs://...` keeps its scheme, local paths become absolute."""
    text = str(workdir)
    return epath.Path(text) if "://" in text else epath.Path(os.path.abspath(text))


class ObjectAppender:
    """An append-only text file on an object store, which has no append: the lines written so
    far (the object's old text included) are rewritten as one object at most every
    `every_s` seconds, on flush(force=True) and on close. A crash loses at most every_s of lines."""

    def __init__(self, path: epath.Path, every_s: float = 30.0):
        self._path, self._every = path, every_s
        self._text = path.read_text() if path.exists() else ""
        self._dirty, self._last = False, float("-inf")

    def write(self, text: str) -> None:
        self._text += text
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        if self._dirty and (force or time.monotonic() - self._last >= self._every):
            self._path.write_text(self._text)
            self._dirty, self._last = False, time.monotonic()

    def close(self) -> None:
        self.flush(force=True)


def open_append(path):
    """A text file object to append lines to: a plain file locally, an ObjectAppender remotely."""
    path = workdir_path(path)
    if is_remote(path):
        return ObjectAppender(path)
    return open(str(path), "a", encoding="utf-8")  # noqa: SIM115
