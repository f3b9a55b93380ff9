"""Small real image datasets that need no download, written as class-folder trees of PNGs.

Two sources, both real photographs/scans rather than synthetic noise:

- Fashion-MNIST (70,000 grey 28 x 28 images, 10 classes) from the Debian package
  `dataset-fashion-mnist`, which puts the gzip IDX files in `/usr/share/datasets/fashion-mnist/`.
- scikit-learn's `load_digits()` (1,797 grey 8 x 8 hand-written digits, 10 classes), which ships
  inside the scikit-learn wheel and therefore always exists: the fallback.

Both are written as `dst/{class_name}/{class_name}_{index:05d}.png` (RGB, so every decoder and
transform downstream sees the same 3-channel images as with ImageNet), the layout
`lmim.tools.shard.build_dataset` expects. A tree is written into a temporary sibling folder and
renamed into place at the end, so `dst` is either complete or absent.

Usage:
    from lmim.tools.datasets import export_fashion_mnist, export_digits, fashion_mnist_available
    root = export_fashion_mnist("data/fmnist-train", "train", per_class=500)
"""
from __future__ import annotations

import gzip
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "DIGITS_CLASSES",
    "fashion_mnist_available",
    "load_fashion_mnist",
    "load_digits_split",
    "export_fashion_mnist",
    "export_digits",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Folder names: the official class names with characters a path or a WebDataset key dislikes replaced.
FASHION_MNIST_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
DIGITS_CLASSES = tuple(f"digit_{d}" for d in range(10))
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0  # fixed: the train/test split must never depend on the caller's seed


def fashion_mnist_available(root: str | Path = FASHION_MNIST_DIR) -> bool:
    """True when all four Fashion-MNIST IDX files are installed under `root`."""
    root = Path(root)
    return all((root / f).is_file() for pair in _FMNIST_FILES.values() for f in pair)


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzip IDX file (the MNIST format: magic, dims as big-endian uint32, uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()}).")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} bytes of data, found {arr.size}.")
    return arr.reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as arrays.

    Args:
        split: "train" (60,000) or "test" (10,000).
        root: folder holding the gzip IDX files.

    Returns:
        (images [N, 28, 28] uint8, labels [N] int64).
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    root = Path(root)
    if not fashion_mnist_available(root):
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed in {root}; run `apt-get install dataset-fashion-mnist` "
            "(or use export_digits, which needs no download)."
        )
    img_file, lbl_file = _FMNIST_FILES[split]
    images = _read_idx(root / img_file)
    labels = _read_idx(root / lbl_file).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels.")
    return images, labels


def load_digits_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8 x 8 digits with a fixed stratified 80/20 train/test split.

    Returns:
        (images [N, 8, 8] uint8 in 0..255, labels [N] int64).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # The raw values are 0..16 (counts of set pixels in 4x4 blocks of the original 32x32 bitmaps).
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=_DIGITS_TEST_FRACTION, random_state=_DIGITS_SPLIT_SEED, stratify=labels
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return images[chosen], labels[chosen]


def _select(labels: np.ndarray, limit: int | None, per_class: int | None, seed: int) -> np.ndarray:
    """Indices of a deterministic subset: `per_class` per class (balanced), then at most `limit` in all.

    Selection is random under `seed` (so a subset is not just the first rows), and the result is
    sorted so the written order follows the source order.
    """
    rng = np.random.default_rng(seed)
    if per_class is not None:
        if per_class <= 0:
            raise ValueError(f"per_class must be positive, got {per_class}.")
        picked = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            picked.append(rng.permutation(members)[: per_class])
        idx = np.concatenate(picked)
    else:
        idx = np.arange(len(labels))
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}.")
        if limit < len(idx):
            idx = rng.permutation(idx)[:limit]
    return np.sort(idx)


def _write_tree(
    dst_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    size: int | None,
    overwrite: bool,
) -> Path:
    """Write images as `dst/{class}/{class}_{i:05d}.png`, atomically (temp folder, then rename).

    `images` are uint8, grey [N, H, W] or RGB [N, H, W, 3]; every file is written as RGB.
    """
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}.")
    dst = Path(dst_dir)
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} already exists; remove it or pass overwrite=True.")
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        for name in class_names:
            (tmp / name).mkdir()
        for i, (img, lbl) in enumerate(zip(images, labels)):
            pil = Image.fromarray(np.ascontiguousarray(img))   # "L" for [H, W], "RGB" for [H, W, 3]
            if size is not None and size != pil.width:
                # Bicubic: these are natural-looking images; nearest would leave blocky 8x8 digits.
                pil = pil.resize((size, size), Image.BICUBIC)
            name = class_names[int(lbl)]
            pil.convert("RGB").save(tmp / name / f"{name}_{i:05d}.png", optimize=False)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def export_fashion_mnist(
    dst_dir: str | Path,
    split: str = "train",
    limit: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    *,
    size: int | None = None,
    root: str | Path = FASHION_MNIST_DIR,
    overwrite: bool = False,
) -> Path:
    """Write (a subset of) Fashion-MNIST as a class-folder tree of RGB PNGs.

    Args:
        dst_dir: output folder (must not exist unless `overwrite`).
        split: "train" or "test".
        limit: at most this many images in all (random subset under `seed`).
        per_class: exactly this many per class (or all a class has, if fewer); applied before `limit`.
        seed: subset selection seed.
        size: resize to size x size (bicubic); None keeps 28 x 28.
        root: where the IDX files are installed.
        overwrite: replace an existing `dst_dir`.

    Returns:
        The output folder.
    """
    images, labels = load_fashion_mnist(split, root)
    idx = _select(labels, limit, per_class, seed)
    return _write_tree(dst_dir, images[idx], labels[idx], FASHION_MNIST_CLASSES, size, overwrite)


def export_digits(
    dst_dir: str | Path,
    split: str = "train",
    limit: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    *,
    size: int | None = 32,
    overwrite: bool = False,
) -> Path:
    """Write (a subset of) scikit-learn's digits as a class-folder tree of RGB PNGs.

    The 1,797 images are split 80/20 (stratified, fixed seed) into "train" (1,437) and "test"
    (360), and upscaled from 8 x 8 to `size` x `size` (default 32) so a patch-4 ViT sees an 8 x 8 grid.

    Args: as `export_fashion_mnist`.
    """
    images, labels = load_digits_split(split)
    idx = _select(labels, limit, per_class, seed)
    return _write_tree(dst_dir, images[idx], labels[idx], DIGITS_CLASSES, size, overwrite)
