"""Procedural "shapes" images: the class is the outline of a shape, everything else is nuisance.

A quality benchmark where the label is not in the pixel statistics: each image is a background
crop of a real photograph and one shape filled with a crop of another (or the same) photograph,
at a random position, scale, rotation and slight stretch. Colour, brightness and contrast are
jittered independently for shape and background (grey conversion, hue rotation, per-channel gain,
contrast, mean level), and which of the two is brighter is random, so colour and texture carry no
class information: only the outline does. A pixel-reconstruction objective spends its capacity on
the texture; the label needs the shape.

Classes (`SHAPES_CLASSES`, alphabetical so that a label is also the index the shard builder gives
the class folder): arrow, circle, crescent, heart, hexagon, plus, ring, square, star, triangle.

Textures come only from images shipped inside installed wheels, never from the network: the
bundled files of `skimage/data/` (read straight from the package folder with PIL, so scikit-image's
downloader is never involved) and scikit-learn's `load_sample_images()` (china, flower). When
scikit-image is not installed, the two scikit-learn photographs alone are used.

Train and test never share texture pixels: the "train" split crops only the left half of every
photograph and the "test" split only the right half, so a k-NN cannot match a test image to a
training image by its texture.

Deterministic: the same (seed, split, n_per_class, size) gives byte-identical images. Each class
draws its random parameters from its own generator as rows of one matrix, so the first n images of
a class are the same for any `n_per_class` >= n, and `size` changes only the resolution of the same
scenes. Rendering is vectorised over batches: the shape mask is computed at 4 x 4 samples per pixel
and the textures at 2 x 2 (nearest-neighbour), both box-filtered down, so edges are anti-aliased.

Usage:
    from lmim.tools.shapes import SHAPES_CLASSES, render_shapes, export_shapes
    x, y = render_shapes(100, "train", seed=0)            # uint8 [1000, 32, 32, 3], int64 [1000]
    root = export_shapes("data/shapes-train", "train", per_class=1000)
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SHAPES_CLASSES", "render_shapes", "export_shapes", "texture_names"]

SHAPES_CLASSES: tuple[str, ...] = (
    "arrow", "circle", "crescent", "heart", "hexagon", "plus", "ring", "square", "star", "triangle",
)
_SPLITS = {"train": 0, "test": 1}

# skimage/data files that ship in the wheel and are photographs or scans with real texture
# (synthetic ones such as the chessboard, colour wheel, logo and phantom are left out).
_SKIMAGE_FILES = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "page.png",
    "retina.jpg", "rocket.jpg", "text.png",
)

_MASK_SS = 4        # mask samples per pixel side (anti-aliased edges)
_TEX_SS = 2         # texture samples per pixel side
_BATCH = 256        # images rendered at once (bounds memory: ~256 x 128 x 128 floats per temporary)

# Shape geometry, as fractions of the image side; a unit shape fits in the unit disc.
_RADIUS = (0.26, 0.44)       # half-size of the shape
_STRETCH = (0.85, 1.18)      # aspect ratio of the (rotated) shape
_ROTATION = (-np.pi, np.pi)  # rotation of the shape (radians)
# Texture crop: side of the (rotated) source window as a fraction of the smaller side of the half photo.
_CROP = (0.15, 0.7)
# Colour jitter.
_P_GREY = 0.25
_GAIN = (0.6, 1.6)           # per-channel gain (log-uniform)
_CONTRAST_BG = (0.2, 0.8)    # texture contrast of the background
_CONTRAST_FG = (0.0, 0.4)    # texture contrast of the shape (fainter: the outline must stay learnable)
_LEVEL = (0.2, 0.8)          # background mean level
_LEVEL_GAP = (0.25, 0.45)    # |shape mean level - background mean level|

# Lighting: the whole image times 1 + a * (linear ramp from -1/2 to 1/2 along a random direction).
_LIGHT = (0.4, 1.2)

# Random numbers per image: one row of uniforms, consumed in this order.
_U_SHAPE = 5                 # centre x, centre y, radius, rotation, stretch
_U_LAYER = 13                # texture, crop, angle, x, y, grey, hue, gain r/g/b, contrast, level, sign
_U_LIGHT = 2                 # amplitude, direction
_U_TOTAL = _U_SHAPE + 2 * _U_LAYER + _U_LIGHT


# ----------------------------------------------------------------------------- textures
def texture_names() -> list[str]:
    """Names of the photographs used as textures on this installation (in the order they are indexed)."""
    return [name for name, _ in _load_photos()]


@functools.lru_cache(maxsize=1)
def _load_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, uint8 [H, W, 3]) of every texture photograph; grey scans are repeated to 3 channels."""
    photos: list[tuple[str, np.ndarray]] = []
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
        for fname in _SKIMAGE_FILES:
            path = folder / fname
            if path.is_file():
                with Image.open(path) as im:
                    photos.append((path.stem, np.asarray(im.convert("RGB"))))
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images):
        photos.append((Path(fname).stem, np.asarray(img, dtype=np.uint8)[..., :3]))
    return tuple(photos)


