"""The data pipeline end to end on tiny shards: DALI (CPU) and the PyTorch baseline, local and s3://."""
from __future__ import annotations

from collections import Counter

import json
import os
import shutil

import numpy as np
import pytest
import torch

from lmim.pipeline import Batch, DataError, SampleError, ShardError, build_loader
from lmim.pipeline.format.checksum import checksum_of
from lmim.pipeline.config import DataConfig
from lmim.pipeline.format.manifest import Manifest, read_manifest
from lmim.pipeline.order import eval_plan, rank_shards, train_plan

GEOM = dict(grid_size=4, patch_size=8, patch_gap=2)    # 40 px training crops, 32 px evaluation
N_IMAGES, PER_SHARD = 32, 10                            # shards of 10, 10, 10, 2 samples: uneven on purpose


def make_dataset(root: str, n: int = N_IMAGES, per_shard: int = PER_SHARD, *, seed: int = 0) -> str:
    """Tiny labelled photo JPEGs sharded by the real shard builder (`lmim shard`'s API)."""
    from lmim.tools.sample_images import write_photo_jpegs
    from lmim.tools.shard import build_dataset

    src = root + "-src"
    write_photo_jpegs(src, n, size=(64, 48), num_classes=5, seed=seed)
    build_dataset(src, root, shard_max_bytes=None, shard_max_samples=per_shard, workers=1, seed=seed,
                  storage_options={}, progress=False)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("pipe") / "ds"))


def cfg(url: str, **kw) -> DataConfig:
    base = dict(url=url, batch_size=4, num_threads=2, num_visible=4, max_retries=1)
    base.update(kw)
    return DataConfig(**base)


def epoch(loader) -> list[Batch]:
    return list(loader)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


