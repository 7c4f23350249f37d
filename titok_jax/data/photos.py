"""Real photos that installable packages ship (no download): scikit-image's public-domain/CC0
samples and scikit-learn's two CC-BY sample images when scikit-learn is installed."""
from __future__ import annotations

import os

import numpy as np
from etils import epath
from PIL import Image

# skimage.data loaders bundled in the wheel (licences in the skimage.data docstrings).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry")


def skimage_photos() -> dict[str, np.ndarray]:
    """name -> uint8 RGB array, for the photos of :data:`SKIMAGE_PHOTOS`."""
    from skimage import data
    return {name: np.asarray(getattr(data, name)())[..., :3].astype(np.uint8)
            for name in SKIMAGE_PHOTOS}


def sample_photos() -> dict[str, np.ndarray]:
    """name -> uint8 RGB array: :func:`skimage_photos`, plus scikit-learn's sample images when
    it is installed."""
    photos = skimage_photos()
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return photos
    bunch = load_sample_images()
    for fname, img in zip(bunch.filenames, bunch.images):
        photos[os.path.splitext(os.path.basename(fname))[0]] = np.asarray(img)[..., :3]
    return photos


def write_sample_photos(directory: str | os.PathLike) -> list[str]:
    """Writes every sample photo as ``<name>.png`` into ``directory`` (local or e.g. ``gs://``)
    and returns their paths."""
    out = epath.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, img in sorted(sample_photos().items()):
        path = out / f"{name}.png"
        with path.open("wb") as f:
            Image.fromarray(img).save(f, format="PNG")
        paths.append(os.fspath(path))
    return paths