@functools.lru_cache(maxsize=2)
def _textures(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The split's half of every photograph, packed: (RGBA pixels [P] as uint32, offset, height, width per photo)."""
    half = _SPLITS[split]
    pieces, offsets, heights, widths = [], [], [], []
    offset = 0
    for _, img in _load_photos():
        w = img.shape[1] // 2
        part = img[:, half * w:(half + 1) * w]          # left half for train, right half for test
        rgba = np.zeros((*part.shape[:2], 4), np.uint8)
        rgba[..., :3] = part
        pieces.append(rgba.reshape(-1, 4))
        offsets.append(offset)
        heights.append(part.shape[0])
        widths.append(part.shape[1])
        offset += part.shape[0] * part.shape[1]
    # One uint32 per RGBA pixel: a gather moves one word per sample instead of three bytes.
    return (np.concatenate(pieces).view(np.uint32)[:, 0], np.array(offsets, np.int64), np.array(heights, np.int64),
            np.array(widths, np.int64))


# ----------------------------------------------------------------------------- shapes
def _half_planes(u: np.ndarray, v: np.ndarray, m: int, apothem: float, phase: float = np.pi / 2) -> list[np.ndarray]:
    """Signed distances (positive outside) to the m edge lines of a regular m-gon of the given apothem
    whose vertex 0 points at angle `phase`; its edge normals point half a step away from the vertices."""
    out = []
    for k in range(m):
        a = phase + (k + 0.5) * 2 * np.pi / m
        out.append(u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)) - np.float32(apothem))
    return out


def _polygon(u: np.ndarray, v: np.ndarray, m: int, radius: float) -> np.ndarray:
    """Inside a regular m-gon of circumradius `radius`, vertex up: on the inner side of every edge line."""
    inside = np.ones(u.shape, dtype=bool)
    for d in _half_planes(u, v, m, radius * np.cos(np.pi / m)):
        inside &= d < 0
    return inside