def copy_dataset(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_local_end_to_end(dataset):
    m = read_manifest(dataset)
    loader = build_loader(cfg(dataset), **GEOM)
    total = m.total_samples
    assert len(loader) == total // 4
    batches = epoch(loader)
    assert len(batches) == len(loader) and loader.epoch == 1
    for b in batches:
        assert b.images.shape == (4, 3, 40, 40) and b.images.dtype == torch.float32
        assert b.visible.shape == (4, 4) and b.target.shape == (4, 12) and b.visible.dtype == torch.int64
        assert b.labels is not None and b.labels.dtype == torch.int64
        assert ((b.labels >= 0) & (b.labels < 5)).all()
    images = torch.cat([b.images for b in batches])
    # ImageNet normalisation of [0, 255] pixels lies in [-2.12, 2.64]; photos use most of it.
    assert images.min() >= -2.2 and images.max() <= 2.7 and images.std() > 0.3
    keys = keys_of(batches)
    assert len(set(keys)) == len(keys)  # one rank: every sample at most once per epoch

    ev = build_loader(cfg(dataset), train=False, **GEOM)
    ebatches = epoch(ev)
    assert len(ev) == len(ebatches) == -(-total // 4)
    assert sorted(keys_of(ebatches)) == sorted(set(keys_of(ebatches))) and len(keys_of(ebatches)) == total
    last = ebatches[-1]
    assert last.images.shape[1:] == (3, 32, 32) and len(last) == total - 4 * (len(ev) - 1)
    assert last.visible.shape == (len(last), 16) and last.target.shape == (len(last), 0)


def test_dali_and_torch_baseline_agree(dataset):
    """Same plan: same samples, crop windows, flips and masks; only the resize kernels differ."""
    dali = epoch(build_loader(cfg(dataset), **GEOM))
    base = epoch(build_loader(cfg(dataset, loader="torch"), **GEOM))
    assert keys_of(dali) == keys_of(base)
    for a, b in zip(dali, base):
        assert torch.equal(a.visible, b.visible) and torch.equal(a.labels, b.labels)
        assert (a.images - b.images).abs().mean() < 0.03


def test_epochs_reshuffle(dataset):
    loader = build_loader(cfg(dataset), **GEOM)
    e0, e1 = keys_of(epoch(loader)), keys_of(epoch(loader))
    assert e0 != e1 and loader.epoch == 2


def test_two_ranks_disjoint_equal(dataset):
    m = read_manifest(dataset)
    names = [s.name for s in m.shards]
    ns = len(names)
    assert len({s.samples for s in m.shards}) > 1  # uneven shard sizes
    shard_of = {}
    for s in m.shards:
        for k in _keys_in_shard(dataset, s.index):
            shard_of[k] = s.name
    for ep in range(3):
        per_rank = [set(rank_shards(ns, 2, r, 0, ep).tolist()) for r in range(2)]
        assert per_rank[0].isdisjoint(per_rank[1]) and per_rank[0] | per_rank[1] == set(range(ns))
    loaders = [build_loader(cfg(dataset), rank=r, world_size=2, **GEOM) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == (m.total_samples // 2) // 4
    ranks_shards = []
    for r, ld in enumerate(loaders):
        batches = epoch(ld)
        assert len(batches) == len(ld)
        ranks_shards.append({shard_of[k] for k in keys_of(batches)})
        assert ranks_shards[-1] <= {names[i] for i in rank_shards(ns, 2, r, 0, 0)}
    assert ranks_shards[0].isdisjoint(ranks_shards[1])
    # Evaluation: one pass, disjoint, covering every sample, counts differ by at most one.
    ev = [keys_of(epoch(build_loader(cfg(dataset), train=False, rank=r, world_size=3, **GEOM))) for r in range(3)]
    allkeys = [k for e in ev for k in e]
    assert sorted(allkeys) == sorted(shard_of) and max(map(len, ev)) - min(map(len, ev)) <= 1


def test_plan_equal_lengths_and_wrap():
    counts = [50, 3, 4]  # very uneven: rank 1 must wrap its own stream
    for ep in range(4):
        plans = [train_plan(counts, 2, r, 7, ep) for r in range(2)]
        assert len(plans[0][0]) == len(plans[1][0]) == sum(counts) // 2
        for r, (shards, _) in enumerate(plans):
            assert set(shards.tolist()) <= set(rank_shards(3, 2, r, 7, ep).tolist())
    a = eval_plan(counts, 4, 1)
    assert len(a[0]) in (14, 15)


def test_fewer_shards_than_ranks_share_shards(dataset):
    """4 shards, 5 ranks: every rank takes its own contiguous range of one shuffled stream, so ranks
    see disjoint samples, equally many, and resume mid-epoch exactly as in whole-shard mode."""
    m = read_manifest(dataset)
    assert len(m.shards) == 4
    loaders = [build_loader(cfg(dataset), rank=r, world_size=5, **GEOM) for r in range(5)]
    assert {ld.shard_mode for ld in loaders} == {"shared shards"}
    assert {len(ld) for ld in loaders} == {(m.total_samples // 5) // 4}
    for ep in range(2):
        per_rank = [keys_of(epoch(ld)) for ld in loaders]
        flat = [k for keys in per_rank for k in keys]
        assert len(flat) == len(set(flat)) == 5 * len(loaders[0]) * 4   # disjoint, equal
    # the plan: ranks' ranges tile one stream (nothing duplicated) and differ from epoch to epoch
    plans = [train_plan([s.samples for s in m.shards], 5, r, 0, 0) for r in range(5)]
    pairs = [(int(a), int(b)) for sh, sa in plans for a, b in zip(sh, sa)]
    assert len(pairs) == len(set(pairs)) == 5 * (m.total_samples // 5)
    # exact mid-epoch resume, shared mode
    full = build_loader(cfg(dataset), rank=3, world_size=5, **GEOM)
    ref = keys_of(epoch(full))
    cut = build_loader(cfg(dataset), rank=3, world_size=5, **GEOM)
    it = iter(cut)
    head = [next(it).keys]
    state = cut.state_dict()
    cut.close()
    again = build_loader(cfg(dataset), rank=3, world_size=5, **GEOM)
    again.load_state_dict(state)
    assert [k for b in head for k in b] + keys_of(epoch(again)) == ref


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resume_mid_epoch_is_exact(dataset, backend):
    c = cfg(dataset, loader=backend, mask="multiblock")
    full = build_loader(c, **GEOM)
    ref = epoch(full) + epoch(full)
    n = len(full)

    run = build_loader(c, **GEOM)
    seen = epoch(run)
    it = iter(run)
    seen += [next(it) for _ in range(3)]
    state = json.loads(json.dumps(run.state_dict()))  # must survive a checkpoint file
    del it
    run.close()

    resumed = build_loader(c, **GEOM)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    seen += epoch(resumed)
    assert resumed.epoch == 2
    assert [b.keys for b in seen] == [b.keys for b in ref] and len(seen) == 2 * n
    for a, b in zip(seen, ref):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.visible, b.visible) and torch.equal(a.target, b.target)


def test_new_iterator_continues_where_the_last_stopped(dataset):
    ref = keys_of(epoch(build_loader(cfg(dataset), **GEOM)))
    loader = build_loader(cfg(dataset), **GEOM)
    got = []
    for n, batch in enumerate(loader):  # a trainer that breaks out of its loop (e.g. to evaluate)
        got += batch.keys
        if n == 1:
            break
    got += keys_of(epoch(loader))
    assert got == ref and loader.epoch == 1


def test_the_cpu_read_ahead_leaves_the_models_threads_alone(dataset):
    """On the CPU the next batch is finished in a background thread while the caller works; its
    one-thread setting must not leak into the caller's torch threads or the count new threads get."""
    import threading

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = build_loader(cfg(dataset), **GEOM)
        for n, batch in enumerate(loader):
            assert torch.get_num_threads() == 2
            if n == 2:
                break
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2] and torch.get_num_threads() == 2
        assert not [t for t in threading.enumerate() if t.name.startswith("lmim-cpu-tail")]   # stopped with the epoch
    finally:
        torch.set_num_threads(before)


def test_world_size_change_resumes_next_epoch(dataset, caplog):
    run = build_loader(cfg(dataset), **GEOM)
    it = iter(run)
    next(it)
    assert run.epochs_done == pytest.approx(1 / len(run))
    state = run.state_dict()
    del it
    other = build_loader(cfg(dataset), rank=0, world_size=2, **GEOM)
    with caplog.at_level("WARNING", logger="lmim.pipeline.loader"):
        other.load_state_dict(state)
    assert other.epoch == 1 and other.state_dict()["batch"] == 0
    assert other.epochs_done == 1.0   # what the metrics log calls the epoch: never backwards
    assert [r.getMessage() for r in caplog.records] == [
        "the data loader resumes at the start of epoch 1, not mid-epoch, because world_size 1 -> 2 changed since "
        "the checkpoint"]


def test_another_data_set_of_the_same_size_resumes_next_epoch(dataset, tmp_path, caplog):
    """Same sample and shard counts, other images (a rebuild with another seed): the saved mid-epoch
    position would train some samples twice and others never, so the loader goes on from the next epoch."""
    other_data = make_dataset(str(tmp_path / "other"), seed=1)
    assert [s.samples for s in read_manifest(other_data).shards] == [s.samples for s in read_manifest(dataset).shards]
    run = build_loader(cfg(dataset), **GEOM)
    it = iter(run)
    next(it)
    state = run.state_dict()
    del it
    same = build_loader(cfg(dataset), **GEOM)     # the same data: mid-epoch, as saved
    same.load_state_dict(state)
    assert (same.epoch, same.state_dict()["batch"], same.resumed_at_next_epoch) == (0, 1, False)
    other = build_loader(cfg(other_data), **GEOM)
    with caplog.at_level("WARNING", logger="lmim.pipeline.loader"):
        other.load_state_dict(state)
    assert (other.epoch, other.state_dict()["batch"], other.resumed_at_next_epoch) == (1, 0, True)
    assert "the data's content (its shards' checksums differ" in caplog.records[-1].getMessage()
    older = {k: v for k, v in state.items() if k != "data_id"}   # a checkpoint from before the checksums
    legacy = build_loader(cfg(dataset), **GEOM)
    legacy.load_state_dict(older)
    assert (legacy.epoch, legacy.state_dict()["batch"]) == (0, 1)


@pytest.mark.parametrize("strategy", ["random", "block", "multiblock"])
def test_masks_every_strategy(dataset, strategy):
    from lmim.model.masks import make_masks
    from lmim.pipeline.order import mask_seed

    c = cfg(dataset, mask=strategy, num_visible=5, batch_size=3)
    batch = next(iter(build_loader(c, seed=3, **GEOM)))
    n = 16
    assert batch.visible.shape == (3, 5) and batch.target.shape == (3, n - 5)
    for v, t in zip(batch.visible, batch.target):
        assert set(v.tolist()).isdisjoint(t.tolist()) and set(v.tolist()) | set(t.tolist()) == set(range(n))
    # The device masks are the torch reference's, from the documented per-batch seed.
    g = torch.Generator().manual_seed(mask_seed(3, 0, 0, 0))
    v, t = make_masks(strategy, 3, 4, 5, generator=g, block_min_scale=c.block_min_scale,
                      block_max_scale=c.block_max_scale, block_aspect=c.block_aspect, num_blocks=c.num_blocks)
    assert torch.equal(v, batch.visible) and torch.equal(t, batch.target)


# ---------------------------------------------------------------------- object storage
def upload(local: str, bucket: str, prefix: str, server) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint_url}, skip_instance_cache=True)
    for name in sorted(os.listdir(local)):
        fs.put_file(os.path.join(local, name), f"{bucket}/{prefix}/{name}")
    return f"s3://{bucket}/{prefix}"


def test_s3_streaming_whole_shard_reads(dataset, s3_server, s3_bucket):
    url = upload(dataset, s3_bucket, "ds", s3_server)
    s3_server.clear()
    loader = build_loader(cfg(url, storage_options=s3_server.storage_options), **GEOM)
    batches = epoch(loader)
    local = epoch(build_loader(cfg(dataset), **GEOM))
    assert keys_of(batches) == keys_of(local)
    for a, b in zip(batches, local):
        assert torch.equal(a.images, b.images)
    m = read_manifest(dataset)
    for s in m.shards:
        gets = s3_server.gets(s.name)
        assert 1 <= len(gets) <= 3, (s.name, gets)  # whole-object reads, not one request per sample
        assert all(g.range is None for g in gets)
    assert loader.stats["shards_fetched"] == len(m.shards)
    assert loader.stats["bytes_fetched"] == m.total_bytes


def test_s3_cache_dir_saves_downloads(dataset, s3_server, s3_bucket, tmp_path):
    url = upload(dataset, s3_bucket, "ds", s3_server)
    c = cfg(url, storage_options=s3_server.storage_options, cache_dir=str(tmp_path / "cache"),
            cache_max_bytes=1 << 30)
    loader = build_loader(c, **GEOM)
    first = keys_of(epoch(loader))
    s3_server.clear()
    second = keys_of(epoch(loader))
    assert first != second and not s3_server.gets(".tar")  # epoch 2 read every shard from the cache
    assert loader.stats["cache_hits"] == len(read_manifest(dataset).shards)
    # A cache smaller than one shard keeps nothing (and never breaks reading).
    small = build_loader(cfg(url, storage_options=s3_server.storage_options, cache_dir=str(tmp_path / "c2"),
                             cache_max_bytes=10), **GEOM)
    assert keys_of(epoch(small)) == first and os.listdir(tmp_path / "c2") == []


def _loader_of_a_store_that_went_away(dataset: str, bucket: str, **data_kw):
    """A loader built against a loopback S3 store that is shut down right after (an outage mid-job)."""
    import boto3

    from tests.s3server import start_s3_server

    info, server = start_s3_server()
    try:
        boto3.client("s3", endpoint_url=info.endpoint_url, aws_access_key_id="t", aws_secret_access_key="t",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        opts = {"client_kwargs": {"endpoint_url": info.endpoint_url}, "key": "t", "secret": "t"}
        url = upload(dataset, bucket, "ds", info)
        return build_loader(cfg(url, storage_options=opts, **data_kw), **GEOM)
    finally:
        server.shutdown()  # the store goes away after the job started
        server.server_close()


@pytest.mark.timeout(120)
def test_s3_network_error_names_shard(dataset, tmp_path, s3_server):  # s3_server: the AWS_* test env
    loader = _loader_of_a_store_that_went_away(dataset, "net")
    with pytest.raises(ShardError, match=r"\.tar.*network error after 2 attempts"):
        epoch(loader)
    assert loader.stats["retries"] == 1


def test_backoff_grows_exponentially_with_jitter_up_to_its_cap():
    import random

    from lmim.pipeline.storage import backoff_delay

    rng = random.Random(0)
    for attempt in range(1, 12):
        d = min(30.0, 0.5 * 2 ** (attempt - 1))
        draws = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(50)]
        assert all(d / 2 <= x <= d for x in draws)
        assert max(draws) - min(draws) > 0  # jittered: ranks throttled together do not retry in lockstep
    # About 10 minutes of retrying at the default budget: dozens of attempts, not 6 in 12 s.
    total, n = 0.0, 0
    while total < 600:
        n += 1
        total += backoff_delay(n, 0.5, 30.0, rng)
    assert n > 20


@pytest.mark.timeout(120)
def test_s3_outage_is_retried_for_the_time_budget_then_one_sentence(dataset, s3_server):
    import time

    loader = _loader_of_a_store_that_went_away(dataset, "budget", max_retries=None, retry_budget_s=3.0)
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=r"network error after \d+ attempts over \d+ s \(retry budget 3 s.*resume=auto"):
        epoch(loader)
    assert 1.0 < time.monotonic() - t0 < 60
    assert loader.stats["retries"] >= 1  # it waited and tried again before giving up (more on a fast machine)


@pytest.mark.timeout(120)
def test_s3_missing_shard(dataset, s3_server, s3_bucket):
    import s3fs

    url = upload(dataset, s3_bucket, "ds", s3_server)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url}, skip_instance_cache=True)
    name = read_manifest(dataset).shards[2].name
    fs.rm(f"{s3_bucket}/ds/{name}")
    loader = build_loader(cfg(url, storage_options=s3_server.storage_options, on_error="raise"), **GEOM)
    with pytest.raises(ShardError, match=f"{name}.*missing"):
        epoch(loader)
    # The default policy, the same as for a local shard: skip it, name it, keep the epoch's length.
    loader = build_loader(cfg(url, storage_options=s3_server.storage_options), **GEOM)
    batches = epoch(loader)
    assert len(batches) == len(loader) and loader.stats["skipped_shards"] == [name]


