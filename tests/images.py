"""Helpers that write the awkward images real corpora contain, for the shard builder's tests.

Every writer takes a path and returns it. All images are small (tests stay fast) and made from
a smooth colour gradient, so a decoded image can be compared with what was written.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(w: int = 48, h: int = 32) -> np.ndarray:
    """An RGB uint8 gradient (h, w, 3)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(w + h - 2, 1)],
                    axis=-1).astype(np.uint8)


def rgb_jpeg(path: Path, w: int = 48, h: int = 32, **save) -> Path:
    Image.fromarray(gradient(w, h)).save(path, "JPEG", quality=90, **save)
    return Path(path)


def progressive_jpeg(path: Path) -> Path:
    return rgb_jpeg(path, progressive=True)


def grey_jpeg(path: Path) -> Path:
    Image.fromarray(gradient()[..., 0]).save(path, "JPEG", quality=90)
    return Path(path)


def cmyk_jpeg(path: Path) -> Path:
    Image.fromarray(gradient()).convert("CMYK").save(path, "JPEG", quality=90)
    return Path(path)


def rotated_jpeg(path: Path, orientation: int = 6, w: int = 48, h: int = 32) -> Path:
    """A JPEG stored w x h with an EXIF orientation tag (6: displayed rotated 90 degrees, h x w)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(gradient(w, h)).save(path, "JPEG", quality=90, exif=exif.tobytes())
    return Path(path)


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(gradient(96, 64)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    Path(path).write_bytes(data[: len(data) * 2 // 3])
    return Path(path)


def rgb_png(path: Path) -> Path:
    Image.fromarray(gradient()).save(path, "PNG")
    return Path(path)


def grey_png(path: Path) -> Path:
    Image.fromarray(gradient()[..., 1]).save(path, "PNG")
    return Path(path)


def grey_alpha_png(path: Path) -> Path:
    g = gradient()
    Image.fromarray(np.stack([g[..., 0], g[..., 1]], -1), "LA").save(path, "PNG")
    return Path(path)


def rgba_png(path: Path) -> Path:
    g = gradient()
    Image.fromarray(np.concatenate([g, g[..., :1]], -1), "RGBA").save(path, "PNG")
    return Path(path)


def png16(path: Path) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one, so the chunks are written here)."""
    g = gradient().astype(">u2") * 257
    h, w, _ = g.shape
    raw = b"".join(b"\x00" + g[r].tobytes() for r in range(h))
    return Path(path).write_bytes(_png(w, h, 16, 2, zlib.compress(raw))) and Path(path)


def grey16_png(path: Path) -> Path:
    g = gradient()[..., 0].astype(np.uint16) * 257
    Image.fromarray(g).save(path, "PNG")  # Pillow writes mode I;16 as a 16-bit grey PNG
    return Path(path)


def palette_alpha_png(path: Path) -> Path:
    """A palette PNG with a tRNS chunk (transparent palette entries)."""
    im = Image.fromarray(gradient()).quantize(16)
    im.info["transparency"] = 0
    im.save(path, "PNG", transparency=0)
    return Path(path)


def one_bit_png(path: Path) -> Path:
    Image.fromarray(gradient()[..., 0] > 127).convert("1").save(path, "PNG")
    return Path(path)


def webp(path: Path, lossless: bool = False, alpha: bool = False) -> Path:
    im = Image.fromarray(gradient())
    if alpha:
        im = im.convert("RGBA")
    im.save(path, "WEBP", lossless=lossless, quality=90)
    return Path(path)


def gif(path: Path) -> Path:
    Image.fromarray(gradient()).convert("P").save(path, "GIF")
    return Path(path)


def bmp(path: Path) -> Path:
    Image.fromarray(gradient()).save(path, "BMP")
    return Path(path)


def tiff(path: Path) -> Path:
    Image.fromarray(gradient()).save(path, "TIFF")
    return Path(path)


def huge_png(path: Path, side: int = 100_000) -> Path:
    """A tiny file that declares a side x side image (a decompression bomb)."""
    row = b"\x00" + b"\x00" * side  # one grey row, filter 0
    comp = zlib.compressobj(9)
    body = comp.compress(row * 8) + comp.flush()  # only 8 rows present: the header is what matters
    return Path(path).write_bytes(_png(side, side, 8, 0, body)) and Path(path)


def huge_jpeg_header(path: Path, w: int = 60_000, h: int = 60_000) -> Path:
    """A small JPEG whose SOF marker declares w x h."""
    buf = io.BytesIO()
    Image.fromarray(gradient(16, 16)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = data.find(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    Path(path).write_bytes(bytes(data))
    return Path(path)


def zero_bytes(path: Path) -> Path:
    Path(path).write_bytes(b"")
    return Path(path)


def text_as_jpeg(path: Path) -> Path:
    Path(path).write_text("this is not an image\n")
    return Path(path)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(w: int, h: int, depth: int, colour_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def corrupt_png_data(path: Path) -> Path:
    """A PNG whose chunk structure (and CRCs) is valid but whose IDAT is not a zlib stream:
    a header check passes it, a decoder fails."""
    h, w = 32, 48
    return Path(path).write_bytes(_png(w, h, 8, 2, b"\x78\x9c" + bytes(range(7, 250)))) and Path(path)
