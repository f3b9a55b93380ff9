"""tools/datasets.py: small real datasets written as class-folder trees of PNGs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lmim.tools import datasets


def test_digits_split_is_fixed_disjoint_and_complete(tmp_path):
    tr_x, tr_y = datasets.load_digits_split("train")
    te_x, te_y = datasets.load_digits_split("test")
    assert len(tr_y) + len(te_y) == 1797
    assert len(te_y) == 360
    # Stratified: every class appears in both splits.
    assert set(tr_y.tolist()) == set(te_y.tolist()) == set(range(10))
    # Same split every call, whatever seed the caller uses for subsets.
    again_x, _ = datasets.load_digits_split("test")
    assert np.array_equal(te_x, again_x)


def test_export_digits_per_class_tree(tmp_path):
    root = datasets.export_digits(tmp_path / "d", "train", per_class=3, seed=1)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 30
    assert sorted({f.parent.name for f in files}) == sorted(datasets.DIGITS_CLASSES)
    img = Image.open(files[0])
    assert img.size == (32, 32) and img.mode == "RGB"
    assert "." not in files[0].stem  # WebDataset keys must hold no dot
    # Deterministic under the seed, different under another seed.
    again = datasets.export_digits(tmp_path / "d2", "train", per_class=3, seed=1)
    other = datasets.export_digits(tmp_path / "d3", "train", per_class=3, seed=2)
    names = lambda r: sorted(p.relative_to(r).as_posix() for p in r.rglob("*.png"))  # noqa: E731
    pix = lambda r: [np.asarray(Image.open(p)).tobytes() for p in sorted(r.rglob("*.png"))]  # noqa: E731
    assert names(root) == names(again) and pix(root) == pix(again)
    assert pix(root) != pix(other)


def test_export_refuses_existing_and_leaves_nothing_half_written(tmp_path):
    dst = tmp_path / "d"
    datasets.export_digits(dst, "test", limit=5)
    with pytest.raises(FileExistsError, match="already exists"):
        datasets.export_digits(dst, "test", limit=5)
    datasets.export_digits(dst, "test", limit=7, overwrite=True)
    assert len(list(dst.rglob("*.png"))) == 7
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp folder left over


def test_fashion_mnist_missing_gives_install_hint(tmp_path):
    assert not datasets.fashion_mnist_available(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.export_fashion_mnist(tmp_path / "out", "train", limit=3, root=tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not datasets.fashion_mnist_available(), reason="dataset-fashion-mnist not installed")
def test_export_fashion_mnist_balanced_subset(tmp_path):
    x, y = datasets.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    root = datasets.export_fashion_mnist(tmp_path / "f", "test", per_class=2, seed=0)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 20
    assert {f.parent.name for f in files} == set(datasets.FASHION_MNIST_CLASSES)
    assert Image.open(files[0]).size == (28, 28)
    # The pixels are the IDX pixels (grey replicated to RGB).
    cls = files[0].parent.name
    arr = np.asarray(Image.open(files[0]))
    assert (arr[..., 0] == arr[..., 1]).all()
    assert any(np.array_equal(arr[..., 0], x[i]) for i in np.flatnonzero(y == datasets.FASHION_MNIST_CLASSES.index(cls)))
