"""The embedded dataset: crops of the photos scikit-image ships, as a TFDS dataset of its own
(:data:`DATASET_NAME`), prepared offline into the project cache.

It is never written as, or read as, ``imagenet2012``: a run that asks for ImageNet reads only
ImageNet, and preparing this dataset touches nothing but its own directory
``<data_dir>/titok_sample_photos/<config>/<version>``.

- **Classes.** Photo ``k`` of :func:`class_names` (``samples.SKIMAGE_PHOTOS``, sorted;
  scikit-learn's optional photos are left out so the content does not depend on what else is
  installed) is label ``k``, in train and validation alike (real labels, unlike the old
  ImageNet-layout build whose validation labels were the first official ones).
- **Train / held-out.** The left ``1 - val_fraction`` of each photo gives the train crops:
  several scales (some smaller than 256, some larger), aspect ratios between 3:4 and 4:3, so the
  resize + crop transform has real work to do. Validation crops come only from the right
  ``val_fraction`` of each photo, which no train crop overlaps, so reconstructions of them show
  held-out pixels. The defaults give 336 train and 56 validation JPEGs.
- **Settings are part of the name.** Every setting (crops per photo, validation crops, held-out
  fraction, seed, bad examples) is encoded in the builder config name (:func:`config_name`), so
  data prepared with other settings lives in another directory and is never reused by mistake.
  ``tfds.builder(DATASET_NAME)`` reads the default settings; :func:`builder` any others.
- **Bad files.** ``bad_examples=True`` adds to train one file of each kind of
  :data:`BAD_EXAMPLES` (truncated JPEG, random bytes, grayscale and CMYK JPEGs, a PNG named
  ``.JPEG``, a 20x14 JPEG). ``tfds.features.Image`` stores ``bytes`` verbatim (its encoder only
  encodes arrays and PIL images), so they reach the prepared records unchanged and the input
  pipeline has to cope with them.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from titok_jax.data.photos import SKIMAGE_PHOTOS, skimage_photos
from titok_jax.infra import cache

log = logging.getLogger(__name__)

DATASET_NAME = "titok_sample_photos"
# Train crop sides: below, at and above 256, so both up- and down-sampling happen.
_TRAIN_SIDES = (192, 256, 320, 400)
# File-name suffixes of the injected bad train files: ``<photo>_<suffix>``.
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
    return sorted(SKIMAGE_PHOTOS)


def _jpeg(pixels: np.ndarray | Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _held_out_width(w: int, val_fraction: float) -> int:
    return max(1, round(w * val_fraction))


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


@dataclasses.dataclass(eq=False)
class SamplePhotosConfig(tfds.core.BuilderConfig):
    """The settings of one build; :func:`config_name` derives its name from them."""
    crops_per_photo: int = 48
    val_per_photo: int = 8
    val_fraction: float = 0.4
    seed: int = 0
    bad_examples: bool = False


DEFAULT_SETTINGS = dict(crops_per_photo=48, val_per_photo=8, val_fraction=0.4, seed=0,
                        bad_examples=False)


def config_name(*, crops_per_photo: int, val_per_photo: int, val_fraction: float, seed: int,
                bad_examples: bool) -> str:
    """E.g. ``crops48_val8_heldout0p4_seed0`` (``_bad`` appended with the bad examples)."""
    fraction = re.sub(r"[^0-9a-z]", "p", f"{val_fraction:g}")
    return (f"crops{crops_per_photo}_val{val_per_photo}_heldout{fraction}_seed{seed}"
            + ("_bad" if bad_examples else ""))


def _config(**settings: Any) -> SamplePhotosConfig:
    return SamplePhotosConfig(name=config_name(**settings), **settings,
                              description="Crops of scikit-image's sample photos: "
                                          + ", ".join(f"{k}={v}" for k, v in settings.items()))


def examples(config: SamplePhotosConfig) -> dict[str, list[dict[str, Any]]]:
    """The examples of both splits (``image`` JPEG bytes, ``label``, ``file_name``),
    deterministic in the config's settings."""
    photos = skimage_photos()
    rng = np.random.default_rng(config.seed)
    out: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for label, name in enumerate(class_names()):
        files = {f"{name}_train_{i + 1}.JPEG": _jpeg(crop) for i, crop in enumerate(
            _train_crops(photos[name], config.crops_per_photo, config.val_fraction, rng))}
        if config.bad_examples and label == 0:
            files.update({f"{name}_{BAD_EXAMPLES[kind]}": data
                          for kind, data in _bad_files(rng).items()})
        out["train"] += [{"image": data, "label": label, "file_name": fname}
                         for fname, data in files.items()]
        out["validation"] += [
            {"image": _jpeg(crop), "label": label, "file_name": f"{name}_val_{i + 1}.JPEG"}
            for i, crop in enumerate(_val_crops(photos[name], config.val_per_photo,
                                                config.val_fraction, rng))]
    return out


class TitokSamplePhotos(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the embedded dataset (see the module docstring); no downloads."""

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Crops of the scikit-image sample photos, own dataset name."}
    BUILDER_CONFIGS = [_config(**DEFAULT_SETTINGS)]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=class_names()),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        split_examples = examples(self.builder_config)
        return {split: self._generate_examples(exs) for split, exs in split_examples.items()}

    def _generate_examples(self, exs: list[dict[str, Any]]) -> Iterator[tuple[str, dict]]:
        for ex in exs:
            yield ex["file_name"], ex


def builder(data_dir: str, **settings: Any) -> tfds.core.DatasetBuilder:
    """The embedded dataset's array_record builder in ``data_dir`` for these settings (keyword
    arguments of :func:`config_name`; defaults for the others), prepared or not."""
    config = _config(**{**DEFAULT_SETTINGS, **settings})
    # TFDS refuses a new config object named like a predeclared one: reuse that one.
    config = TitokSamplePhotos.builder_configs.get(config.name, config)
    return TitokSamplePhotos(config=config, data_dir=data_dir, file_format="array_record")


def prepare_embedded(data_dir: str | None = None, **settings: Any) -> str:
    """Prepares the embedded dataset (these settings) in ``data_dir``, by default the project
    cache (:func:`titok_jax.infra.cache.tfds_dir`), offline; returns the data dir. Idempotent: data
    already prepared with the same settings is reused, other settings go elsewhere."""
    data_dir = data_dir or cache.tfds_dir()
    if "://" in data_dir:
        raise ValueError(f"prepare the embedded dataset on a local disk, not in {data_dir!r}")
    b = builder(data_dir, **settings)
    if not b.is_prepared():
        # Nothing is downloaded; TFDS still wants a download dir: keep it inside data_dir.
        b.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
        log.info("prepared %s in %s: %s", b.info.full_name, data_dir,
                 {k: v.num_examples for k, v in b.info.splits.items()})
    return data_dir
