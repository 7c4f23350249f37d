"""A small real-photo dataset in the exact on-disk layout of TFDS ``imagenet2012``, built offline.

The sample photos that scikit-image ships (:func:`titok_jax.data.samples.sample_photos`) are cut
into crops and written as fake ImageNet *manual download* tars; TFDS's own ``imagenet2012``
builder then prepares them, so the training code reads this data through exactly the path it
uses for the real ImageNet (``tfds.builder("imagenet2012", data_dir=...)``).

- **Classes.** Photo ``k`` (sorted by name, see :func:`class_names`) becomes label ``k``: its
  train crops go to the class tar of the ``k``-th synset of TFDS's bundled ``labels.txt``.
- **Train / held-out.** The left ``1 - val_fraction`` of each photo gives the train crops:
  several scales (some smaller than 256, some larger), aspect ratios between 3:4 and 4:3, so the
  resize + crop transform has real work to do. Validation crops come only from the right
  ``val_fraction`` of each photo, which no train crop overlaps, so reconstructions of them show
  held-out pixels.
- **Validation labels are not ours.** The builder labels ``ILSVRC2012_val_*.JPEG`` by zipping the
  sorted file names with its bundled ``validation_labels.txt`` (the official 50 000 labels), so our
  k val images get the first k official labels. They are meaningless here; use the validation
  split for reconstruction metrics, never for accuracy.

What the ``imagenet2012`` builder (TFDS 4.9.10, version 5.1.0) does with bad files, read in its
source and checked by ``tests/test_data.py``: the ``image`` feature is
``Image(encoding_format="jpeg")`` and the builder hands it a file object, whose bytes are stored
**verbatim** -- nothing is decoded, validated or re-encoded while preparing. The one exception is
by file name: the 22 names in the builder's ``CMYK_IMAGES`` list are converted to RGB and the one
name in ``PNG_IMAGES`` to JPEG (the known bad files of the real ImageNet). So a truncated JPEG,
random bytes, a grayscale or CMYK JPEG, a PNG named ``.JPEG`` and a tiny image all reach the
prepared dataset unchanged (our file names are not in those lists) and the input pipeline must
cope with them; ``bad_examples=True`` injects one of each into the first class.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import numpy as np
from PIL import Image

from titok_jax.data.samples import sample_photos

log = logging.getLogger(__name__)

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
# Written next to the prepared data: the settings and counts it was built with.
MARKER = "embedded_imagenet.json"
# Train crop sides: below, at and above 256, so both up- and down-sampling happen.
_TRAIN_SIDES = (192, 256, 320, 400)
# Suffixes of the injected bad train files: ``<synset>_<suffix>``.
BAD_EXAMPLES = {
    "truncated": "bad_truncated.JPEG",
    "garbage": "bad_garbage.JPEG",
    "grayscale": "bad_grayscale.JPEG",
    "cmyk": "bad_cmyk.JPEG",
    "png": "bad_png_rgba.JPEG",
    "tiny": "bad_tiny.JPEG",
}


def class_names() -> list[str]:
    """Photo names in label order: label ``k`` holds crops of ``class_names()[k]``."""
    return sorted(sample_photos())


def imagenet_synsets() -> list[str]:
    """The 1000 synsets of TFDS's ``imagenet2012`` in label order (from its bundled labels.txt)."""
    import tensorflow_datasets as tfds
    return list(tfds.builder("imagenet2012").info.features["label"].names)


