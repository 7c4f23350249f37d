"""The project cache: downloaded weights and the prepared embedded dataset live here."""
from __future__ import annotations

import os

CACHE_ENV = "TITOK_JAX_CACHE"


def cache_dir() -> str:
    """``$TITOK_JAX_CACHE``, else ``.cache/`` at the root of the titok-jax checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get(CACHE_ENV) or os.path.join(root, ".cache")


def tfds_dir() -> str:
    """The TFDS data dir of the project cache (``<cache>/tfds``), where the embedded dataset is
    prepared by default. It never holds any other dataset."""
    return os.path.join(cache_dir(), "tfds")
