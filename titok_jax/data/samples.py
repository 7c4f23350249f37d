"""Real photos that installable packages ship (no download): scikit-image's public-domain/CC0
samples and scikit-learn's two CC-BY sample images when scikit-learn is installed."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

# skimage.data loaders bundled in the wheel (licences in the skimage.data docstrings).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry")


def sample_photos() -> dict[str, np.ndarray]:
    """name -> uint8 RGB array."""
    from skimage import data
    photos = {name: getattr(data, name)() for name in SKIMAGE_PHOTOS}
    try:
        from sklearn.datasets import load_sample_images
        bunch = load_sample_images()
        for fname, img in zip(bunch.filenames, bunch.images):
            photos[os.path.splitext(os.path.basename(fname))[0]] = img
    except ImportError:
        pass
    return {k: np.asarray(v)[..., :3].astype(np.uint8) for k, v in photos.items()}


def write_sample_photos(directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, img in sorted(sample_photos().items()):
        path = os.path.join(directory, f"{name}.png")
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths
