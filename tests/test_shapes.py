"""tools/shapes.py: procedural shapes on real photo textures, where only the outline is the class."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmim.tools import shapes
from lmim.tools.shapes import SHAPES_CLASSES, export_shapes, render_shapes


def test_classes_are_ten_sorted_plain_names():
    assert len(SHAPES_CLASSES) == 10 and len(set(SHAPES_CLASSES)) == 10
    # Sorted, so label i is also the index the shard builder gives folder SHAPES_CLASSES[i].
    assert list(SHAPES_CLASSES) == sorted(SHAPES_CLASSES)
    assert all(name.isidentifier() and "." not in name for name in SHAPES_CLASSES)


def test_textures_come_from_installed_packages_only():
    names = shapes.texture_names()
    assert {"china", "flower"} <= set(names)                   # scikit-learn's, always there
    if __import__("importlib").util.find_spec("skimage") is not None:
        assert len(names) > 10


def test_render_shapes_arrays_balanced_and_deterministic():
    x, y = render_shapes(6, "train", seed=3)
    assert x.shape == (60, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (60,) and y.dtype == np.int64
    assert np.bincount(y, minlength=10).tolist() == [6] * 10
    x2, y2 = render_shapes(6, "train", seed=3)
    assert x.tobytes() == x2.tobytes() and np.array_equal(y, y2)
    x3, _ = render_shapes(6, "train", seed=4)
    assert not np.array_equal(x, x3)
    xt, _ = render_shapes(6, "test", seed=3)
    assert not np.array_equal(x, xt)
    # A class's first images do not depend on how many are asked for.
    x4, _ = render_shapes(4, "train", seed=3)
    assert np.array_equal(x4[:4], x[:4])
    # Other sizes render the same scenes at another resolution.
    big, _ = render_shapes(2, "train", seed=3, size=48)
    assert big.shape == (20, 48, 48, 3)
    small = np.asarray(Image.fromarray(big[0]).resize((32, 32), Image.BILINEAR), dtype=np.float32)
    assert np.abs(small - x[0]).mean() < 20
    with pytest.raises(ValueError, match="split"):
        render_shapes(1, "val")


def test_every_image_shows_a_visible_shape():
    # Shape and background always differ in mean level, so no image is a plain texture crop:
    # each has a clear spread of values.
    x, _ = render_shapes(20, "test", seed=0)
    spread = x.reshape(len(x), -1).astype(np.float32).std(axis=1)
    assert spread.min() > 8


def test_colour_is_not_the_label():
    x, y = render_shapes(60, "train", seed=0)
    xt, yt = render_shapes(30, "test", seed=0)
    # The same class comes in very different colours...
    means = x[y == 0].reshape(60, -1, 3).mean(axis=1)
    assert means.std(axis=0).min() > 20
    # ...and a nearest-class-mean classifier on the mean RGB of an image is near chance (10 %).
    centroids = np.stack([x[y == c].reshape(-1, 3).mean(axis=0) for c in range(10)])
    feats = xt.reshape(len(xt), -1, 3).mean(axis=1)
    pred = np.argmin(((feats[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == yt).mean() < 0.25


def test_export_tree_shards_and_reads_back(tmp_path):
    from lmim.tools.shard import build_dataset
    from lmim.train.evaluate.features import eval_loader, extract

    src = export_shapes(tmp_path / "src", "test", per_class=3, seed=1)
    files = sorted(src.rglob("*.png"))
    assert len(files) == 30
    assert sorted({f.parent.name for f in files}) == sorted(SHAPES_CLASSES)
    img = Image.open(files[0])
    assert img.size == (32, 32) and img.mode == "RGB"
    # The files hold exactly the rendered pixels (PNG is lossless).
    x, _ = render_shapes(3, "test", seed=1)
    first = src / SHAPES_CLASSES[0] / f"{SHAPES_CLASSES[0]}_00000.png"
    assert np.array_equal(np.asarray(Image.open(first)), x[0])
    with pytest.raises(FileExistsError, match="already exists"):
        export_shapes(src, "test", per_class=3, seed=1)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]      # no temp folder left over

    build_dataset(str(src), str(tmp_path / "shards"), shard_max_samples=8, workers=1, seed=0, progress=False)
    import timm

    enc = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                            num_classes=0)
    out = extract(enc, eval_loader(enc, str(tmp_path / "shards"), batch_size=7))
    assert out["labels"].shape == (30,) and out["labels"].bincount().tolist() == [3] * 10
    # The shard builder keeps the class folder in each key and labels folders in sorted order.
    for key, label in zip(out["keys"], out["labels"].tolist()):
        assert SHAPES_CLASSES[label] in key, (key, label)


def test_export_overwrite_replaces(tmp_path):
    dst = export_shapes(tmp_path / "d", "train", per_class=1)
    export_shapes(dst, "train", per_class=2, overwrite=True)
    assert len(list(Path(dst).rglob("*.png"))) == 20


def test_write_tree_still_writes_grey_as_rgb(tmp_path):
    from lmim.tools.datasets import _write_tree

    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    root = _write_tree(tmp_path / "g", grey, np.array([0, 1]), ("a", "b"), None, False)
    img = Image.open(root / "b" / "b_00001.png")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 1], grey[1])
    with pytest.raises(ValueError, match="uint8"):
        _write_tree(tmp_path / "f", grey.astype(np.float32), np.array([0, 1]), ("a", "b"), None, False)
