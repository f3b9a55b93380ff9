"""A sample's `.json` sidecar: the image's width and height, as the builder wrote them.

Readers size their crops from it before decoding, so a value that is not a positive integer that
fits the loaders' int32 arrays (a hand-edited or damaged sidecar: 3e9, 1e999, -5, deeply nested
JSON) is a damaged sample, said in words, never an overflow or a recursion error deep in NumPy.
"""
from __future__ import annotations

import json

# The loaders keep widths and heights in int32 arrays; no image format stores a larger side anyway.
MAX_SIDE = 2**31 - 1

__all__ = ["MAX_SIDE", "image_size"]


def image_size(json_bytes: bytes) -> tuple[int, int]:
    """(width, height) from a sample's `.json`.

    Raises:
        ValueError: the reason in words (not JSON, no integer width/height, or one out of range).
    """
    try:
        info = json.loads(json_bytes)
        width, height = info["width"], info["height"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ValueError("a .json without integer width/height") from None
    sides = []
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, str) and value.strip().isdigit():   # other webdataset writers quote numbers
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
                float("inf"), float("-inf")) or value != int(value):
            raise ValueError(f"a .json whose {name} is not an integer ({str(value)[:20]})")
        if not 1 <= int(value) <= MAX_SIDE:
            raise ValueError(f"a .json whose {name} {int(value)} is outside 1..{MAX_SIDE}")
        sides.append(int(value))
    return sides[0], sides[1]
