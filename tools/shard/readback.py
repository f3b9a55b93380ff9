"""Read a dataset back exactly as the training pipeline does: DALI's `fn.readers.webdataset` with
the written `.idx` files, and (optionally) DALI's CPU image decoder to RGB.

Used by `lmim verify --decode` and by the tests: a dataset that passes here is one the pipeline
can read and decode, with the `.json` sizes equal to the decoded sizes (the pipeline computes crop
windows from them without decoding).

Remote roots are read with DALI's own S3 client (the AWS SDK), which takes its endpoint and
credentials from the AWS environment (`AWS_ENDPOINT_URL`, ...), not from fsspec options. DALI's
`Pipeline.build()` holds the GIL while that client HEADs the shards, so it cannot reach an S3
server that runs as a Python thread of the same process (a test's moto server): run it in a
separate process then (`lmim verify --decode` in a subprocess).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from lmim.pipeline.format.keys import IMAGE_EXTENSIONS, split_member
from lmim.pipeline.format.manifest import read_manifest
from lmim.pipeline.storage import join


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
        storage_options: fsspec options, used only to read the manifest.
    """
    from nvidia.dali import fn, pipeline_def, types

    manifest = read_manifest(root, storage_options)
    total = manifest.total_samples
    if total == 0:
        return
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


def decode_check(root: str, storage_options: dict | None = None) -> list[str]:
    """Decode every sample with DALI; problems: decode failures and sizes that differ from the .json."""
    problems = []
    try:
        for s in read_back(root, decode=True, storage_options=storage_options):
            h, w = s.shape[0], s.shape[1]
            if (w, h) != (s.meta.get("width"), s.meta.get("height")) or s.shape[2] != 3:
                problems.append(f"shard {s.shard.rsplit('/', 1)[-1]}: sample {s.key!r} decodes to {w} x {h} x "
                                f"{s.shape[2]}, its .json says {s.meta.get('width')} x {s.meta.get('height')}")
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        problems.append(f"DALI could not read or decode the dataset: {' '.join(first[-3:])[:500]}")
    return problems
