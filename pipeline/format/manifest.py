"""`manifest.json`: the list of a dataset's shards (name, index, samples, bytes, checksum), its
classes and the record of its build. It is written last, so a dataset with a manifest is complete
(the layout as a whole: `lmim.pipeline.format`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from lmim.pipeline.errors import DatasetNotFound, NotADataset
from lmim.pipeline.storage import RetryPolicy, Store

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
FORMAT = "lmim-webdataset"
FORMAT_VERSION = 2  # 2: `checksum` ("algorithm:hex") replaced `sha256`; version 1 still reads


@dataclass
class ShardInfo:
    """One shard as the manifest lists it. `name` and `index` are relative to the dataset root."""

    name: str
    index: str
    samples: int
    bytes: int
    checksum: str   # "xxh3_128:<hex>" (lmim.pipeline.format.checksum); "sha256:<hex>" in version-1 manifests

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardInfo":
        d = dict(d)
        if "checksum" not in d and "sha256" in d:  # written by format version 1
            d["checksum"] = "sha256:" + d.pop("sha256")
        return cls(**d)


@dataclass
class Manifest:
    shards: list[ShardInfo]
    classes: list[str] | None = None
    build: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["total_samples"] = self.total_samples
        data["total_bytes"] = self.total_bytes
        return json.dumps(data, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise NotADataset(f"{MANIFEST_NAME} is not valid JSON ({err}); rebuild the dataset with `lmim shard`") from None
        if data.get("format") != FORMAT:
            raise NotADataset(f"not an lmim dataset manifest (format={data.get('format')!r}, expected {FORMAT!r})")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise NotADataset(
                f"manifest version {data['version']} is newer than this lmim understands ({FORMAT_VERSION}); upgrade lmim"
            )
        shards = [ShardInfo.from_dict(s) for s in data["shards"]]
        return cls(shards=shards, classes=data.get("classes"), build=data.get("build", {}),
                   format=data["format"], version=int(data["version"]))


def read_manifest(root: str, storage_options: dict[str, Any] | None = None, *,
                  retry: RetryPolicy | None = None) -> Manifest:
    """Read `root/manifest.json`; a clear error when the dataset is missing or incomplete.

    Args:
        root: dataset root (local path or URL); read through `lmim.pipeline.storage`, so with the
            same S3 timeouts as the shards beside it.
        storage_options: fsspec options.
        retry: how a remote read retries (the loader passes its `data.retry_budget_s` policy);
            None: one attempt.
    """
    try:
        text = Store(root, storage_options, retry=retry).read_bytes(MANIFEST_NAME).decode("utf-8")
    except FileNotFoundError:
        raise DatasetNotFound(
            f"no {MANIFEST_NAME} at {root}: it is not an lmim dataset, or its build has not finished "
            f"(run `lmim shard SRC {root}` to build or finish it)"
        ) from None
    return Manifest.from_json(text)