def _jpeg(pixels: np.ndarray | Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    # A fixed mtime keeps the tars byte-identical across runs.
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _train_crops(photo: np.ndarray, n: int, val_fraction: float,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random crops from the left ``1 - val_fraction`` of the photo."""
    h, w = photo.shape[:2]
    region_w = w - _held_out_width(w, val_fraction)
    crops = []
    for _ in range(n):
        side = rng.choice(_TRAIN_SIDES)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(region_w, round(side * np.sqrt(aspect))))
        ch = int(min(h, round(side / np.sqrt(aspect))))
        x = rng.integers(0, region_w - cw + 1)
        y = rng.integers(0, h - ch + 1)
        crops.append(photo[y:y + ch, x:x + cw])
    return crops


def _held_out_width(w: int, val_fraction: float) -> int:
    return max(1, round(w * val_fraction))


def _val_crops(photo: np.ndarray, n: int, val_fraction: float,
               rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` square crops from the held-out right part, as large as it allows (at most 256)."""
    h, w = photo.shape[:2]
    band = _held_out_width(w, val_fraction)
    side = min(band, h, 256)
    crops = []
    for _ in range(n):
        x = w - band + rng.integers(0, band - side + 1)
        y = rng.integers(0, h - side + 1)
        crops.append(photo[y:y + side, x:x + side])
    return crops


def _bad_files(rng: np.random.Generator) -> dict[str, bytes]:
    """One file of each kind in :data:`BAD_EXAMPLES`, keyed by kind."""
    pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    good = _jpeg(pixels)
    png = io.BytesIO()
    alpha = rng.integers(0, 256, (96, 128, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([pixels, alpha], -1), "RGBA").save(png, format="PNG")
    return {
        # Cut mid-scan: the header parses, decoding the pixels fails.
        "truncated": good[: len(good) // 2],
        "garbage": rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "grayscale": _jpeg(Image.fromarray(pixels).convert("L")),
        "cmyk": _jpeg(Image.fromarray(pixels).convert("CMYK")),
        "png": png.getvalue(),
        "tiny": _jpeg(pixels[:14, :20]),
    }


def write_manual_tars(manual_dir: str, *, crops_per_photo: int = 48, val_per_photo: int = 8,
                      val_fraction: float = 0.4, seed: int = 0,
                      bad_examples: bool = False) -> dict[str, int]:
    """Writes ``ILSVRC2012_img_train.tar`` (a tar of per-class tars ``nXXXXXXXX.tar`` of JPEGs
    ``nXXXXXXXX_<i>.JPEG``) and ``ILSVRC2012_img_val.tar`` (flat ``ILSVRC2012_val_%08d.JPEG``) to
    ``manual_dir``; deterministic in ``seed``. ``bad_examples`` adds one file of each kind of
    :data:`BAD_EXAMPLES` to the first class. Returns the number of train and val files."""
    os.makedirs(manual_dir, exist_ok=True)
    photos = sample_photos()
    synsets = imagenet_synsets()
    rng = np.random.default_rng(seed)
    val_images: list[np.ndarray] = []
    num_train = 0
    with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), "w") as outer:
        for label, name in enumerate(class_names()):
            synset = synsets[label]
            files = {f"{synset}_{i + 1}.JPEG": _jpeg(crop) for i, crop in enumerate(
                _train_crops(photos[name], crops_per_photo, val_fraction, rng))}
            if bad_examples and label == 0:
                files.update({f"{synset}_{BAD_EXAMPLES[kind]}": data
                              for kind, data in _bad_files(rng).items()})
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for fname, data in files.items():
                    _add(class_tar, fname, data)
            _add(outer, f"{synset}.tar", inner.getvalue())
            num_train += len(files)
            val_images += _val_crops(photos[name], val_per_photo, val_fraction, rng)
    with tarfile.open(os.path.join(manual_dir, VAL_TAR), "w") as tar:
        for i, crop in enumerate(val_images):
            _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(crop))
    return {"train": num_train, "validation": len(val_images)}


def prepare_embedded_imagenet(data_dir: str, *, crops_per_photo: int = 48, val_per_photo: int = 8,
                              val_fraction: float = 0.4, seed: int = 0,
                              bad_examples: bool = False) -> str:
    """Builds the embedded dataset as TFDS ``imagenet2012`` (array_record files, for random
    access) in ``data_dir``, offline, and returns ``data_dir``.

    Idempotent: if ``imagenet2012`` is already prepared in ``data_dir`` it returns at once,
    whatever the arguments were then -- use a fresh ``data_dir`` per setting, and never a data_dir
    that should hold the real ImageNet. The manual tars stay in ``data_dir/downloads/manual``
    (TFDS's default manual_dir)."""
    import tensorflow_datasets as tfds
    builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return data_dir
    settings = dict(crops_per_photo=crops_per_photo, val_per_photo=val_per_photo,
                    val_fraction=val_fraction, seed=seed, bad_examples=bad_examples)
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    counts = write_manual_tars(manual_dir, **settings)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    with open(os.path.join(data_dir, MARKER), "w") as f:
        json.dump({"settings": settings, "counts": counts, "classes": class_names()}, f, indent=1)
        f.write("\n")
    log.info("prepared the embedded imagenet2012 in %s: %s", data_dir, counts)
    return data_dir