# ---------------------------------------------------------------------- faults
def _keys_in_shard(root: str, index: str) -> list[str]:
    with open(os.path.join(root, index)) as f:
        rows = f.read().splitlines()[1:]
    return [r.split()[3].split(".")[0] for r in rows if r.strip()]


def _image_span(root: str, index: str, n: int) -> tuple[int, int]:
    with open(os.path.join(root, index)) as f:
        parts = f.read().splitlines()[1 + n].split()
    for j in range(0, len(parts), 4):
        if parts[j] in ("jpg", "png", "webp"):
            return int(parts[j + 1]), int(parts[j + 2])
    raise AssertionError("no image component")


def _refresh_manifest(root: str) -> None:
    """Re-checksum every shard (so a corrupt sample, not a checksum mismatch, is what streaming sees)."""
    m = read_manifest(root)
    for s in m.shards:
        with open(os.path.join(root, s.name), "rb") as f:
            data = f.read()
        s.bytes, s.checksum = len(data), checksum_of(data)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        f.write(m.to_json())


@pytest.fixture
def corrupt(dataset, tmp_path):
    """A copy of the dataset with one sample's JPEG bytes overwritten (same size: indices stay valid)."""
    root = copy_dataset(dataset, str(tmp_path / "bad"))
    s = read_manifest(root).shards[1]
    off, size = _image_span(root, s.index, 2)
    with open(os.path.join(root, s.name), "r+b") as f:
        f.seek(off)
        f.write(b"\x00" * size)
    _refresh_manifest(root)
    return root, s.name, _keys_in_shard(root, s.index)[2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reader,backend", [("auto", "dali"), ("stream", "dali"), ("auto", "torch")])
def test_undecodable_sample_raise(corrupt, reader, backend):
    root, shard, key = corrupt
    loader = build_loader(cfg(root, on_error="raise", reader=reader, loader=backend), **GEOM)
    with pytest.raises(SampleError, match=f"{key}.*{shard}") as e:
        for _ in range(3):
            epoch(loader)
    assert e.value.key == key and e.value.shard == shard


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reader,backend", [("auto", "dali"), ("auto", "torch")])
def test_undecodable_sample_skip(corrupt, reader, backend):
    root, shard, key = corrupt
    loader = build_loader(cfg(root, on_error="skip", reader=reader, loader=backend), **GEOM)
    batches = epoch(loader)
    assert len(batches) == len(loader)
    assert key not in keys_of(batches)
    assert loader.stats["skipped"] == 1 and loader.stats["skipped_keys"] == [key]
    assert key not in keys_of(epoch(loader))  # remembered, and saved in the state
    assert loader.state_dict()["skipped_keys"] == [key]


@pytest.mark.timeout(120)
def test_a_skipped_sample_frees_the_failed_pipeline_at_once(corrupt):
    """The failed batch's DALI pipeline (its threads, buffers, open shards) is released when the
    loader moves past it, not whenever a garbage collection happens to run (nor in a forked child)."""
    import gc

    from nvidia.dali import Pipeline

    root, _, _ = corrupt
    gc.collect()
    gc.disable()
    try:
        loader = build_loader(cfg(root, on_error="skip"), **GEOM)
        epoch(loader)
        alive = [o for o in gc.get_objects() if issubclass(type(o), Pipeline)]   # type(): no attribute lookups
    finally:
        gc.enable()
    assert loader.stats["skipped"] == 1 and alive == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_missing_shard(dataset, tmp_path, backend):
    root = copy_dataset(dataset, str(tmp_path / "ds"))
    name = read_manifest(root).shards[1].name
    os.remove(os.path.join(root, name))
    loader = build_loader(cfg(root, batch_size=8, loader=backend, on_error="raise"), **GEOM)
    with pytest.raises(ShardError, match=f"{name}.*missing"):
        epoch(loader)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", ["auto", "stream"])
def test_truncated_shard(dataset, tmp_path, reader):
    root = copy_dataset(dataset, str(tmp_path / "ds"))
    s = read_manifest(root).shards[0]
    path = os.path.join(root, s.name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    loader = build_loader(cfg(root, reader=reader, on_error="raise"), **GEOM)
    with pytest.raises(ShardError, match=f"{s.name}.*truncated"):
        epoch(loader)


@pytest.mark.timeout(60)
def test_bad_index(dataset, tmp_path):
    root = copy_dataset(dataset, str(tmp_path / "ds"))
    s = read_manifest(root).shards[3]
    with open(os.path.join(root, s.index), "w") as f:
        f.write("this is not an index\n")
    loader = build_loader(cfg(root, on_error="raise"), **GEOM)
    with pytest.raises(ShardError, match=f"{s.name}.*bad index"):
        epoch(loader)


def test_bad_config(dataset):
    with pytest.raises(ValueError, match="batch size 1000"):
        build_loader(cfg(dataset, batch_size=1000), **GEOM)
    with pytest.raises(ValueError, match="reader"):
        build_loader(cfg("s3://bucket/x", reader="dali"), **GEOM)


def test_local_shards_are_checked_against_their_checksum_like_remote_ones(dataset, tmp_path):
    """A local shard whose bytes changed but still decode is refused, as the same shard from S3 is."""
    import shutil

    from lmim.pipeline.format.manifest import read_manifest

    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    shard = ds / read_manifest(str(ds)).shards[0].name
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01  # inside the tar's closing zero blocks: every sample still reads and decodes
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"checksum mismatch.*rebuild it with `lmim shard SRC DST --recheck`"):
        epoch(build_loader(cfg(str(ds), on_error="raise"), **GEOM))
    assert len(epoch(build_loader(cfg(str(ds), verify_local=False), **GEOM))) > 0  # the documented opt-out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_bad_shard_is_skipped_by_default_named_counted_and_remembered(dataset, tmp_path, backend):
    """data.on_error=skip: the shard is left out, the epoch keeps its length, and a resumed loader
    (its state) skips it too without reading it again."""
    from lmim.pipeline.format.manifest import read_manifest

    root = copy_dataset(dataset, str(tmp_path / "ds"))
    bad = read_manifest(root).shards[1]
    with open(os.path.join(root, bad.name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(root, bad.name)) // 2)
    loader = build_loader(cfg(root, batch_size=8, loader=backend), **GEOM)
    batches = epoch(loader)
    assert len(batches) == len(loader)
    assert loader.stats["skipped_shards"] == [bad.name]
    assert not set(keys_of(batches)) & set(_keys_in_shard(dataset, bad.index))
    state = loader.state_dict()
    again = build_loader(cfg(root, batch_size=8, loader=backend), **GEOM)
    again.load_state_dict(state)
    assert again.stats["skipped_shards"] == [bad.name]
    assert not set(keys_of(epoch(again))) & set(_keys_in_shard(dataset, bad.index))


def test_elastic_resume_re_splits_the_rest_of_the_epoch_and_survives_a_second_stop(dataset):
    """2 ranks stop after 1 batch; 3 ranks take what is left (equal batches), one of them stops again
    and resumes exactly on the same count; together they take exactly the epoch's samples."""
    c = cfg(dataset)
    old = [build_loader(c, rank=r, world_size=2, **GEOM) for r in range(2)]
    taken = []
    for ld in old:
        it = iter(ld)
        taken += next(it).keys
    states = [ld.state_dict() for ld in old]
    for ld in old:
        ld.close()
    new = [build_loader(c, rank=r, world_size=3, **GEOM) for r in range(3)]
    assert all(ld.load_elastic_state(states) for ld in new)
    assert len({ld.batches_left() for ld in new}) == 1          # equal batches on the new ranks
    rest = [keys_of(list(ld)) for ld in new[:2]]
    # rank 2 stops after one batch, and resumes from its own state on the same count
    it = iter(new[2])
    head = next(it).keys
    saved = new[2].state_dict()
    new[2].close()
    again = build_loader(c, rank=2, world_size=3, **GEOM)
    again.load_state_dict(saved)
    rest.append(head + keys_of(list(again)))
    epoch_keys = taken + [k for ks in rest for k in ks]
    # exactly the samples the uninterrupted 2-rank epoch takes (its whole-shard plan repeats a few
    # samples on the rank with the short shard: those repeat here too, no more, no fewer)
    full = [k for r in range(2) for k in keys_of(list(build_loader(c, rank=r, world_size=2, **GEOM)))]
    assert Counter(epoch_keys) == Counter(full) and len(epoch_keys) == 8 + 24 and again.epoch == 1
    # a state that cannot be re-split exactly (another batch size) is refused, not guessed
    other = build_loader(cfg(dataset, batch_size=2), rank=0, world_size=3, **GEOM)
    assert other.load_elastic_state(states) is False


def _json_span(root: str, index: str, n: int) -> tuple[int, int]:
    with open(os.path.join(root, index)) as f:
        parts = f.read().splitlines()[1 + n].split()
    j = parts.index("json")
    return int(parts[j + 1]), int(parts[j + 2])


@pytest.mark.parametrize("sidecar", [b'{"width":3000000000,"height":28}', b'{"width":1e999,"height":28}',
                                     b'{"width":-5,"height":28}', b"[" * 5000])
def test_a_sidecar_with_an_impossible_size_is_a_damaged_shard_not_a_crash(dataset, tmp_path, sidecar, capsys):
    """A sample's .json edited to a width past int32 (or inf, or negative, or nested past the parser's
    recursion limit) reached NumPy as an OverflowError: exit 70 with a traceback, past on_error=skip,
    and `lmim verify` called the dataset OK. Now it is a damaged shard: skipped and named, and verify
    lists it (same byte length, checksums refreshed: only the sidecar's content is wrong)."""
    from lmim.tools.cli import main

    root = copy_dataset(dataset, str(tmp_path / "bad"))
    s = read_manifest(root).shards[0]
    off, size = _json_span(root, s.index, 3)
    patch = sidecar[:size] + b" " * max(0, size - len(sidecar))
    with open(os.path.join(root, s.name), "r+b") as f:
        f.seek(off)
        f.write(patch)
    _refresh_manifest(root)
    for reader in ("dali", "stream"):
        loader = build_loader(cfg(root, reader=reader), **GEOM)
        epoch(loader)
        assert loader.stats["skipped_shards"] == [s.name], reader
    assert main(["verify", root]) == 1
    printed = capsys.readouterr()
    out = printed.out + printed.err
    assert f"{s.name}: sample" in out and (".json whose width" in out or "without integer width" in out), out


def test_a_loader_state_naming_shards_the_data_set_lacks_is_refused_at_load(dataset):
    """A checkpoint's loader state is data from outside: `bad_shards: [99]` loaded silently and failed
    steps later with an IndexError (exit 70). Refused at load, it is a damaged checkpoint (exit 3, or
    resume=auto's fallback to the previous one)."""
    run = build_loader(cfg(dataset), **GEOM)
    for key, value, said in (("bad_shards", [99], "names shard 99"), ("bad", [[0, 9999]], "sample 9999 of shard 0")):
        state = {**run.state_dict(), key: value}
        with pytest.raises(ValueError, match=said):
            build_loader(cfg(dataset), **GEOM).load_state_dict(state)


def test_an_index_pointing_at_another_sample_s_image_is_a_bad_index_not_a_wrong_label(dataset, tmp_path):
    """The manifest's checksum covers the .tar, not the .idx: an index whose entry for one sample was
    given another sample's image offset trained that image under the first sample's key and label,
    silently (the local DALI reader takes the offsets as they are). Each entry's tar header is checked."""
    root = copy_dataset(dataset, str(tmp_path / "swapped"))
    s = read_manifest(root).shards[0]
    path = os.path.join(root, s.index)
    with open(path) as f:
        lines = f.read().splitlines()
    a, b = lines[1 + 3].split(), lines[1 + 4].split()
    ia, ib = next(j for j in range(0, len(a), 4) if a[j] in ("jpg", "png", "webp")), \
        next(j for j in range(0, len(b), 4) if b[j] in ("jpg", "png", "webp"))
    a[ia + 1], a[ia + 2] = b[ib + 1], b[ib + 2]          # sample 3's image entry -> sample 4's bytes
    lines[1 + 3] = " ".join(a)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    loader = build_loader(cfg(root, reader="dali"), **GEOM)
    epoch(loader)
    assert loader.stats["skipped_shards"] == [s.name]
    with pytest.raises(ShardError, match="bad index: the tar member at byte"):
        epoch(build_loader(cfg(root, reader="dali", on_error="raise"), **GEOM))
