"""Shard builder parts: BuildOptions' checks, the worker processes, the shard record's JSON."""
from __future__ import annotations

import json
import os

import pytest

from lmim.pipeline.format.manifest import ShardInfo
from lmim.tools.shard import BuildError, BuildOptions, build_dataset
from lmim.tools.shard.processes import FORKS, run_forked
from lmim.tools.shard.state import ShardRecord


@pytest.mark.parametrize("fields, sentence", [
    ({"shard_max_bytes": None}, "give a shard size limit: --shard-max-bytes and/or --shard-max-samples"),
    ({"shard_max_samples": 0}, "shard limits must be positive"),
    ({"quality": 101}, "--quality must be between 1 and 100, not 101"),
    ({"max_side": 0}, "--max-side must be a positive number of pixels, not 0"),
    ({"prefix": "a/b"}, "--prefix 'a/b' must be non-empty and hold no dot, slash or space"),
    ({"part": (2, 2)}, "--part 2/2 is out of range; use i/N with 0 <= i < N"),
])
def test_build_options_refuse_bad_values_in_one_sentence(fields, sentence):
    with pytest.raises(BuildError) as e:
        BuildOptions(**fields)
    assert str(e.value) == sentence


def test_build_options_defaults_and_derived_values():
    o = BuildOptions(part=["1", "3"], storage_options={"anon": True})
    assert o.part == (1, 3) and (o.part_index, o.part_count) == (1, 3)
    assert (BuildOptions().part_index, BuildOptions().part_count) == (0, 1)
    assert o.source_options == {"anon": True}
    assert BuildOptions(storage_options={"anon": True}, source_storage_options={}).source_options == {}
    assert list(o.content_settings()) == ["max_side", "quality", "full_decode", "labels", "max_pixels", "prefix",
                                          "version"]


def test_build_dataset_checks_options_before_touching_src_or_dst(tmp_path):
    """Keywords override `options` and are checked like it; an unknown keyword is a TypeError."""
    with pytest.raises(BuildError, match="--quality"):
        build_dataset(str(tmp_path / "nope"), str(tmp_path / "ds"), BuildOptions(), quality=0)
    with pytest.raises(TypeError):
        build_dataset(str(tmp_path / "nope"), str(tmp_path / "ds"), shard_max_megabytes=1)
    assert not (tmp_path / "ds").exists()


def test_shard_record_keeps_the_sidecar_format():
    info = ShardInfo(name="shard-000003.tar", index="shard-000003.idx", samples=2, bytes=4096, checksum="xxh3_128:00")
    record = ShardRecord(shard=3, fingerprint="f", info=info, rejects=[{"source": "a.jpg", "reason": "r"}],
                         images_read=3, bytes_read=99)
    text = record.to_json().decode()
    assert list(json.loads(text)) == ["shard", "fingerprint", "info", "rejects", "images_read", "bytes_read"]
    assert list(json.loads(text)["info"]) == ["name", "index", "samples", "bytes", "checksum"]
    assert ShardRecord.from_dict(json.loads(text)) == record
    empty = ShardRecord(shard=4, fingerprint="f", info=None, rejects=[], images_read=1, bytes_read=0)
    assert ShardRecord.from_dict(json.loads(empty.to_json())) == empty


# ------------------------------------------------------------------------------------------------
# worker processes (fork: Linux only)

needs_fork = pytest.mark.skipif(not FORKS, reason="the builder forks on Linux only")


def _claimed(next_index, count: int) -> list[list[int]]:
    out = []
    while (i := next_index()) < count:
        out.append([i, os.getpid()])
    return out


@needs_fork
def test_run_forked_hands_out_every_index_once_across_processes():
    rows = run_forked(40, 3, lambda next_index: _claimed(next_index, 40))
    assert sorted(i for i, _ in rows) == list(range(40))


@needs_fork
def test_run_forked_names_a_failed_or_vanished_child():
    parent = os.getpid()

    def fails(next_index):
        if os.getpid() != parent:
            raise ValueError("child broke")
        return _claimed(next_index, 4)

    def vanishes(next_index):
        if os.getpid() != parent:
            os._exit(3)
        return _claimed(next_index, 4)

    with pytest.raises(RuntimeError, match=r"(?s)a shard worker failed; re-run the same command to resume:.*broke"):
        run_forked(4, 2, fails)
    with pytest.raises(RuntimeError, match=r"worker process \d+ died \(wait status \d+\) without a result"):
        run_forked(4, 2, vanishes)


@needs_fork
def test_run_forked_raises_the_parents_own_error_after_reaping_the_children(tmp_path):
    parent = os.getpid()

    def parent_fails(next_index):
        if os.getpid() == parent:
            raise KeyError("parent broke")
        (tmp_path / str(os.getpid())).touch()
        return _claimed(next_index, 1000)

    with pytest.raises(KeyError, match="parent broke"):
        run_forked(1000, 3, parent_fails)
    children = [int(p.name) for p in tmp_path.iterdir()]
    assert len(children) == 2
    for pid in children:  # already reaped: no zombie left behind
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
