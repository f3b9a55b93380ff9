"""`manifest.json`: the list of a dataset's shards (name, index, samples, bytes, checksum), its
classes and the record of its build. It is written last, so a dataset with a manifest is complete
(the layout as a whole: `lmim.pipeline.format`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from lmim.pipeline.errors import DatasetNotFound, NotADataset
from lmim.pipeline.format.checksum import KNOWN_ALGORITHMS
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
        """One `shards` entry, checked field by field (NotADataset naming the entry when it is not one)."""
        if not isinstance(d, dict):
            raise NotADataset(f"{MANIFEST_NAME}: a `shards` entry is {type(d).__name__}, not an object; {_REBUILD}")
        d = dict(d)
        if "checksum" not in d and "sha256" in d:  # written by format version 1
            d["checksum"] = "sha256:" + str(d.pop("sha256"))
        where = f"{MANIFEST_NAME}: shard entry {d.get('name')!r}"
        if set(d) != set(_SHARD_FIELDS):
            missing, extra = sorted(set(_SHARD_FIELDS) - set(d)), sorted(set(d) - set(_SHARD_FIELDS))
            raise NotADataset(f"{where} has {'missing fields ' + str(missing) if missing else ''}"
                              f"{' and ' if missing and extra else ''}{'unknown fields ' + str(extra) if extra else ''}"
                              f"; {_REBUILD}")
        for key, kind in _SHARD_FIELDS.items():
            value = d[key]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise NotADataset(f"{where}: `{key}` is {value!r}, not a count; {_REBUILD}")
            if kind is str and (not isinstance(value, str) or not value):
                raise NotADataset(f"{where}: `{key}` is {value!r}, not a name; {_REBUILD}")
        for key in ("name", "index"):  # relative to the dataset root, never outside it
            parts = d[key].replace("\\", "/").split("/")
            if d[key].startswith("/") or ".." in parts or ":" in parts[0]:
                raise NotADataset(f"{where}: `{key}` {d[key]!r} points outside the dataset; {_REBUILD}")
        algorithm = d["checksum"].partition(":")[0]
        if algorithm not in KNOWN_ALGORITHMS or not d["checksum"].partition(":")[2]:
            raise NotADataset(f"{where}: checksum {d['checksum']!r} is not one this lmim can check "
                              f"({', '.join(KNOWN_ALGORITHMS)}); a newer lmim may have written it, or {_REBUILD}")
        return cls(**d)


_SHARD_FIELDS: dict[str, type] = {"name": str, "index": str, "samples": int, "bytes": int, "checksum": str}
_REBUILD = "rebuild the dataset with `lmim shard`"


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
        if not isinstance(data, dict):
            raise NotADataset(f"{MANIFEST_NAME} holds a JSON {type(data).__name__}, not an lmim manifest; {_REBUILD}")
        if data.get("format") != FORMAT:
            raise NotADataset(f"not an lmim dataset manifest (format={data.get('format')!r}, expected {FORMAT!r})")
        version = data.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise NotADataset(f"{MANIFEST_NAME}: `version` is {version!r}, not a number; {_REBUILD}")
        if version > FORMAT_VERSION:
            raise NotADataset(
                f"manifest version {version} is newer than this lmim understands ({FORMAT_VERSION}); upgrade lmim"
            )
        if not isinstance(data.get("shards"), list):
            raise NotADataset(f"{MANIFEST_NAME} has no list of `shards`; {_REBUILD}")
        classes, build = data.get("classes"), data.get("build", {})
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise NotADataset(f"{MANIFEST_NAME}: `classes` is not a list of names; {_REBUILD}")
        if not isinstance(build, dict):
            raise NotADataset(f"{MANIFEST_NAME}: `build` is not an object; {_REBUILD}")
        shards = [ShardInfo.from_dict(s) for s in data["shards"]]
        return cls(shards=shards, classes=classes, build=build, format=data["format"], version=version)


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
    store = Store(root, storage_options, retry=retry)
    try:
        text = store.read_bytes(MANIFEST_NAME).decode("utf-8")
    except FileNotFoundError:
        raise DatasetNotFound(
            f"no {MANIFEST_NAME} at {root}: it is not an lmim dataset, or its build has not finished "
            f"(run `lmim shard SRC {root}` to build or finish it)"
        ) from None
    except NotADirectoryError:  # a local path to a file (often the manifest itself, or a shard), or through one
        is_file = store.local and os.path.isfile(store.path)
        what = "is a file, not a dataset" if is_file else "does not exist (a part of the path is a file)"
        raise DatasetNotFound(f"{root} {what}: pass the folder that holds {MANIFEST_NAME}") from None
    return Manifest.from_json(text)
