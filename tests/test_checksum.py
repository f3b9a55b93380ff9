"""Shard checksums: the streaming reader and `lmim verify` catch a changed shard, with the current
(XXH3-128) and the first-format (SHA-256) manifests alike."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from lmim.pipeline import ShardError, build_loader
from lmim.pipeline.format.checksum import algorithm_of, checksum_of, hasher_like, matches
from lmim.pipeline.format.manifest import read_manifest
from tests.test_pipeline import GEOM, cfg, copy_dataset, keys_of, make_dataset
from lmim.tools.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("ck") / "ds"), n=12, per_shard=4)


def _flip_byte(path: str, offset: int = 700) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _as_version_1(root: str) -> None:
    """Rewrite the manifest as the first format wrote it: `sha256` per shard, version 1."""
    path = os.path.join(root, "manifest.json")
    data = json.load(open(path))
    data["version"] = 1
    for s in data["shards"]:
        del s["checksum"]
        s["sha256"] = hashlib.sha256(open(os.path.join(root, s["name"]), "rb").read()).hexdigest()
    with open(path, "w") as f:
        json.dump(data, f)


def test_checksum_strings():
    c = checksum_of(b"abc")
    assert c.startswith("xxh3_128:") and len(c) == len("xxh3_128:") + 32
    assert matches(b"abc", c) and not matches(b"abd", c)
    assert checksum_of(b"abc", "sha256") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    h = hasher_like(c)
    h.update(b"ab")
    h.update(b"c")
    assert f"{algorithm_of(c)}:{h.hexdigest()}" == c
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md7'"):
        hasher_like("md7:00")
    with pytest.raises(ValueError, match="malformed checksum"):
        algorithm_of("deadbeef")


def test_manifest_records_xxh3_of_each_shard(dataset):
    m = read_manifest(dataset)
    for s in m.shards:
        assert s.checksum == checksum_of(open(os.path.join(dataset, s.name), "rb").read())


@pytest.mark.parametrize("version", [2, 1])
def test_stream_reader_and_verify_catch_a_changed_shard(dataset, tmp_path, capsys, version):
    good = copy_dataset(dataset, str(tmp_path / "good"))
    if version == 1:
        _as_version_1(good)
        assert read_manifest(good).shards[0].checksum.startswith("sha256:")
    streamed = list(build_loader(cfg(good, reader="stream"), **GEOM))
    assert keys_of(streamed) == keys_of(list(build_loader(cfg(dataset), **GEOM)))
    assert main(["verify", good]) == 0

    bad = copy_dataset(good, str(tmp_path / "bad"))
    shard = read_manifest(bad).shards[1].name
    _flip_byte(os.path.join(bad, shard))  # same size: only the checksum can tell
    with pytest.raises(ShardError, match=rf"{shard}.*checksum mismatch"):
        list(build_loader(cfg(bad, reader="stream", on_error="raise"), **GEOM))
    skipping = build_loader(cfg(bad, reader="stream"), **GEOM)  # the default policy: leave it out, say so
    assert len(list(skipping)) == len(skipping) and skipping.stats["skipped_shards"] == [shard]
    capsys.readouterr()
    assert main(["verify", bad]) == 1
    assert f"shard {shard}: checksum does not match" in capsys.readouterr().err


def test_a_cache_entry_that_changed_on_disk_is_dropped_and_fetched_again(dataset, tmp_path):
    """The stream reader's local cache holds whole shards named by checksum. An entry whose bytes
    changed (same size) must not be read as if the dataset were damaged: it is dropped and the shard is
    fetched again from the (intact) dataset."""
    cache = tmp_path / "cache"
    settings = dict(reader="stream", cache_dir=str(cache), cache_max_bytes=10**9, on_error="raise")
    reference = keys_of(list(build_loader(cfg(dataset, **settings), **GEOM)))
    entries = sorted(cache.glob("*.tar"))
    assert entries
    _flip_byte(str(entries[0]))
    again = build_loader(cfg(dataset, **settings), **GEOM)
    assert keys_of(list(again)) == reference                      # nothing skipped, nothing raised
    assert again.stats["skipped_shards"] == [] and again.stats["cache_hits"] == len(entries) - 1
    name = entries[0].name
    fixed = (cache / name).read_bytes()
    assert checksum_of(fixed) == name[:-len(".tar")].replace("-", ":", 1)   # the entry was written again, whole