def _pentagram(u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Inside a regular five-pointed star of tip radius `radius`, tip up. Its five edge lines are those of
    the inner pentagon: the pentagon is on the inner side of all five, each tip is beyond exactly one,
    and everything outside the star is beyond two or more."""
    inner = radius * np.sin(np.pi / 10) / np.sin(7 * np.pi / 10)      # radius of the inner pentagon (0.382 R)
    beyond = np.zeros(u.shape, dtype=np.uint8)
    # The inner pentagon's vertices sit between the tips: phase rotated by half a step.
    for d in _half_planes(u, v, 5, inner * np.cos(np.pi / 5), phase=np.pi / 2 + np.pi / 5):
        beyond += d > 0
    return beyond <= 1


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-mask of class `cls` in shape coordinates (u right, v up; the shape fits the unit disc)."""
    name = SHAPES_CLASSES[cls]
    if name == "arrow":
        av = np.abs(v)
        shaft = (av < 0.2) & (u > -0.9) & (u < 0.15)
        head = (u >= 0.1) & (av < (0.62 / 0.85) * (0.95 - u))
        return shaft | head
    if name == "circle":
        return u * u + v * v < 0.88 ** 2
    if name == "crescent":
        return (u * u + v * v < 0.92 ** 2) & ((u - 0.42) ** 2 + v * v > 0.72 ** 2)
    if name == "heart":
        # (x^2 + y^2 - 1)^3 < x^2 y^3, the classic implicit heart, scaled and shifted into the unit disc.
        x2, y = (1.2 * u) ** 2, 1.2 * v + 0.1
        return (x2 + y * y - 1) ** 3 < x2 * y ** 3
    if name == "hexagon":
        return _polygon(u, v, 6, 0.92)
    if name == "plus":
        au, av = np.abs(u), np.abs(v)
        return ((au < 0.3) & (av < 0.88)) | ((av < 0.3) & (au < 0.88))
    if name == "ring":
        r2 = u * u + v * v
        return (r2 < 0.92 ** 2) & (r2 > 0.55 ** 2)
    if name == "square":
        return (np.abs(u) < 0.7) & (np.abs(v) < 0.7)
    if name == "star":
        return _pentagram(u, v, 1.0)
    if name == "triangle":
        return _polygon(u, v, 3, 1.02)
    raise AssertionError(name)


# ----------------------------------------------------------------------------- rendering
def _lerp(t: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
    return lo_hi[0] + t * (lo_hi[1] - lo_hi[0])


def _log_lerp(t: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
    return np.exp(_lerp(t, (np.log(lo_hi[0]), np.log(lo_hi[1]))))


def _box_sum(x: np.ndarray, f: int) -> np.ndarray:
    """Sum f x f blocks of the two axes after the batch axis: [B, H*f, W*f, ...] -> [B, H, W, ...].

    Explicit slice additions: several times faster than a reshape + sum over two axes."""
    b, h, w, rest = x.shape[0], x.shape[1] // f, x.shape[2] // f, x.shape[3:]
    rows = x.reshape(b, h, f, w * f, *rest)
    x = sum(rows[:, :, i] for i in range(1, f)) + rows[:, :, 0]
    cols = x.reshape(b, h, w, f, *rest)
    return sum(cols[:, :, :, i] for i in range(1, f)) + cols[:, :, :, 0]


def _affine_grid(n: int, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 [B, n, n]: a * x + b * y + c at the n x n sample positions x, y in [0, 1) (pixel centres)."""
    g = (np.arange(n, dtype=np.float32) + 0.5) / n
    f32 = lambda t: t.astype(np.float32)[:, None, None]  # noqa: E731
    return f32(a) * g[None, None, :] + (f32(b) * g[None, :, None] + f32(c))


_LUMA = np.array([0.299, 0.587, 0.114])
_SKEW = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / np.sqrt(3)   # cross-product matrix of (1, 1, 1) / sqrt(3)


def _texture_layer(u: np.ndarray, split: str, size: int) -> np.ndarray:
    """float32 [B, size, size, 3], roughly in [0, 1.6]: a rotated crop of a photograph, colour-jittered,
    from uniforms u [B, _U_LAYER]."""
    packed, offsets, heights, widths = _textures(split)
    t = np.minimum((u[:, 0] * len(offsets)).astype(np.int64), len(offsets) - 1)
    h, w = heights[t].astype(np.float64), widths[t].astype(np.float64)
    # A window of side `side` rotated by `phi` has half-extent e; its centre is placed so it fits.
    side = _log_lerp(u[:, 1], _CROP) * np.minimum(h, w) / np.sqrt(2)
    phi = u[:, 2] * 2 * np.pi
    cos, sin = np.cos(phi), np.sin(phi)
    e = 0.5 * side * (np.abs(cos) + np.abs(sin))
    cx = e + u[:, 3] * np.maximum(w - 2 * e, 0)
    cy = e + u[:, 4] * np.maximum(h - 2 * e, 0)
    # Source position of output sample (x, y) in [0, 1)^2: centre + side * R(phi) (x - 1/2, y - 1/2).
    n = size * _TEX_SS
    sx = _affine_grid(n, side * cos, -side * sin, cx - 0.5 * side * (cos - sin))
    sy = _affine_grid(n, side * sin, side * cos, cy - 0.5 * side * (sin + cos))
    ix = np.clip(sx.astype(np.int64), 0, (widths[t] - 1)[:, None, None])
    iy = np.clip(sy.astype(np.int64), 0, (heights[t] - 1)[:, None, None])
    rgba = packed[offsets[t][:, None, None] + iy * widths[t][:, None, None] + ix].view(np.uint8)  # [B, n, 4n]
    x = _box_sum(rgba.reshape(-1, n, n, 4)[..., :3].astype(np.float32), _TEX_SS)        # [B, size, size, 3]

    # One 3 x 3 colour matrix per image: grey (luma) for some, then a hue rotation about the grey axis
    # (Rodrigues' formula), then per-channel gains.
    a = u[:, 6] * 2 * np.pi
    rot = (np.cos(a)[:, None, None] * np.eye(3) + ((1 - np.cos(a)) / 3)[:, None, None] * np.ones((3, 3))
           + np.sin(a)[:, None, None] * _SKEW)
    grey = np.where((u[:, 5] < _P_GREY)[:, None, None], np.tile(_LUMA, (3, 1)), np.eye(3))
    gain = _log_lerp(u[:, 7:10], _GAIN)
    mat = gain[:, :, None] * rot @ grey / (255 * _TEX_SS ** 2)              # also undoes the box sum and 0..255
    b = x.shape[0]
    return (x.reshape(b, -1, 3) @ mat.transpose(0, 2, 1).astype(np.float32)).reshape(b, size, size, 3)


def _render_batch(u: np.ndarray, labels: np.ndarray, split: str, size: int) -> np.ndarray:
    """uint8 [B, size, size, 3] from uniforms u [B, _U_TOTAL] and labels [B] (in runs of equal labels)."""
    b = u.shape[0]
    us = u[:, :_U_SHAPE]
    ub, uf = u[:, _U_SHAPE:_U_SHAPE + _U_LAYER], u[:, _U_SHAPE + _U_LAYER:_U_SHAPE + 2 * _U_LAYER]
    ul = u[:, _U_SHAPE + 2 * _U_LAYER:]

    # Shape coverage: the mask at _MASK_SS^2 points per pixel. Shape coordinates (su, sv): image
    # coordinates (side = 1, y down) minus the centre, rotated by theta, divided by the radius and
    # stretched (sqrt(stretch) wider, sqrt(stretch) lower).
    radius = _lerp(us[:, 2], _RADIUS)
    cx = radius + us[:, 0] * (1 - 2 * radius)
    cy = radius + us[:, 1] * (1 - 2 * radius)
    theta = _lerp(us[:, 3], _ROTATION)
    stretch = np.sqrt(_log_lerp(us[:, 4], _STRETCH))
    cos, sin = np.cos(theta), np.sin(theta)
    ku, kv = 1 / (radius * stretch), stretch / radius
    n = size * _MASK_SS
    # su = ku * ((x - cx) cos + (cy - y) sin),  sv = kv * ((cy - y) cos - (x - cx) sin)
    su = _affine_grid(n, ku * cos, -ku * sin, ku * (cy * sin - cx * cos))
    sv = _affine_grid(n, -kv * sin, -kv * cos, kv * (cy * cos + cx * sin))
    mask = np.empty((b, n, n), dtype=bool)
    edges = np.flatnonzero(np.diff(labels)) + 1
    for lo, hi in zip([0, *edges], [*edges, b]):
        mask[lo:hi] = _shape_mask(int(labels[lo]), su[lo:hi], sv[lo:hi])
    cover = _box_sum(mask.view(np.uint8), _MASK_SS)[..., None] * np.float32(1 / _MASK_SS ** 2)  # [B, s, s, 1]

    # Contrast and mean level per layer: the shape's mean level differs from the background's by a
    # random gap of random sign, so the outline is always visible but brightness says nothing of the class.
    level_bg = _lerp(ub[:, 11], _LEVEL)
    gap = _lerp(uf[:, 11], _LEVEL_GAP) * np.where(uf[:, 12] < 0.5, -1.0, 1.0)
    level_fg = level_bg + gap
    level_fg = np.where((level_fg < 0.05) | (level_fg > 0.95), level_bg - gap, level_fg)
    layers = []
    for uu, level, contrast_range in ((ub, level_bg, _CONTRAST_BG), (uf, level_fg, _CONTRAST_FG)):
        x = _texture_layer(uu, split, size)
        contrast = _lerp(uu[:, 10], contrast_range)
        shift = level - contrast * x.mean(axis=(1, 2, 3))
        x *= contrast.astype(np.float32)[:, None, None, None]
        x += shift.astype(np.float32)[:, None, None, None]
        layers.append(np.clip(x, 0, 1, out=x))
    bg, fg = layers
    img = bg + cover * (fg - bg)
    # Uneven lighting: a smooth multiplicative ramp. Local edges survive it, but it moves every
    # pixel of the image together, which is what a pixel-space comparison looks at.
    amp = _lerp(ul[:, 0], _LIGHT)
    psi = ul[:, 1] * 2 * np.pi
    ramp = _affine_grid(size, amp * np.cos(psi), amp * np.sin(psi), 1 - 0.5 * amp * (np.cos(psi) + np.sin(psi)))
    img *= ramp[..., None]
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


def render_shapes(n_per_class: int, split: str = "train", seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Render a balanced shapes dataset.

    Args:
        n_per_class: images per class (the result has N = 10 * n_per_class images, class-major order).
        split: "train" (textures from the left half of each photograph) or "test" (right half).
        seed: any non-negative int; the same (seed, split, n_per_class, size) gives identical bytes.
        size: side in pixels.

    Returns:
        (uint8 images [N, size, size, 3], int64 labels [N]); label i is SHAPES_CLASSES[i].
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if n_per_class <= 0:
        raise ValueError(f"n_per_class must be positive, got {n_per_class}.")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}.")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    ncls = len(SHAPES_CLASSES)
    # One generator per (seed, split, class); its rows are images, so a smaller n is a prefix.
    u = np.concatenate([np.random.default_rng([seed, _SPLITS[split], c]).random((n_per_class, _U_TOTAL))
                        for c in range(ncls)])
    labels = np.repeat(np.arange(ncls, dtype=np.int64), n_per_class)
    images = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for start in range(0, len(labels), _BATCH):
        stop = min(start + _BATCH, len(labels))
        images[start:stop] = _render_batch(u[start:stop], labels[start:stop], split, size)
    return images, labels


def export_shapes(dst_dir: str | Path, split: str = "train", per_class: int = 1000, seed: int = 0, *,
                  size: int = 32, overwrite: bool = False) -> Path:
    """Write a shapes dataset as a class-folder tree `dst/{class}/{class}_{i:05d}.png` (RGB PNGs).

    Written atomically (temp folder, then rename; see `lmim.tools.datasets._write_tree`): `dst_dir` is
    either complete or absent. An existing `dst_dir` is refused unless `overwrite`.

    Returns:
        The output folder.
    """
    from lmim.tools.datasets import _write_tree

    images, labels = render_shapes(per_class, split, seed, size)
    return _write_tree(dst_dir, images, labels, SHAPES_CLASSES, None, overwrite)
