"""Real-photo-like JPEGs for tests and benchmarks, made offline from photos that ship in wheels.

The photos are scikit-learn's `load_sample_images()` (two 640 x 427 JPEG photos) plus, when
scikit-image is installed, the colour photographs in `skimage.data`. Every output image is a
random crop (random area and aspect) of one of them, resized to `size` and randomly flipped, then
saved as a baseline JPEG: so file sizes and decode costs look like ImageNet's (about 100 KB at
500 x 375, quality 90), not like flat synthetic noise.

Usage:
    from lmim.tools.sample_images import write_photo_jpegs
    paths = write_photo_jpegs("data/photos", 3000, num_classes=10)
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["load_photos", "write_photo_jpegs"]

# Colour photographs in skimage.data (grey scans and synthetic images are left out on purpose).
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry")


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[Image.Image, ...]:
    """The real RGB photos available offline, as PIL images (cached)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in load_sample_images().images]
    try:
        import skimage.data as skdata
    except ImportError:  # scikit-image is a dev dependency only
        skdata = None
    if skdata is not None:
        for name in _SKIMAGE_PHOTOS:
            try:
                arr = np.asarray(getattr(skdata, name)())
            except Exception:  # a photo missing from this scikit-image version (or needing pooch): skip it
                continue
            if arr.ndim == 3 and arr.shape[2] >= 3 and arr.dtype == np.uint8:
                photos.append(Image.fromarray(arr[..., :3]))
    return tuple(p.convert("RGB") for p in photos)


def _random_view(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A RandomResizedCrop-style view: area 30-100%, aspect 3/4-4/3, resized to `size`, maybe flipped."""
    w, h = photo.size
    for _ in range(10):
        area = w * h * rng.uniform(0.3, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = w, h
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    view = photo.resize(size, Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=2.0)
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return view


def write_photo_jpegs(folder: str | Path, n: int, size: tuple[int, int] = (500, 375), num_classes: int = 0,
                      seed: int = 0, quality: int = 90) -> list[Path]:
    """Write `n` real-photo-like JPEGs into `folder` and return their paths (in write order).

    Args:
        folder: output folder (created if missing).
        n: number of images.
        size: (width, height) of every image.
        num_classes: when > 0, images go to `class_000/ ... class_{num_classes-1:03d}/`; image i
            belongs to class i % num_classes and is cut from photo (class % number of photos), so
            classes differ in content. When 0 the folder is flat.
        seed: everything (crop, flip, photo choice) is a function of the seed.
        quality: JPEG quality.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for i in range(n):
        if num_classes > 0:
            cls = i % num_classes
            photo = photos[cls % len(photos)]
            out_dir = folder / f"class_{cls:03d}"
            out_dir.mkdir(exist_ok=True)
        else:
            photo = photos[int(rng.integers(len(photos)))]
            out_dir = folder
        path = out_dir / f"img_{i:06d}.jpg"
        _random_view(photo, tuple(size), rng).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths
