"""Reading shard indices and per-sample metadata (key, width, height, label).

The crop windows are computed in Python from the width and height in each sample's
`{key}.json`, so images need no decode before the crop (DALI then decodes only the window).
For local shards the `.idx` file (DALI's webdataset index, `lmim.pipeline.format.index`) gives
the offsets; metadata is read with `os.pread`
(two tiny reads per sample, once per shard and process). Remote shards are parsed from their
bytes in memory (see `lmim.pipeline.stream`).
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np

from lmim.pipeline.errors import ShardError
from lmim.pipeline.format.index import Components, index_text, parse_index, sample_line
from lmim.pipeline.format.keys import IMAGE_EXTENSIONS, split_member
from lmim.pipeline.format.sample_meta import image_size


@dataclass
class ShardMeta:
    """Per-sample metadata of one shard, in stored order."""

    keys: list[str]
    widths: np.ndarray      # int32
    heights: np.ndarray     # int32
    labels: np.ndarray      # int64, -1 where the sample has no .cls
    # Local shards only: the index line of each sample (written into per-epoch index files) and
    # (offset, size) of its image component (for diagnosing undecodable samples).
    index_lines: list[str] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)


def _image_component(comps: Components, shard: str) -> tuple[str, tuple[int, int, str]]:
    for ext in IMAGE_EXTENSIONS:
        if ext in comps:
            return ext, comps[ext]
    name = next(iter(comps.values()))[2]
    raise ShardError(shard, f"sample {split_member(name)[0]!r} has no image component ({', '.join(IMAGE_EXTENSIONS)})")


def _meta_from(json_bytes: bytes | None, cls_bytes: bytes | None, shard: str, key: str) -> tuple[int, int, int]:
    if json_bytes is None:
        raise ShardError(shard, f"sample {key!r} has no .json with its width and height (rebuild it with `lmim shard SRC DST --recheck`)")
    try:
        w, h = image_size(json_bytes)
    except ValueError as why:
        raise ShardError(shard, f"sample {key!r} has {why}") from None
    label = -1
    if cls_bytes is not None and cls_bytes.strip():
        try:
            label = int(cls_bytes.decode().strip())
            if not -1 <= label < 2**31:
                raise ValueError
        except ValueError:
            raise ShardError(shard, f"sample {key!r} has a .cls that is not an integer: {cls_bytes[:20]!r}") from None
    return w, h, label


def _check_member_header(fd: int, member: tuple[int, int, str], shard: str) -> None:
    """The tar header just before an index entry's offset must be that member's (its name and size).

    The manifest's checksum covers the .tar, not the .idx beside it, and the local readers (DALI's
    included) take the index's offsets as they are: an index edited or damaged into other valid
    offsets would feed one sample's image under another's key and label, without an error. One
    512-byte read per member (a ustar header holds the name and size) closes that gap."""
    off, size, name = member
    header = os.pread(fd, tarfile.BLOCKSIZE, off - tarfile.BLOCKSIZE) if off >= tarfile.BLOCKSIZE else b""
    # The raw ustar fields, not tarfile's full parse: this runs for every member of every shard a
    # process opens. Name: bytes 0-100 (with the ustar prefix at 345-500 for longer paths); size: octal
    # at 124-136. Names past 100 bytes live in an extra header (the builder's never are): size only.
    raw = name.encode("utf-8", "surrogateescape")
    stored = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    try:
        stored_size = int(header[124:136].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        stored_size = -1
    same_name = len(raw) >= 100 or raw in (stored, prefix + b"/" + stored)
    if len(header) < tarfile.BLOCKSIZE or stored_size != size or not same_name:
        raise ShardError(shard, f"bad index: the tar member at byte {off} is not {name} ({size} bytes) as the "
                                ".idx says (rebuild it with `lmim shard SRC DST --recheck`)")


def read_local_meta(tar_path: str, idx_path: str, shard: str, expected_samples: int) -> ShardMeta:
    """Validate a local shard against its index and the manifest, and read its metadata."""
    if not os.path.exists(tar_path):
        raise ShardError(shard, f"missing: {tar_path} does not exist (rebuild it with `lmim shard SRC DST`)")
    if not os.path.exists(idx_path):
        raise ShardError(shard, f"bad index: {idx_path} does not exist (rebuild it with `lmim shard SRC DST`)")
    size = os.path.getsize(tar_path)
    with open(idx_path, "r", encoding="utf-8", errors="replace") as f:
        parsed = parse_index(f.read(), shard, expected_samples, size)
    keys, widths, heights, labels, spans = [], [], [], [], []
    lines = []
    fd = os.open(tar_path, os.O_RDONLY)
    try:
        for comps in parsed:
            ext, (off, sz, name) = _image_component(comps, shard)
            key = split_member(name)[0]
            for member in comps.values():
                _check_member_header(fd, member, shard)
            jb = os.pread(fd, comps["json"][1], comps["json"][0]) if "json" in comps else None
            cb = os.pread(fd, comps["cls"][1], comps["cls"][0]) if "cls" in comps else None
            w, h, label = _meta_from(jb, cb, shard, key)
            keys.append(key); widths.append(w); heights.append(h); labels.append(label)
            spans.append((off, sz))
            lines.append(sample_line(comps))
    finally:
        os.close(fd)
    return ShardMeta(keys, np.asarray(widths, np.int32), np.asarray(heights, np.int32), np.asarray(labels, np.int64),
                     lines, spans)


def read_span(tar_path: str, span: tuple[int, int]) -> bytes:
    with open(tar_path, "rb") as f:
        f.seek(span[0])
        return f.read(span[1])


def write_index(path: str, lines: list[str]) -> None:
    """Write a DALI webdataset index listing `lines` (samples) in this order."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(index_text(lines))


@dataclass
class ShardData:
    """A remote shard held in memory: metadata plus the encoded image of each sample."""

    meta: ShardMeta
    images: list[bytes]


def parse_tar(data: bytes, shard: str, expected_samples: int) -> ShardData:
    """Group a shard's tar members by key (webdataset's convention), in stored order."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = split_member(member.name)
                f = tf.extractfile(member)
                groups.setdefault(key, {})[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(shard, f"truncated or corrupt tar ({e})") from None
    if len(groups) != expected_samples:
        raise ShardError(shard, f"truncated or corrupt: {len(groups)} samples in the tar, the manifest says {expected_samples}")
    keys, widths, heights, labels, images = [], [], [], [], []
    for key, comps in groups.items():
        img = next((comps[e] for e in IMAGE_EXTENSIONS if e in comps), None)
        if img is None:
            raise ShardError(shard, f"sample {key!r} has no image component ({', '.join(IMAGE_EXTENSIONS)})")
        w, h, label = _meta_from(comps.get("json"), comps.get("cls"), shard, key)
        keys.append(key); widths.append(w); heights.append(h); labels.append(label); images.append(img)
    meta = ShardMeta(keys, np.asarray(widths, np.int32), np.asarray(heights, np.int32), np.asarray(labels, np.int64))
    return ShardData(meta, images)
