"""Batches of user images from a folder, a file or a glob, for the CLI (reconstruct, tokenize,
alit-eval) and the FID statistics of generated images.

Every image is decoded to RGB (:func:`titok_jax.data.images.load_image`). With an
``image_size`` it then gets the official eval transform (shorter side to the size, bicubic with
antialias, center crop); without one it keeps its own size, and consecutive images of one size
are batched together. A file that cannot be decoded is skipped with a warning naming it.
Paths go through ``etils.epath``, so a folder, a file or a glob may be ``gs://``.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from typing import Iterator

import numpy as np
from etils import epath

from titok_jax.data.images import IMAGE_EXTENSIONS, BadImageError, load_image, resize_center_crop

log = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")


def _walk(folder: epath.Path) -> Iterator[epath.Path]:
    """Every file below ``folder``, one listing per folder (epath refuses ``**`` globs)."""
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from _walk(entry)
        else:
            yield entry


def list_images(spec: str | os.PathLike) -> list[str]:
    """The image files (by extension) below a folder, a single file, or the files matching a
    glob (local globs may use ``**``; remote ones match within one folder level per part),
    sorted."""
    text = os.fspath(spec)
    if not _GLOB_CHARS.search(text):
        path = epath.Path(text)
        if path.is_dir():
            return sorted(os.fspath(p) for p in _walk(path)
                          if p.suffix.lower() in IMAGE_EXTENSIONS)
        return [text] if path.is_file() else []
    if "://" not in text:
        return sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
    head = text[:_GLOB_CHARS.search(text).start()].rsplit("/", 1)[0]
    return sorted(os.fspath(p) for p in epath.Path(head).glob(text[len(head) + 1:])
                  if p.is_file())


@dataclasses.dataclass
class Batch:
    paths: list[str]
    images: np.ndarray  # float32 [B, H, W, 3] in [0, 1]


class ImageFolder:
    """The decodable images of ``spec`` in batches.

    Args:
      spec: a folder, a file or a glob.
      image_size: apply the eval transform to this size; None keeps each image's size.
      batch_size: images per batch (the last one may be smaller).
    """

    def __init__(self, spec: str | os.PathLike, image_size: int | None, batch_size: int):
        self.spec, self.image_size, self.batch_size = os.fspath(spec), image_size, batch_size
        self.files = list_images(spec)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        """The number of image files (undecodable ones included)."""
        return len(self.files)

    def _load(self, path: str) -> np.ndarray:
        img = load_image(path)
        if self.image_size:
            return resize_center_crop(img, self.image_size)
        return np.asarray(img, np.float32) / 255.0

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = []
        paths: list[str] = []
        images: list[np.ndarray] = []
        for path in self.files:
            try:
                image = self._load(path)
            except BadImageError as e:
                self.skipped.append(path)
                log.warning("skipping %s", e)
                continue
            if images and (len(images) == self.batch_size or image.shape != images[0].shape):
                yield Batch(paths, np.stack(images))
                paths, images = [], []
            paths.append(path)
            images.append(image)
        if images:
            yield Batch(paths, np.stack(images))
        if self.skipped:
            log.warning("skipped %d undecodable file(s): %s", len(self.skipped),
                        ", ".join(self.skipped))
