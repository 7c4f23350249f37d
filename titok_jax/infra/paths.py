"""Paths that may be local or ``gs://`` (``etils.epath``), and writes that never leave a partial
file behind."""
from __future__ import annotations

import os
import shutil

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath for local or ``gs://`` paths; local ones are made absolute."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object store (``gs://...``) rather than the local disk."""
    return "://" in os.fspath(path)


def write_atomic(path: epath.Path, data: bytes) -> None:
    """Writes ``data`` so that a killed run never leaves a partial file: locally under a
    temporary name, then renamed; on ``gs://`` one upload (an object appears only complete)."""
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def place(local_file: str, dest: str | os.PathLike) -> None:
    """Moves a finished local file to ``dest`` in one step: a rename on a local disk (same file
    system), an upload (atomic object creation) elsewhere."""
    if not is_remote(dest):
        os.replace(local_file, os.fspath(dest))
        return
    with open(local_file, "rb") as src, epath.Path(dest).open("wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(local_file)
