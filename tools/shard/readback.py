"""Read a dataset back as the training pipeline does, and (optionally) decode every image with
DALI's CPU decoder to RGB.

Used by `lmim verify --decode` and by the tests: a dataset that passes here is one the pipeline
can read and decode, with the `.json` sizes equal to the decoded sizes (the pipeline computes crop
windows from them without decoding).

As in the pipeline, local shards are read by DALI's `fn.readers.webdataset` with the written
`.idx` files, and remote shards are fetched whole through `pipeline.storage.Store` (the fsspec
client every other reader uses, so `--storage-option` applies and an unreachable store is told as
one) and their images handed to DALI from memory, split by their `.idx`. DALI's own S3 client is
never used: it reads only the AWS environment, and would disagree with the options.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from lmim.pipeline.errors import ShardError
from lmim.pipeline.format.index import parse_index
from lmim.pipeline.format.keys import IMAGE_EXTENSIONS, split_member
from lmim.pipeline.format.manifest import Manifest, ShardInfo, read_manifest
from lmim.pipeline.storage import Store, is_remote, join
from lmim.tools.shard.destination import scrub_url
from lmim.tools.shard.errors import reach_error


@dataclass
class ReadSample:
    shard: str                      # shard URL as DALI saw it
    key: str
    ext: str                        # image extension: jpg | png | webp
    data: bytes                     # the stored (encoded) image bytes
    label: int | None               # from .cls
    meta: dict                      # the .json
    shape: tuple[int, int, int] | None  # decoded (H, W, C) when decode=True


def read_back(root: str, *, decode: bool = True, batch_size: int = 16,
              storage_options: dict | None = None) -> Iterator[ReadSample]:
    """Yield every sample of the dataset at `root`, in stored order, read by DALI (CPU).

    Args:
        root: dataset root (local or s3://).
        decode: also decode each image with DALI to RGB and report its shape.
        batch_size: DALI batch size.
        storage_options: fsspec options (remote roots: every read goes through them).

    Raises:
        StoreNotAnswering / BuildError: a remote shard or index could not be read (one sentence).
    """
    manifest = read_manifest(root, storage_options)
    if manifest.total_samples == 0:
        return
    if is_remote(root):
        yield from _read_remote(root, manifest, decode, batch_size, storage_options)
    else:
        yield from _read_local(root, manifest, decode, batch_size)


def _read_local(root: str, manifest: Manifest, decode: bool, batch_size: int) -> Iterator[ReadSample]:
    """The local path: DALI's webdataset reader over the shards and their `.idx` files."""
    from nvidia.dali import fn, pipeline_def, types

    total = manifest.total_samples
    paths = [join(root, s.name) for s in manifest.shards]
    indices = [join(root, s.index) for s in manifest.shards]
    bs = max(1, min(batch_size, total))
    labelled = manifest.classes is not None

    @pipeline_def(batch_size=bs, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        exts = [";".join(IMAGE_EXTENSIONS), "json"] + (["cls"] if labelled else [])
        outs = fn.readers.webdataset(paths=paths, index_paths=indices, ext=exts,
                                     missing_component_behavior="empty", name="reader")
        image, meta = outs[0], outs[1]
        extra = [fn.decoders.image(image, device="cpu", output_type=types.RGB)] if decode else []
        return (image, meta, fn.get_property(image, key="source_info"), *outs[2:], *extra)

    p = pipe()
    p.build()
    seen = 0
    while seen < total:
        outs = p.run()
        image, meta, info = outs[0], outs[1], outs[2]
        cls = outs[3] if labelled else None
        decoded = outs[-1] if decode else None
        for i in range(len(image)):
            if seen >= total:
                break
            shard, _, name = bytes(np.asarray(info[i])).decode().rsplit(":", 2)
            key, ext = split_member(name)
            label_raw = bytes(np.asarray(cls[i])) if cls is not None else b""
            yield ReadSample(shard=shard, key=key, ext=ext, data=bytes(np.asarray(image[i])),
                             label=int(label_raw.decode()) if label_raw.strip() else None,
                             meta=json.loads(bytes(np.asarray(meta[i]))),
                             shape=tuple(np.asarray(decoded[i]).shape) if decoded is not None else None)
            seen += 1


class _MemoryDecoder:
    """DALI's CPU image decoder fed encoded images from memory (`fn.external_source`)."""

    def __init__(self, batch_size: int):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

        self.pipe = pipe()
        self.pipe.build()

    def shapes(self, images: list[bytes]) -> list[tuple[int, int, int]]:
        self.pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in images])
        (decoded,) = self.pipe.run()
        return [tuple(np.asarray(decoded[i]).shape) for i in range(len(images))]


def _fetch(store: Store, name: str) -> bytes:
    """A remote file's bytes; a store that does not answer or refuses is one sentence (exit 5)."""
    try:
        return store.read_bytes(name)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise reach_error("DST", scrub_url(store.url), e) from None


def _samples_of(data: bytes, index: str, info: ShardInfo) -> Iterator[tuple[str, str, bytes, bytes, bytes]]:
    """(key, image ext, image bytes, .json bytes, .cls bytes) per sample, split by the shard's index,
    as DALI's reader splits a local shard (so a remote dataset's index is checked as a local one's)."""
    for comps in parse_index(index, info.name, info.samples, len(data)):
        ext = next((e for e in IMAGE_EXTENSIONS if e in comps), None)
        if ext is None:
            continue  # lmim verify's tar check names a sample without an image
        part = {e: data[off:off + size] for e, (off, size, _) in comps.items()}
        yield split_member(comps[ext][2])[0], ext, part[ext], part.get("json", b"{}"), part.get("cls", b"")


def _read_remote(root: str, manifest: Manifest, decode: bool, batch_size: int,
                 storage_options: dict | None) -> Iterator[ReadSample]:
    """The remote path: each shard fetched whole through the Store, its images decoded from memory."""
    store = Store(root, storage_options)
    decoder = _MemoryDecoder(max(1, batch_size)) if decode else None
    for info in manifest.shards:
        data = _fetch(store, info.name)
        samples = list(_samples_of(data, _fetch(store, info.index).decode("utf-8", "replace"), info))
        for start in range(0, len(samples), max(1, batch_size)):
            chunk = samples[start:start + max(1, batch_size)]
            shapes = decoder.shapes([c[2] for c in chunk]) if decoder is not None else [None] * len(chunk)
            for (key, ext, image, meta, cls), shape in zip(chunk, shapes):
                yield ReadSample(shard=store.url_of(info.name), key=key, ext=ext, data=image,
                                 label=int(cls.decode()) if cls.strip() else None, meta=json.loads(meta), shape=shape)


def decode_check(root: str, storage_options: dict | None = None) -> list[str]:
    """Decode every sample with DALI; problems: decode failures and sizes that differ from the .json."""
    problems = []
    try:
        for s in read_back(root, decode=True, storage_options=storage_options):
            h, w = s.shape[0], s.shape[1]
            if (w, h) != (s.meta.get("width"), s.meta.get("height")) or s.shape[2] != 3:
                problems.append(f"shard {s.shard.rsplit('/', 1)[-1]}: sample {s.key!r} decodes to {w} x {h} x "
                                f"{s.shape[2]}, its .json says {s.meta.get('width')} x {s.meta.get('height')}")
    except (ShardError, FileNotFoundError) as e:  # a file changed since `lmim verify` read it
        problems.append(str(e))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        problems.append(f"DALI could not read or decode the dataset: {' '.join(first[-3:])[:500]}")
    return problems
