"""Object storage: shard to s3:// (moto's real S3 API on loopback), verify, read back with DALI.

The read-back of a remote dataset fetches its shards through `pipeline.storage.Store` (the
storage options apply) and decodes them with DALI from memory; DALI's own S3 client is not used.
The read-back still runs in a child process here, as `lmim verify --decode` does in a job.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmim.pipeline.format.manifest import read_manifest
from tests.test_shard import tree_expected
from lmim.tools.sample_images import write_photo_jpegs
from lmim.tools.shard import BuildError, build_dataset, verify_dataset

REPO = Path(__file__).resolve().parents[1]

READ_BACK = """
import hashlib, json, sys
from lmim.tools.shard.readback import read_back
rows = [[s.meta["source"], hashlib.sha256(s.data).hexdigest(), s.label, list(s.shape), s.meta["width"], s.meta["height"]]
        for s in read_back(sys.argv[1], decode=True)]
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("s3src")
    write_photo_jpegs(root, 12, size=(64, 48), num_classes=2, seed=7)
    return root


def _dali_read_back(url: str) -> list:
    out = subprocess.run([sys.executable, "-c", READ_BACK, url], cwd=REPO, env=dict(os.environ),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_shard_to_s3_verify_and_read_back_with_dali(corpus, s3_server, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/datasets/photos"
    s = build_dataset(str(corpus), url, shard_max_samples=5, workers=2, progress=False)
    assert (s.samples, s.shards, s.classes) == (12, 3, 2)
    # every shard is one PUT of a finished file: no multipart, no partial object ever visible
    puts = [r for r in s3_server.requests if r.method == "PUT" and r.path.endswith(".tar")]
    assert len(puts) == 3
    assert verify_dataset(url) == []
    # verify reads each shard sequentially: a handful of GETs per shard, not one per sample
    s3_server.clear()
    assert verify_dataset(url) == []
    for info in read_manifest(url).shards:
        assert 1 <= len(s3_server.gets(info.name)) <= 2
    rows = _dali_read_back(url)
    expected = tree_expected(corpus)
    assert sorted(r[0] for r in rows) == sorted(expected)
    for src, digest, label, shape, w, h in rows:
        assert digest == hashlib.sha256(expected[src][0]).hexdigest()
        assert label == expected[src][1] and shape == [h, w, 3]
    # the same command again: complete, nothing rewritten
    s3_server.clear()
    again = build_dataset(str(corpus), url, shard_max_samples=5, progress=False)
    assert again.built_shards == 0 and not [r for r in s3_server.requests if r.method == "PUT"]
    # and `lmim verify --decode` (DALI decoding what the Store fetched) agrees, in a child process
    out = subprocess.run([sys.executable, "-m", "lmim.tools.cli", "verify", url, "--decode"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK, 12 samples in 3 shards" in out.stderr, out.stderr[-2000:]


def test_s3_source_to_local(corpus, s3_server, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(corpus), f"{s3_bucket}/raw", recursive=True)
    dst = tmp_path / "ds"
    s = build_dataset(f"s3://{s3_bucket}/raw", str(dst), shard_max_samples=5, progress=False)
    assert (s.samples, s.classes) == (12, 2)
    got = {r[0]: r for r in _dali_read_back(str(dst))}
    expected = tree_expected(corpus)
    assert set(got) == set(expected)
    assert all(got[k][1] == hashlib.sha256(v[0]).hexdigest() and got[k][2] == v[1] for k, v in expected.items())


def test_s3_errors_are_one_sentence_and_hide_secrets(corpus, s3_server, capsys):
    from lmim.tools.cli import main

    rc = main(["shard", str(corpus), "s3://no-such-bucket-xyz/ds", "--storage-option", "secret=TOPSECRET-123",
               "--storage-option", "key=testing", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-bucket-xyz" in err and "TOPSECRET" not in err
    # the remedy for a bucket that does not exist
    assert "bucket 'no-such-bucket-xyz' does not exist" in err and "create the bucket or check its name" in err
    with pytest.raises(BuildError, match="not writable|cannot write|cannot reach"):
        build_dataset(str(corpus), "s3://no-such-bucket-xyz/ds", progress=False)


def test_an_s3_prefix_holding_someone_elses_objects_is_refused(corpus, s3_server, s3_bucket):
    """As for a local DST: a prefix that holds objects but no dataset or build is not written into
    (a shard-000000.tar of someone else's would be overwritten), and nothing is added to it."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    client.put_object(Bucket=s3_bucket, Key="theirs/shard-000000.tar", Body=b"their own tar")
    with pytest.raises(BuildError, match="already holds files that are not an lmim dataset .*'shard-000000.tar'"):
        build_dataset(str(corpus), f"s3://{s3_bucket}/theirs", progress=False)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["theirs/shard-000000.tar"]
    assert client.get_object(Bucket=s3_bucket, Key="theirs/shard-000000.tar")["Body"].read() == b"their own tar"
    # the bucket's root holds that prefix: refused as well; a new prefix beside it is fine
    with pytest.raises(BuildError, match="not an lmim dataset"):
        build_dataset(str(corpus), f"s3://{s3_bucket}", progress=False)
    assert build_dataset(str(corpus), f"s3://{s3_bucket}/mine", progress=False).complete


def test_s3_parts_resume_and_merge(corpus, s3_server, s3_bucket, tmp_path):
    """Two parts into one s3:// prefix: a part killed before a sidecar rebuilds only that shard on
    re-run, the last part writes the manifest, and the result equals one local build."""
    import s3fs

    from lmim.tools.cli import main

    url = f"s3://{s3_bucket}/parted"
    first = build_dataset(str(corpus), url, shard_max_samples=3, part=(0, 2), progress=False)
    assert not first.complete
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.rm(f"{s3_bucket}/parted/_build/shards/shard-000002.json")   # as if killed before its sidecar
    again = build_dataset(str(corpus), url, shard_max_samples=3, part=(0, 2), progress=False)
    assert (again.built_shards, again.resumed_shards, again.complete) == (1, 1, False)
    last = build_dataset(str(corpus), url, shard_max_samples=3, part=(1, 2), progress=False)
    assert last.complete and last.samples == 12   # the last part merged: the whole dataset's counts
    assert main(["merge", url]) == 0              # merging again by hand changes nothing
    ref = tmp_path / "ref"
    build_dataset(str(corpus), str(ref), shard_max_samples=3, progress=False)
    remote = json.loads(fs.cat_file(f"{s3_bucket}/parted/manifest.json"))
    local = json.loads((ref / "manifest.json").read_text())
    assert remote["shards"] == local["shards"] and remote["classes"] == local["classes"]
    assert verify_dataset(url) == []


@pytest.mark.parametrize("command", ["verify", "merge", "shard", "shard-from"])
def test_a_store_that_does_not_answer_is_one_sentence_and_exit_5(command, corpus, tmp_path):
    """Nothing listens at the endpoint (a real refused connection on loopback): botocore's own
    EndpointConnectionError must reach the user as the storage failure it is, not a traceback."""
    import socket

    with socket.socket() as s:   # a port that was free a moment ago, now closed: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from tests.s3server import aws_env

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **aws_env(f"http://127.0.0.1:{port}")}
    args = {"shard": ["shard", str(corpus), "s3://some-bucket/ds"],              # DST on the store
            "shard-from": ["shard", "s3://some-bucket/raw", str(tmp_path / "ds")],   # SRC on the store
            }.get(command, [command, "s3://some-bucket/ds"])
    quiet = ["--quiet"] if args[0] == "shard" else []
    out = subprocess.run([sys.executable, "-m", "lmim.tools.cli", *args, *quiet], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 5, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"lmim {args[0]}: " in lines[0] and "reach" in lines[0]
    assert f"127.0.0.1:{port}" in lines[0] and "AWS_ENDPOINT_URL" in lines[0]
    assert not (tmp_path / "ds").exists()   # nothing written locally either


def test_an_s3_dst_that_is_src_or_inside_it_is_refused(corpus, s3_server, s3_bucket, capsys):
    """As for local folders: a build into SRC (or a prefix under it) is refused before anything is
    written, or the next build of SRC would list its shards as images (a phantom class, rejects).
    Names are compared without credentials, trailing slashes or the s3a:// alias."""
    import s3fs

    from lmim.tools.cli import main

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(corpus), f"{s3_bucket}/rawc", recursive=True)
    before = sorted(fs.find(f"{s3_bucket}/rawc"))
    src = f"s3://{s3_bucket}/rawc"
    for dst, words in [(f"{src}/", "same folder"), (f"s3a://{s3_bucket}/rawc", "same folder"),
                       (f"{src}/out", "is inside SRC"), (f"s3://{s3_bucket}//rawc/a/b/", "is inside SRC")]:
        rc = main(["shard", src, dst, "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and err.count("\n") == 1, (dst, err)
    fs.invalidate_cache()
    assert sorted(fs.find(f"{s3_bucket}/rawc")) == before       # nothing was written under SRC
    # a sibling prefix that merely starts with the same letters is another place
    assert build_dataset(src, f"s3://{s3_bucket}/rawc2", progress=False).samples == 12


def test_a_rerun_repairs_an_s3_dataset_through_the_same_code_path(corpus, s3_server, s3_bucket):
    """The repair of the local test, on s3://: one listing finds the deleted shard, `recheck` the
    flipped byte; only those shards are uploaded again, byte-identical, and the dataset verifies."""
    import s3fs

    url = f"s3://{s3_bucket}/fix"
    build_dataset(str(corpus), url, shard_max_samples=5, progress=False)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    first = {p: fs.cat_file(p) for p in fs.find(f"{s3_bucket}/fix", maxdepth=1) if p.endswith((".tar", ".idx"))}
    manifest = fs.cat_file(f"{s3_bucket}/fix/manifest.json")
    fs.rm_file(f"{s3_bucket}/fix/shard-000001.tar")
    s3_server.clear()
    again = build_dataset(str(corpus), url, shard_max_samples=5, progress=False)
    assert again.built_shards == 1 and again.samples == 12
    assert [r.path.rsplit("/", 1)[-1] for r in s3_server.requests if r.method == "PUT" and r.path.endswith(".tar")] \
        == ["shard-000001.tar"]
    tar = fs.cat_file(f"{s3_bucket}/fix/shard-000002.tar")
    fs.pipe_file(f"{s3_bucket}/fix/shard-000002.tar", tar[:700] + bytes([tar[700] ^ 0xFF]) + tar[701:])
    assert verify_dataset(url) != []
    assert build_dataset(str(corpus), url, shard_max_samples=5, progress=False).built_shards == 0
    assert build_dataset(str(corpus), url, shard_max_samples=5, progress=False, recheck=True).built_shards == 1
    fs.invalidate_cache()
    assert {p: fs.cat_file(p) for p in first} == first
    assert fs.cat_file(f"{s3_bucket}/fix/manifest.json") == manifest
    assert verify_dataset(url) == []


def test_verify_decode_reads_through_the_storage_options_not_dalis_own_client(corpus, s3_server, s3_bucket):
    """`lmim verify --decode` reads the shards with the client and options every other read uses:
    the options reach the store while the AWS environment points at nothing (DALI's own S3 client
    read only the environment and called a sound dataset unreadable, exit 1)."""
    import socket

    url = f"s3://{s3_bucket}/opts"
    build_dataset(str(corpus), url, shard_max_samples=5, progress=False)
    with socket.socket() as s:   # a port that was free a moment ago, now closed
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "AWS_ENDPOINT_URL": dead, "AWS_ENDPOINT_URL_S3": dead}
    out = subprocess.run([sys.executable, "-m", "lmim.tools.cli", "verify", url, "--decode", "--storage-option",
                          f"client_kwargs.endpoint_url={s3_server.endpoint_url}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK, 12 samples in 3 shards" in out.stderr, out.stderr[-2000:]


def test_a_store_that_stops_answering_during_verify_decode_is_exit_5(corpus, s3_server, s3_bucket, capsys):
    """The store answers `lmim verify`'s own reads, then goes away before the decode pass reads the
    shards: that is a store that does not answer (one sentence, exit 5), not a corrupt dataset (1)."""
    from urllib.parse import urlparse

    from lmim.tools.cli import main
    from tests.faultproxy import FaultProxy

    url = f"s3://{s3_bucket}/gone"
    build_dataset(str(corpus), url, shard_max_samples=5, progress=False)
    upstream = urlparse(s3_server.endpoint_url)
    counter = FaultProxy((upstream.hostname, upstream.port))
    try:   # how many requests the check before the decode pass makes, and the decode pass's manifest read
        opts = {"client_kwargs": {"endpoint_url": counter.endpoint_url}}
        assert verify_dataset(url, opts) == []
        read_manifest(url, opts)
        before_decode = counter.counts["ok"]
    finally:
        counter.close()
    proxy = FaultProxy((upstream.hostname, upstream.port), down_after=before_decode)
    try:
        rc = main(["verify", url, "--decode", "--storage-option", f"client_kwargs.endpoint_url={proxy.endpoint_url}"])
    finally:
        proxy.close()
    err = capsys.readouterr().err
    assert proxy.counts["refused"] >= 1
    assert rc == 5 and err.count("\n") == 1 and "cannot reach DST" in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["verify", "merge", "shard", "shard-from"])
def test_a_storage_option_the_client_refuses_is_bad_input(command, corpus, s3_server, s3_bucket, tmp_path, capsys):
    """s3fs hands an option it does not know to its session, which refuses it at the first request
    (a TypeError): that is the user's option, exit 2 in one sentence naming it, not a corrupt
    dataset (verify said 'manifest: AioSession.__init__() ...', exit 1) nor a traceback (merge)."""
    from lmim.tools.cli import main

    args = {"shard": ["shard", str(corpus), f"s3://{s3_bucket}/ds", "--quiet"],
            "shard-from": ["shard", f"s3://{s3_bucket}/raw", str(tmp_path / "ds"), "--quiet"]}.get(
        command, [command, f"s3://{s3_bucket}/ds"])
    rc = main([*args, "--storage-option", "bogus_opt=1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "storage option 'bogus_opt' is not one the s3:// client accepts" in err, err
