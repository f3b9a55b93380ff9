"""Checking and preparing one image: header checks, optional full decode, conversion, bomb limits.

What DALI's CPU decoder handles was established by decoding with a DALI CPU pipeline
(`fn.decoders.image(output_type=RGB)`, DALI 2.4; `tests/test_shard_images.py` keeps checking it):
8-bit baseline and progressive JPEG with 1, 3 or 4 (CMYK/YCCK) components, EXIF orientation
(applied: the decoded shape is the *displayed* one), every PNG colour type and depth (16-bit,
palette with tRNS, grey + alpha, 1-bit), WebP (lossy, lossless, alpha), BMP and TIFF; not GIF.
The format contract allows only jpg/png/webp members, so everything else Pillow can read (GIF,
BMP, TIFF, PPM, ...) is converted to an RGB JPEG. Truncated files are what DALI fails on in
practice; the header check finds them without a decode by walking the JPEG markers to the
end-of-image marker, or the PNG chunks to IEND.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

# Pillow's own decompression-bomb error threshold; `--max-pixels` overrides it.
DEFAULT_MAX_PIXELS = 178_956_970

_SOF_PASS = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman)
_SOF_ALL = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


class Reject(Exception):
    """An input that cannot become a sample; the message is the reason written to rejects.jsonl."""


@dataclass
class ImageInfo:
    format: str          # "jpeg" | "png" | "webp" | Pillow's name for anything else (lower case)
    width: int           # as displayed (after EXIF orientation), i.e. what a decoder returns
    height: int
    mode: str            # short description of the colour mode, for the sample's .json
    passthrough: bool    # the original bytes can be stored as they are
    why_convert: str = ""


@dataclass
class Prepared:
    data: bytes
    ext: str             # "jpg" | "png" | "webp"
    info: ImageInfo
    converted: str = ""  # why the bytes are not the original ones ("" for pass-through)


def _exif_orientation(payload: bytes) -> int:
    """The EXIF orientation tag (1..8) in an APP1 payload, 1 when absent or unreadable."""
    if not payload.startswith(b"Exif\x00\x00"):
        return 1
    tiff = payload[6:]
    try:
        end = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(end + "I", tiff[4:8])
        (count,) = struct.unpack(end + "H", tiff[ifd:ifd + 2])
        for n in range(count):
            entry = tiff[ifd + 2 + 12 * n: ifd + 14 + 12 * n]
            tag, typ = struct.unpack(end + "HH", entry[:4])
            if tag == 0x0112 and typ == 3:
                value = struct.unpack(end + "H", entry[8:10])[0]
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error, IndexError):
        pass
    return 1


def _check_jpeg(data: bytes) -> ImageInfo:
    n, i = len(data), 2
    sof = None
    orientation = 1
    while True:
        if i + 4 > n:
            raise Reject("truncated JPEG (ends inside its header)")
        if data[i] != 0xFF:
            raise Reject(f"corrupt JPEG (no marker at byte {i})")
        while i < n - 1 and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        marker = data[i + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xD9:
            raise Reject("corrupt JPEG (end of image before any scan)")
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if length < 2 or i + 2 + length > n:
            raise Reject("truncated JPEG (ends inside its header)")
        payload = data[i + 4:i + 2 + length]
        if marker in _SOF_ALL and sof is None:
            if len(payload) < 6:
                raise Reject("corrupt JPEG (short frame header)")
            precision, h, w, comps = payload[0], *struct.unpack(">HH", payload[1:5]), payload[5]
            sof = (marker, precision, w, h, comps)
        elif marker == 0xE1 and orientation == 1:
            orientation = _exif_orientation(payload)
        elif marker == 0xDA:
            break
        i += 2 + length
    if sof is None:
        raise Reject("corrupt JPEG (no frame header before the first scan)")
    marker, precision, w, h, comps = sof
    if w == 0 or h == 0:
        raise Reject(f"unsupported JPEG (declared size {w} x {h})")
    # FF D9 cannot occur inside entropy-coded data (0xFF is stuffed), so a missing EOI after the
    # first scan means the file was cut short.
    if data.rfind(b"\xff\xd9", i) < 0:
        raise Reject("truncated JPEG (no end-of-image marker)")
    if orientation >= 5:
        w, h = h, w
    mode = {1: "L", 3: "YCbCr", 4: "CMYK"}.get(comps, f"{comps} components")
    if marker in _SOF_PASS and precision == 8 and comps in (1, 3, 4):
        return ImageInfo("jpeg", w, h, mode, True)
    return ImageInfo("jpeg", w, h, mode, False, f"JPEG variant SOF{marker - 0xC0} / {precision}-bit / {comps} components")


def _check_png(data: bytes) -> ImageInfo:
    n = len(data)
    if n < 33 or data[12:16] != b"IHDR":
        raise Reject("truncated or corrupt PNG (no IHDR)")
    w, h, depth, colour = struct.unpack(">IIBB", data[16:26])
    if w == 0 or h == 0:
        raise Reject(f"corrupt PNG (declared size {w} x {h})")
    i, seen_idat, animated, transparent = 8, False, False, False
    while True:
        if i + 12 > n:
            raise Reject("truncated PNG (no IEND chunk)")
        (length,) = struct.unpack(">I", data[i:i + 4])
        kind = data[i + 4:i + 8]
        if i + 12 + length > n:
            raise Reject("truncated PNG (a chunk runs past the end of the file)")
        if kind == b"IDAT":
            seen_idat = True
        elif kind == b"acTL":
            animated = True
        elif kind == b"tRNS":
            transparent = True
        elif kind == b"IEND":
            break
        i += 12 + length
    if not seen_idat:
        raise Reject("corrupt PNG (no image data)")
    mode = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}.get(colour, f"colour type {colour}")
    mode = f"{mode};{depth}" + (";tRNS" if transparent else "") + (";APNG" if animated else "")
    return ImageInfo("png", w, h, mode, True)


def _check_other(data: bytes, max_pixels: int) -> ImageInfo:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            fmt = (im.format or "unknown").lower()
            animated = bool(getattr(im, "is_animated", False))
            mode = im.mode
    except UnidentifiedImageError:
        raise Reject("not an image (no known image format)") from None
    except Image.DecompressionBombError:
        raise Reject(f"decompression bomb (declared over {max_pixels} pixels)") from None
    except Exception as e:  # Pillow raises many types for broken headers
        raise Reject(f"corrupt image header ({type(e).__name__}: {e})") from None
    if fmt == "webp":
        riff_size = struct.unpack("<I", data[4:8])[0] if len(data) >= 8 else 0
        if riff_size + 8 > len(data):
            raise Reject("truncated WebP (shorter than its RIFF header says)")
        if not animated:
            return ImageInfo("webp", w, h, mode, True)
        return ImageInfo("webp", w, h, mode, False, "animated WebP (first frame kept)")
    return ImageInfo(fmt, w, h, mode, False, f"{fmt.upper()} is not a pipeline format")


def inspect_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False) -> ImageInfo:
    """Check one encoded image and describe it; raises `Reject` with the reason when it is unusable.

    Args:
        data: the file's bytes.
        max_pixels: larger declared sizes are rejected as decompression bombs.
        full_decode: also decode every pixel (finds corrupt entropy data a header check cannot).
    """
    if not data:
        raise Reject("empty file")
    if data[:3] == b"\xff\xd8\xff":
        info = _check_jpeg(data)
    elif data[:8] == _PNG_SIG:
        info = _check_png(data)
    else:
        info = _check_other(data, max_pixels)
    if info.width * info.height > max_pixels:
        raise Reject(f"decompression bomb ({info.width} x {info.height} is over {max_pixels} pixels)")
    if full_decode:
        _decode(data, max_pixels)
    return info


def _decode(data: bytes, max_pixels: int):
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()
        return im
    except Exception as e:
        raise Reject(f"does not decode ({type(e).__name__}: {e})") from None


def prepare_image(data: bytes, *, max_side: int | None = None, quality: int = 95,
                  max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False) -> Prepared:
    """Check an image and return the bytes to store: the original, or a converted/shrunk RGB JPEG.

    Args:
        data: the file's bytes.
        max_side: re-encode images whose longer side exceeds this (keeping the aspect ratio).
        quality: JPEG quality of converted and re-encoded images.
        max_pixels: decompression-bomb limit (declared width x height).
        full_decode: decode every image to check it, not only its header.
    """
    info = inspect_image(data, max_pixels=max_pixels, full_decode=full_decode)
    too_big = max_side is not None and max(info.width, info.height) > max_side
    if info.passthrough and not too_big:
        return Prepared(data, {"jpeg": "jpg", "png": "png", "webp": "webp"}[info.format], info)
    why = info.why_convert or f"longer side over {max_side}"
    from PIL import Image, ImageOps

    im = _decode(data, max_pixels)
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im = ImageOps.exif_transpose(im)  # bake the orientation in: the output carries no EXIF
    if im.mode not in ("RGB", "L"):
        # 16-bit grey ("I;16"/"I") needs scaling, not clipping, to reach 8 bits
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            import numpy as np
            arr = np.asarray(im, dtype=np.float64)
            im = Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype("uint8"), "L")
        else:
            im = im.convert("RGB")  # alpha is dropped, as DALI's RGB decode does
    if too_big:
        scale = max_side / max(im.size)
        size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
        im = im.resize(size, Image.BICUBIC, reducing_gap=3.0)
    if im.mode != "RGB":
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    w, h = im.size
    return Prepared(buf.getvalue(), "jpg", ImageInfo("jpeg", w, h, "YCbCr", True), converted=why)
