"""Reading user images for the CLI: any PIL-readable file, converted to RGB, resized and
center-cropped the way the official eval transform does (shorter side -> size, bicubic with
antialias, center crop)."""
from __future__ import annotations

import glob
import os
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class BadImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def list_images(spec: str) -> list[str]:
    """Files of a directory (recursively, known image extensions), or matches of a glob."""
    if os.path.isdir(spec):
        found = [os.path.join(root, f) for root, _, files in os.walk(spec) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS)]
    elif os.path.isfile(spec):
        found = [spec]
    else:
        found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    return sorted(found)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK, 16-bit and alpha images -> 8-bit RGB (alpha over white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / max(arr.max(), 1.0) * 255.0
        return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Decodes ``path`` fully as RGB or raises :class:`BadImageError` naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImageError(f"{path}: cannot decode image ({e})") from e


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Shorter side -> ``size`` with PIL's bicubic filter, which antialiases when shrinking, as
    torchvision's ``Resize(size, BICUBIC, antialias=True)`` does; the longer side stays >= size."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return img.resize((nw, nh), Image.Resampling.BICUBIC)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side -> ``size`` (bicubic, antialiased), center crop; float32 [size, size, 3] in
    [0, 1]."""
    img = resize_shorter_side(img, size)
    nw, nh = img.size
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.float32) / 255.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)


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
