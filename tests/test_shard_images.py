"""Nasty inputs: each is stored so DALI's CPU decoder returns RGB of the recorded size, or is a reject."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmim.pipeline.format.manifest import REJECTS_NAME
from tests import images as I
from tests.test_shard import read_all
from lmim.tools.shard import build_dataset, verify_dataset
from lmim.tools.shard.images import Reject, inspect_image, prepare_image

# file name -> writer; names carry dots, spaces and non-ASCII on purpose
STORED = {
    "plain.rgb.jpg": I.rgb_jpeg,
    "progressive jpeg.jpg": I.progressive_jpeg,
    "grey ünïcode.jpg": I.grey_jpeg,
    "cmyk.jpg": I.cmyk_jpeg,
    "exif rotated.jpg": I.rotated_jpeg,
    "rgb.png": I.rgb_png,
    "grey.png": I.grey_png,
    "grey alpha.png": I.grey_alpha_png,
    "rgba.png": I.rgba_png,
    "sixteen-bit.png": I.png16,
    "grey16.png": I.grey16_png,
    "palette+alpha.png": I.palette_alpha_png,
    "one-bit.png": I.one_bit_png,
    "lossy.webp": I.webp,
    "日本語.bmp": I.bmp,
    "anim.gif": I.gif,
    "scan.tiff": I.tiff,
}
REJECTED = {
    "truncated.jpg": (I.truncated_jpeg, "truncated JPEG"),
    "zero.jpg": (I.zero_bytes, "empty file"),
    "text.jpg": (I.text_as_jpeg, "not an image"),
    "bomb.png": (I.huge_png, "decompression bomb"),
    "bomb.jpg": (I.huge_jpeg_header, "decompression bomb"),
}
PASS_THROUGH_EXT = {"jpg", "png", "webp"}


@pytest.fixture(scope="module")
def nasty(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nasty")
    for name, writer in STORED.items():
        writer(root / name)
    for name, (writer, _) in REJECTED.items():
        writer(root / name)
    return root


def test_nasty_inputs_are_stored_decodable_or_rejected(nasty, tmp_path):
    dst = tmp_path / "ds"
    s = build_dataset(str(nasty), str(dst), shard_max_samples=8, workers=2, progress=False)
    assert (s.samples, s.rejects) == (len(STORED), len(REJECTED))
    assert verify_dataset(str(dst)) == []
    rejects = {r["source"]: r["reason"] for r in map(json.loads, (dst / REJECTS_NAME).read_text().splitlines())}
    assert set(rejects) == set(REJECTED)
    for name, (_, reason) in REJECTED.items():
        assert reason in rejects[name], (name, rejects[name])
    got = read_all(str(dst))                          # DALI CPU decode of every stored sample
    assert set(got) == set(STORED)
    for name in STORED:
        g = got[name]
        original = (nasty / name).read_bytes()
        suffix = name.rsplit(".", 1)[1]
        if suffix in PASS_THROUGH_EXT:
            assert g["data"] == original, f"{name} should be stored as it is"
            assert "converted" not in g["meta"]
        else:
            assert g["ext"] == "jpg" and g["meta"]["converted"].endswith("is not a pipeline format"), name
        assert g["shape"] == (g["meta"]["height"], g["meta"]["width"], 3), name
    # EXIF orientation 6: stored 48 x 32, displayed (and decoded by DALI) 32 x 48
    assert (got["exif rotated.jpg"]["meta"]["width"], got["exif rotated.jpg"]["meta"]["height"]) == (32, 48)
    # colours survive: the CMYK JPEG and the 16-bit PNG decode to the gradient they were made from
    from nvidia.dali import fn, pipeline_def, types

    expected = I.gradient().astype(np.float64)
    for name, tol in (("cmyk.jpg", 6.0), ("sixteen-bit.png", 0.5), ("日本語.bmp", 6.0)):
        data = np.frombuffer(got[name]["data"], np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            enc = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
            return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

        p = pipe()
        p.build()
        decoded = np.asarray(p.run()[0][0]).astype(np.float64)
        assert np.abs(decoded - expected).mean() < tol, name


def test_full_decode_catches_corruption_the_header_check_cannot(tmp_path):
    bad = I.corrupt_png_data(tmp_path / "bad.png")   # valid chunks and CRCs, IDAT is not zlib
    assert inspect_image(bad.read_bytes()).passthrough
    with pytest.raises(Reject, match="does not decode"):
        inspect_image(bad.read_bytes(), full_decode=True)
    src = tmp_path / "src"
    src.mkdir()
    bad.rename(src / "bad.png")
    I.rgb_jpeg(src / "good.jpg")
    s = build_dataset(str(src), str(tmp_path / "ds"), full_decode=True, progress=False)
    assert (s.samples, s.rejects) == (1, 1)


def test_cut_jpeg_with_end_marker_is_kept_because_dali_decodes_it(tmp_path):
    """A JPEG cut short that still ends with FF D9 decodes (grey-filled) in DALI and Pillow alike:
    it passes both checks, and DALI really decodes it."""
    buf = io.BytesIO()
    Image.fromarray(I.gradient(96, 64)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    cut = data[: len(data) // 2] + b"\xff\xd9"
    assert inspect_image(cut, full_decode=True).passthrough
    src = tmp_path / "src"
    src.mkdir()
    (src / "cut.jpg").write_bytes(cut)
    build_dataset(str(src), str(tmp_path / "ds"), full_decode=True, progress=False)
    assert read_all(str(tmp_path / "ds"))["cut.jpg"]["shape"] == (64, 96, 3)


def test_max_side_reencodes_only_big_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    I.rgb_jpeg(src / "big.jpg", w=200, h=100)
    I.rgb_jpeg(src / "small.jpg", w=40, h=30)
    I.rotated_jpeg(src / "big rotated.jpg", orientation=6, w=120, h=80)
    dst = tmp_path / "ds"
    build_dataset(str(src), str(dst), max_side=64, quality=90, progress=False)
    got = read_all(str(dst))
    assert got["small.jpg"]["data"] == (src / "small.jpg").read_bytes()
    assert got["big.jpg"]["shape"] == (32, 64, 3) and "longer side over 64" in got["big.jpg"]["meta"]["converted"]
    # the orientation is baked in before shrinking: displayed 80 x 120 -> 43 x 64
    assert got["big rotated.jpg"]["shape"] == (64, 43, 3)


def test_bomb_limit_is_configurable():
    data = io.BytesIO()
    Image.fromarray(I.gradient(40, 30)).save(data, "PNG")
    assert prepare_image(data.getvalue()).info.width == 40
    with pytest.raises(Reject, match="decompression bomb"):
        prepare_image(data.getvalue(), max_pixels=1000)


def test_shards_whose_inputs_are_all_rejected_are_left_out(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        I.rgb_jpeg(src / f"good{i}.jpg")
    for i in range(4):
        I.zero_bytes(src / f"empty{i}.jpg")
    dst = tmp_path / "ds"
    s = build_dataset(str(src), str(dst), shard_max_samples=1, progress=False)
    assert (s.samples, s.shards, s.rejects) == (3, 3, 4)
    assert verify_dataset(str(dst)) == []
    assert sorted(read_all(str(dst))) == ["good0.jpg", "good1.jpg", "good2.jpg"]
    assert len(list(dst.glob("*.tar"))) == 3
