"""lmim.pipeline.storage: one set-up per URL, atomic writes, listing, and retries that end.

- A local and an S3 root answer the same `Store` calls the same way.
- Every opening of an s3:// URL gets the same timeouts and no hidden SDK retries, the manifest
  read included: a stalled manifest read gives up within the retry budget instead of hanging.
- An atomic write leaves the old file or the whole new one, even when the writer is killed, and
  a failed one leaves no temporary file behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from lmim.pipeline.errors import DatasetNotFound, StoreUnreachable
from lmim.pipeline.format.manifest import read_manifest
from lmim.pipeline.storage import (RetryPolicy, Store, is_remote, join, local_path, storage_options_for,
                                   write_atomic)
from lmim.pipeline.stream import ShardFetcher
from tests.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parents[1]


def test_which_urls_are_remote_and_how_names_join():
    assert not is_remote("data/ds") and not is_remote("/data/ds") and not is_remote("file:///data/ds")
    assert is_remote("s3://bucket/ds") and is_remote("memory://ds")
    assert local_path("file:///data/ds") == "/data/ds" and local_path("data/ds") == "data/ds"
    assert join("s3://bucket/ds/", "manifest.json") == join("s3://bucket/ds", "manifest.json") == \
        "s3://bucket/ds/manifest.json"


def test_every_s3_opening_gets_the_same_timeouts_and_the_users_options_win():
    opts = storage_options_for("s3://bucket/ds", {"config_kwargs": {"read_timeout": 5}, "anon": True})
    assert opts["config_kwargs"] == {"connect_timeout": 10, "read_timeout": 5, "retries": {"max_attempts": 1}}
    assert opts["anon"] is True and opts["skip_instance_cache"] is True
    assert storage_options_for("data/ds", {"x": 1}) == {"x": 1}  # local paths take no S3 settings
    # The shard reader's file system is built by the same function the manifest read uses.
    fetcher = ShardFetcher("s3://bucket/ds", {"config_kwargs": {"read_timeout": 5}})
    assert fetcher.store.fs.config_kwargs == opts["config_kwargs"]


def _exercise(store: Store, tmp_path: Path) -> None:
    """The Store contract, whatever the root."""
    assert not store.exists("a/b.txt") and store.list("a") == []
    store.write_bytes("a/b.txt", b"hello")
    src = tmp_path / "upload.bin"
    src.write_bytes(b"x" * 1000)
    store.upload(str(src), "a/c.bin")
    assert src.exists()  # an upload copies
    moved = tmp_path / "moved.bin"
    moved.write_bytes(b"y" * 10)
    store.put_file(str(moved), "top.bin")
    assert not moved.exists()  # a put moves
    assert store.exists("a/b.txt") and store.is_dir("a") and not store.is_dir("a/b.txt")
    assert store.read_bytes("a/b.txt") == b"hello" and store.size("a/c.bin") == 1000
    with store.open("a/c.bin") as f:
        assert f.read(3) == b"xxx"
    assert store.list("a") == ["b.txt", "c.bin"]
    assert store.find() == [("a/b.txt", 5), ("a/c.bin", 1000), ("top.bin", 10)]
    store.remove("a/b.txt")
    store.remove("a/b.txt")  # removing what is not there is not an error
    assert store.list("a") == ["c.bin"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b.txt")


def test_a_local_root(tmp_path):
    store = Store(f"file://{tmp_path}/root/")
    assert store.local and store.path == str(tmp_path / "root") and store.url_of("x") == f"file://{tmp_path}/root/x"
    store.create()
    _exercise(store, tmp_path)


def test_an_s3_root(tmp_path, s3_server, s3_bucket):
    store = Store(f"s3://{s3_bucket}/root", s3_server.storage_options)
    assert not store.local and store.url_of("x") == f"s3://{s3_bucket}/root/x"
    _exercise(store, tmp_path)
    fresh = Store(f"s3://{s3_bucket}-new/root", s3_server.storage_options)
    fresh.create()  # the bucket too
    fresh.write_bytes("f", b"1")
    assert fresh.read_bytes("f") == b"1"


def test_local_reads_do_not_retry(tmp_path):
    """Waiting does not mend a local file system: its errors come at once, whatever the policy."""
    (tmp_path / "manifest.json").mkdir()
    t0 = time.monotonic()
    with pytest.raises(IsADirectoryError):
        Store(str(tmp_path), retry=RetryPolicy(budget_s=600)).read_bytes("manifest.json")
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(120)
def test_a_stalled_manifest_read_gives_up_within_the_retry_budget(s3_server, s3_bucket):
    import boto3

    boto3.client("s3", endpoint_url=s3_server.endpoint_url).put_object(Bucket=s3_bucket, Key="ds/manifest.json",
                                                                       Body=b"{}")
    upstream = urlparse(s3_server.endpoint_url)
    proxy = FaultProxy((upstream.hostname, upstream.port), fault_rate=1.0, faults=("stall",), stall_s=60)
    try:
        # A 1 s read timeout keeps the test short; the AWS SDK's own retries (off by default
        # here) would multiply each attempt's wait by 6, to about 2 minutes.
        opts = {"client_kwargs": {"endpoint_url": proxy.endpoint_url}, "config_kwargs": {"read_timeout": 1}}
        t0 = time.monotonic()
        with pytest.raises(StoreUnreachable, match=r"^manifest\.json: .*retry budget 2 s"):   # not "shard manifest.json"
            read_manifest(f"s3://{s3_bucket}/ds", opts, retry=RetryPolicy(budget_s=2))
        assert time.monotonic() - t0 < 60
    finally:
        proxy.close()
    with pytest.raises(DatasetNotFound):  # a missing manifest is not retried
        read_manifest(f"s3://{s3_bucket}/nothing", s3_server.storage_options, retry=RetryPolicy(budget_s=600))


def test_a_killed_atomic_write_leaves_the_old_file_or_the_whole_new_one(tmp_path):
    path = tmp_path / "f.bin"
    size = 8 << 20
    code = (f"from lmim.pipeline.storage import write_atomic\n"
            f"i = 0\n"
            f"while True:\n"
            f"    write_atomic({str(path)!r}, (b'a' if i % 2 else b'b') * {size}, fsync=False)\n"
            f"    i += 1\n")
    for wait_s in (0.3, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(wait_s)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        data = path.read_bytes()
        assert len(data) == size and data in (b"a" * size, b"b" * size)


def test_a_failed_atomic_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        write_atomic(str(target), b"new")  # a folder cannot be replaced by a file
    assert sorted(os.listdir(tmp_path)) == ["taken"] and (target / "keep").read_text() == "x"
