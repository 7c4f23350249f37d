"""Image decoding and the official resize arithmetic.

:func:`resized_size`, :func:`center_crop_offsets` and :func:`resize_center_crop` are exactly
torchvision's ``Resize(size, interpolation=BICUBIC, antialias=True)`` + ``CenterCrop(size)``
on a PIL image, the official TiTok eval transform: the shorter side becomes ``size``, the longer
one ``int(size * long / short)`` (truncated), PIL's bicubic filter does the resampling (it
antialiases when shrinking, which is what torchvision calls on PIL images), and the crop starts
at ``int(round((side - size) / 2.0))`` (Python's round: halves go to the even neighbour).

User image files (the CLI) are read here too; paths go through ``etils.epath``, so a folder, an
image or an output PNG may be ``gs://``.
"""
from __future__ import annotations

import os
from typing import IO, Iterable

import numpy as np
from etils import epath
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class BadImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK, 16-bit and alpha images -> 8-bit RGB (alpha over white). The
    pixels stay as stored: no EXIF rotation (see :func:`load_image` for user files)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / max(arr.max(), 1.0) * 255.0
        return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike | IO[bytes], *, exif_transpose: bool = True
               ) -> Image.Image:
    """Decodes a user image file (a path, local or ``gs://``, or a binary file object) fully as
    RGB, or raises :class:`BadImageError` naming it.

    ``exif_transpose``: apply the EXIF orientation tag first (the default), so a phone photo is
    reconstructed the way viewers show it and its PNG outputs, which carry no EXIF, line up with
    it. Dataset records are decoded without it (:func:`titok_jax.data.pipeline.decode_rgb`),
    as the official pipeline does; pass False for protocol-exact metrics on a folder of dataset
    images.
    """
    is_path = isinstance(path, (str, os.PathLike))
    name = os.fspath(path) if is_path else getattr(path, "name", "<file object>")
    try:
        if is_path:
            with epath.Path(path).open("rb") as f:
                return _decode(f, exif_transpose)
        return _decode(path, exif_transpose)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImageError(f"{name}: cannot decode image ({e})") from e


def _decode(f: IO[bytes], exif_transpose: bool) -> Image.Image:
    with Image.open(f) as img:
        # load() forces the whole decode, so a truncated file fails here, not later.
        img.load()
        return to_rgb(ImageOps.exif_transpose(img) if exif_transpose else img)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: shorter side ``size``, longer side
    ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of torchvision's ``CenterCrop(size)`` on a ``width`` x ``height`` image."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Shorter side -> ``size`` (:func:`resized_size`) with PIL's bicubic filter, which
    antialiases when shrinking, as torchvision's ``Resize(size, BICUBIC, antialias=True)`` does
    on PIL images."""
    return img.resize(resized_size(*img.size, size), Image.Resampling.BICUBIC)


def center_crop_uint8(img: Image.Image, size: int) -> np.ndarray:
    """The official eval transform: :func:`resize_shorter_side`, then the centre crop of
    :func:`center_crop_offsets`; uint8 [size, size, 3]."""
    img = resize_shorter_side(img, size)
    left, top = center_crop_offsets(*img.size, size)
    return np.asarray(img.crop((left, top, left + size, top + size)))


def to_unit_float(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1], exactly ``float32(x) / 255`` (torchvision's
    ``ToTensor``), written into ``out`` when given (e.g. a whole batch in shared memory)."""
    return np.divide(pixels, np.float32(255.0), out=out, dtype=np.float32)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """:func:`center_crop_uint8` as float32 [size, size, 3] in [0, 1]."""
    return to_unit_float(center_crop_uint8(img, size))


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Writes float [H, W, 3] in [0, 1] as an 8-bit PNG (local or e.g. ``gs://``), creating the
    folder."""
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        Image.fromarray(to_uint8(image)).save(f, format="PNG")


def side_by_side_grid(pairs: Iterable[tuple[np.ndarray, np.ndarray]], pad: int = 4,
                      min_size: int = 256) -> np.ndarray:
    """Rows of (input | reconstruction) with a white gutter; float [H, W, 3] in [0, 1]. Images
    smaller than ``min_size`` are enlarged by an integer nearest-neighbour factor."""
    rows = []
    for original, recon in pairs:
        k = max(1, min_size // original.shape[0])
        original, recon = (np.repeat(np.repeat(a, k, 0), k, 1) for a in (original, recon))
        h = original.shape[0]
        gutter = np.ones((h, pad, 3), np.float32)
        rows.append(np.concatenate([original, gutter, recon], axis=1))
        rows.append(np.ones((pad, rows[-1].shape[1], 3), np.float32))
    if not rows:
        raise ValueError("no images for the grid")
    return np.concatenate(rows[:-1], axis=0)


def image_grid(images: Iterable[np.ndarray], columns: int = 8, pad: int = 4,
               min_size: int = 128) -> np.ndarray:
    """Images [H, W, 3] (floats in [0, 1] or uint8) tiled row-major, ``columns`` per row, with a
    white gutter; float [H', W', 3] in [0, 1]. Images smaller than ``min_size`` are enlarged by
    an integer nearest-neighbour factor; a short last row is padded with white."""
    tiles = [np.asarray(a, np.float32) / (255.0 if np.asarray(a).dtype == np.uint8 else 1.0)
             for a in images]
    if not tiles:
        raise ValueError("no images for the grid")
    k = max(1, min_size // tiles[0].shape[0])
    tiles = [np.repeat(np.repeat(t, k, 0), k, 1) for t in tiles]
    h, w = tiles[0].shape[:2]
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    grid = np.ones((rows * h + (rows - 1) * pad, columns * w + (columns - 1) * pad, 3),
                   np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tile
    return grid
