"""Batches of user images from a folder, a file or a glob, for the CLI (reconstruct, tokenize,
alit-eval) and the FID statistics of generated images.

Every image is decoded to RGB (:func:`titok_jax.data.images.load_image`). With an
``image_size`` it then gets the official eval transform (shorter side to the size, bicubic with
antialias, center crop); without one it keeps its own size, and consecutive images of one size
are batched together. A file that cannot be decoded is skipped with a warning naming it.
Listing and decoding are :func:`titok_jax.data.images.list_images` and ``load_image``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator

import numpy as np

from titok_jax.data.images import BadImageError, list_images, load_image, resize_center_crop

log = logging.getLogger(__name__)


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
