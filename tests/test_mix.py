"""Weighted multi-source data (`data.sources`, pipeline/mix.py): realised proportions, how the
sources interleave, exact and elastic resume, two real processes, a remote source, bad configs."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from lmim.pipeline import build_loader
from lmim.pipeline.config import DataConfig, DataConfigError
from lmim.pipeline.format.manifest import read_manifest
from lmim.pipeline.mix import quotas
from lmim.pipeline.shards import read_local_meta
from tests.test_pipeline import GEOM, keys_of, make_dataset, upload

# Two small datasets of different sizes and shard counts: A 32 samples in 4 shards (10, 10, 10, 2),
# B 12 samples in 3 shards (5, 5, 2).
SIZES = {"a": (32, 10), "b": (12, 5)}


def make_unlabelled(root: str, n: int, per_shard: int) -> str:
    """Like `make_dataset`, but flat (no classes), so its sample keys differ from a labelled set's."""
    from lmim.tools.sample_images import write_photo_jpegs
    from lmim.tools.shard import build_dataset

    write_photo_jpegs(root + "-src", n, size=(64, 48), seed=1)
    build_dataset(root + "-src", root, shard_max_bytes=None, shard_max_samples=per_shard, workers=1, seed=1,
                  storage_options={}, progress=False)
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mix")
    urls = {"a": make_dataset(str(root / "a"), n=SIZES["a"][0], per_shard=SIZES["a"][1]),
            "b": make_unlabelled(str(root / "b"), *SIZES["b"])}
    assert keys_in(urls["a"]).isdisjoint(keys_in(urls["b"]))
    return urls


def keys_in(url: str) -> set[str]:
    m = read_manifest(url, {})
    return {k for s in m.shards
            for k in read_local_meta(os.path.join(url, s.name), os.path.join(url, s.index), s.name, s.samples).keys}


def mixed(sources: dict[str, str], weights=(1, 3), **kw) -> DataConfig:
    base = dict(sources=[{"url": sources["a"], "weight": weights[0]}, {"url": sources["b"], "weight": weights[1]}],
                samples_per_epoch=40, batch_size=4, num_threads=1, num_visible=4, max_retries=1)
    base.update(kw)
    return DataConfig(**base)


def per_source(keys: list[str], sources: dict[str, str]) -> dict[str, int]:
    owner = {k: name for name, url in sources.items() for k in keys_in(url)}
    return dict(Counter(owner[k] for k in keys))


def test_largest_remainder_quotas():
    assert quotas(40, [1, 3]) == [10, 30]
    assert quotas(10, [1, 1, 1]) == [4, 3, 3]          # the tie goes to the earlier source
    assert quotas(7, [0.5, 0.25, 0.25]) == [3, 2, 2]          # 3.5, 1.75, 1.75: the largest remainders
    assert sum(quotas(1001, [0.3, 0.7, 1e-3])) == 1001
    # any positive scale: huge weights summed to inf (negative quotas, then a traceback)
    assert quotas(40, [3, 1e308, 1e308]) == [0, 20, 20]
    assert quotas(40, [1e-300, 3e-300]) == [10, 30]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_realised_proportions_match_the_weights_every_epoch(sources, backend):
    loader = build_loader(mixed(sources, loader=backend), **GEOM)
    assert len(loader) == 10                              # 40 samples an epoch in batches of 4
    for _ in range(3):
        keys = keys_of(list(loader))
        assert per_source(keys, sources) == {"a": 10, "b": 30}
    assert loader.stats["source_samples"] == {"a": 30, "b": 90}


def test_batches_hold_the_weights_proportions_not_runs_of_one_source(sources):
    """Sources are dealt evenly over the epoch: a batch of 4 at weights 1:3 holds about 1 of A."""
    loader = build_loader(mixed(sources, batch_size=8, samples_per_epoch=80), **GEOM)
    a_keys = keys_in(sources["a"])
    for batch in loader:
        n_a = sum(k in a_keys for k in batch.keys)
        assert 1 <= n_a <= 3                               # expected 2 of 8


def test_a_down_weighted_source_shows_every_sample_before_repeating_any(sources):
    """A (32 samples) gets 10 an epoch: its first 30 samples over three epochs are all different."""
    loader = build_loader(mixed(sources), **GEOM)
    a_keys = keys_in(sources["a"])
    seen = [k for _ in range(3) for k in keys_of(list(loader)) if k in a_keys]
    assert len(seen) == 30 and len(set(seen)) == 30


def test_the_mixture_is_deterministic_from_the_seed(sources):
    first = keys_of(list(build_loader(mixed(sources), seed=3, **GEOM)))
    again = keys_of(list(build_loader(mixed(sources), seed=3, **GEOM)))
    other = keys_of(list(build_loader(mixed(sources), seed=4, **GEOM)))
    assert first == again and first != other


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resume_mid_epoch_is_exact(sources, backend):
    c = mixed(sources, loader=backend)
    ref = build_loader(c, **GEOM)
    full = [b.keys for _ in range(2) for b in ref]
    first = build_loader(c, **GEOM)
    it = iter(first)
    head = [next(it).keys for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))   # as the checkpoint stores it
    first.close()
    resumed = build_loader(c, **GEOM)
    resumed.load_state_dict(state)
    rest = [b.keys for b in resumed] + [b.keys for b in resumed]
    assert head + rest == full
    assert resumed.stats["source_samples"] == {"a": 20, "b": 60}


def test_another_mixture_does_not_resume_mid_epoch(sources, caplog):
    first = build_loader(mixed(sources), **GEOM)
    next(iter(first))
    state = first.state_dict()
    first.close()
    other = build_loader(mixed(sources, weights=(1, 1)), **GEOM)
    with caplog.at_level("WARNING", logger="lmim.pipeline.loader"):
        other.load_state_dict(state)
    assert (other.epoch, other.batches_left()) == (1, len(other))
    # the one line says what changed, and only that (the sample counts did not)
    assert [r.getMessage() for r in caplog.records] == [
        "the data loader resumes at the start of epoch 1, not mid-epoch, because the data.sources mixture "
        "(its URLs or weights) changed since the checkpoint"]
    # the per-source counts are the run's: they go on from the checkpoint's, whatever the new weights
    assert other.stats["source_samples"] == first.stats["source_samples"] and sum(first.stats["source_samples"].values())


def test_elastic_resume_of_a_mixture(sources):
    """2 ranks stop after 3 of their 6 batches; 3 ranks take exactly what the 2-rank epoch had left
    (24 samples: 2 batches each)."""
    c = mixed(sources, samples_per_epoch=48)
    old = [build_loader(c, rank=r, world_size=2, **GEOM) for r in range(2)]
    taken = []
    for ld in old:
        it = iter(ld)
        taken += next(it).keys + next(it).keys + next(it).keys
    states = [ld.state_dict() for ld in old]
    new = [build_loader(c, rank=r, world_size=3, **GEOM) for r in range(3)]
    assert all(ld.load_elastic_state(states) for ld in new)
    assert len({ld.batches_left() for ld in new}) == 1
    rest = [k for ld in new for k in keys_of(list(ld))]
    full = [k for r in range(2) for k in keys_of(list(build_loader(c, rank=r, world_size=2, **GEOM)))]
    assert Counter(taken + rest) == Counter(full) and len(full) == 48
    assert per_source(taken + rest, sources) == {"a": 12, "b": 36}
    # the run's per-source counts (summed over processes, as the trainer logs them) carry over too
    assert dict(sum((Counter(ld.stats["source_samples"]) for ld in new), Counter())) == {"a": 12, "b": 36}
    assert all(ld.epoch == 1 for ld in new)


def _rank_main(rank: int, world: int, urls: list[str], out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world)
    c = DataConfig(sources=[{"url": urls[0], "weight": 1}, {"url": urls[1], "weight": 3}], samples_per_epoch=40,
                   batch_size=4, num_threads=1, num_visible=4)
    loader = build_loader(c, rank=rank, world_size=world, **GEOM)
    keys, steps = [], 0
    for _ in range(2):
        for batch in loader:
            x = batch.images.mean().reshape(1)
            dist.all_reduce(x)  # as DDP does: unequal batch counts would hang here
            keys.append(batch.keys)
            steps += 1
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"keys": keys, "steps": steps, "len": len(loader), "counts": loader.stats["source_samples"]}, f)
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_processes_equal_batches_disjoint_samples_and_the_weights(sources, tmp_path):
    torch.multiprocessing.spawn(_rank_main, args=(2, [sources["a"], sources["b"]], str(tmp_path)), nprocs=2,
                                join=True)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    n = res[0]["len"]
    assert res[0]["steps"] == res[1]["steps"] == 2 * n == 10            # 20 samples per rank an epoch
    for r in res:
        assert r["counts"] == {"a": 10, "b": 30}                          # 5 + 15 per epoch on each rank
    for e in range(2):
        a = [k for b in res[0]["keys"][e * n:(e + 1) * n] for k in b]
        b = [k for b in res[1]["keys"][e * n:(e + 1) * n] for k in b]
        a_keys = keys_in(sources["a"])
        # each source is split between the ranks: the ranks never share a sample of A (down-weighted)
        assert {k for k in a if k in a_keys}.isdisjoint({k for k in b if k in a_keys})


def test_a_remote_source_is_fetched_whole_shard_by_shard(sources, s3_server, s3_bucket):
    remote = upload(sources["b"], s3_bucket, "b", s3_server)
    c = DataConfig(sources=[{"url": sources["a"], "weight": 1}, {"url": remote, "weight": 3}], samples_per_epoch=40,
                   batch_size=4, num_threads=1, num_visible=4, max_retries=1)
    local = build_loader(mixed(sources), **GEOM)
    loader = build_loader(c, **GEOM)
    keys = keys_of(list(loader))
    assert keys == keys_of(list(local))                  # the same plan, whatever the storage
    # B's 30 samples of the epoch run through its shards in order: each fetched once per run, not per sample
    plan_shards = loader._plan(0)[0]
    b_runs = sum(1 for i, s in enumerate(plan_shards[plan_shards >= 4])
                 if i == 0 or s != plan_shards[plan_shards >= 4][i - 1])
    assert loader.stats["shards_fetched"] == b_runs <= 9   # 2.5 passes over 3 shards


def test_bad_sources_fail_in_one_sentence(sources, tmp_path):
    with pytest.raises(DataConfigError, match=r"data.sources\[1\].weight' must be a positive number"):
        build_loader(mixed(sources, weights=(1, 0)), **GEOM)
    with pytest.raises(DataConfigError, match="gets 0 of the 40 samples"):
        build_loader(mixed(sources, weights=(1, 1000)), **GEOM)
    with pytest.raises(DataConfigError, match="samples_per_epoch"):
        build_loader(mixed(sources, samples_per_epoch=0), **GEOM)
    with pytest.raises(DataConfigError, match="an epoch of 3 sample.s. is less than one batch of 4"):
        build_loader(mixed(sources, samples_per_epoch=3), **GEOM)
    from lmim.pipeline.config import training_sources

    twice = DataConfig(sources=[{"url": sources["a"], "name": "x"}, {"url": sources["b"], "name": "x"}])
    with pytest.raises(DataConfigError, match=r"data.sources\[0\].name' is 'x', the name of data.sources\[1\] too"):
        training_sources(twice)
    # two URLs with the same last part and no names given: told apart by their position, as before
    same_tail = DataConfig(sources=[{"url": "/data/a/train"}, {"url": "/data/b/train"}])
    assert [s.name for s in training_sources(same_tail)] == ["train#0", "train#1"]
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_loader(DataConfig(sources=[{"url": sources["a"]}, {"url": missing}], num_visible=4, batch_size=4),
                     **GEOM)


def test_the_trainer_reads_sources_and_logs_per_source_counts(sources, tmp_path, capsys):
    from lmim.train.config import ConfigError, load_config
    from lmim.train.observe import read_metrics
    from lmim.train.pretrain import reset_accelerate_state, run
    from tests.test_train import TINY

    mix = f"data.sources=[{{url: {sources['a']}, weight: 1}}, {{url: {sources['b']}, weight: 3, name: bee}}]"
    reset_accelerate_state()
    cfg = load_config("quickstart", [*TINY, mix, "data.samples_per_epoch=40", "eval.knn_every_epochs=0",
                                     f"run_dir={tmp_path / 'r'}"])
    out = run(cfg)
    assert out["steps_per_epoch"] == 5 and out["step"] == 10
    assert "mixing 2 source(s), 40 samples an epoch: a (weight 1): 10 (25.0%); bee (weight 3): 30 (75.0%)" \
        in capsys.readouterr().out
    last = [r for r in read_metrics(Path(tmp_path / "r" / "metrics.jsonl")) if "loss" in r][-1]
    assert (last["data_samples/a"], last["data_samples/bee"]) == (20, 60)
    with pytest.raises(ConfigError, match="weight"):
        load_config("quickstart", [*TINY, f"data.sources=[{{url: {sources['a']}, weight: -1}}]"])
    with pytest.raises(ConfigError, match="wieght"):
        load_config("quickstart", [*TINY, f"data.sources=[{{url: {sources['a']}, wieght: 1}}]"])
    with pytest.raises(ConfigError, match="'data.sources' has the wrong shape"):
        load_config("quickstart", [*TINY, f"data.sources={{url: {sources['a']}}}"])   # a mapping, not a list


def test_a_mixture_the_data_cannot_honour_is_a_config_failure_exit_2(sources, tmp_path):
    """Checked once the sizes are known (at loader start): one sentence, the config exit code."""
    from lmim.train.config import load_config
    from lmim.train.failures import EXIT_CONFIG, classify
    from lmim.train.pretrain import reset_accelerate_state, run
    from tests.test_train import TINY

    mix = f"data.sources=[{{url: {sources['a']}, weight: 1}}, {{url: {sources['b']}, weight: 1000}}]"
    reset_accelerate_state()
    cfg = load_config("quickstart", [*TINY, mix, "data.samples_per_epoch=40", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(DataConfigError) as err:
        run(cfg)
    failure = classify(err.value)
    assert failure.code == EXIT_CONFIG and "gets 0 of the 40 samples" in failure.sentence


def test_plan_lengths_are_whole_batches_and_equal_on_every_rank(sources):
    """On 4 ranks B (3 shards) is read in shared-shards mode and A (4 shards) in whole shards; either
    way every rank gets the same whole batches, and the ranks never share a sample of the
    down-weighted A."""
    a_keys = keys_in(sources["a"])
    for world in (1, 2, 3, 4):
        loaders = [build_loader(mixed(sources, samples_per_epoch=50), rank=r, world_size=world, **GEOM)
                   for r in range(world)]
        assert {len(ld) for ld in loaders} == {(50 // world) // 4}
        a_taken = [{k for k in keys_of(list(ld)) if k in a_keys} for ld in loaders]
        # no sample of A on two ranks (a rank whose only shard is A's 2-sample one wraps it: the
        # documented uneven-shard repeat of whole-shards mode, within that rank)
        assert sum(len(t) for t in a_taken) == len(set().union(*a_taken)) > 0


def test_one_source_with_an_epoch_of_a_set_size(sources):
    """data.samples_per_epoch with one source: 16-sample epochs walk through all 32 of A before repeating."""
    c = DataConfig(url=sources["a"], samples_per_epoch=16, batch_size=4, num_threads=1, num_visible=4)
    loader = build_loader(c, **GEOM)
    assert len(loader) == 4 and loader.shard_mode == "mixed sources"
    first, second = keys_of(list(loader)), keys_of(list(loader))
    assert len(set(first + second)) == 32


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_trainer_on_two_processes_logs_the_runs_per_source_counts(sources, tmp_path):
    """torchrun, 2 processes (gloo): equal steps, and `data_samples/<source>` summed over the processes."""
    import subprocess
    import sys

    from lmim.train.observe import read_metrics
    from tests.test_train import TINY

    repo = Path(__file__).resolve().parents[1]
    mix = f"data.sources=[{{url: {sources['a']}, weight: 1}}, {{url: {sources['b']}, weight: 3}}]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "lmim.train.pretrain", "--config", "quickstart", *TINY, "data.loader=dali", "data.num_threads=1",
           "data.batch_size=4", mix, "data.samples_per_epoch=40", "eval.knn_every_epochs=0",
           f"run_dir={tmp_path / 'r'}"]
    done = subprocess.run(cmd, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mixing 2 source(s), 40 samples an epoch" in done.stdout
    last = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r][-1]
    # 2 epochs x 2 processes x 5 batches of 4: 20 samples of A and 60 of B in all
    assert last["step"] == 10 and (last["data_samples/a"], last["data_samples/b"]) == (20, 60)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_bad_shard_of_one_source_is_skipped_and_named_with_its_dataset(sources, tmp_path, backend):
    """data.on_error=skip in a mixture: the truncated shard of B is left out (named with B's URL),
    the epoch keeps its length and its proportions (B's other shards stand in)."""
    import shutil

    b = shutil.copytree(sources["b"], tmp_path / "b")
    bad = read_manifest(str(b), {}).shards[0]
    with open(b / bad.name, "r+b") as f:
        f.truncate((b / bad.name).stat().st_size // 2)
    c = mixed(sources, loader=backend)
    c.sources[1]["url"] = str(b)
    loader = build_loader(c, **GEOM)
    keys = keys_of(list(loader))
    assert len(keys) == 40 and loader.stats["skipped_shards"] == [os.path.join(str(b), bad.name)]
    bad_keys = set(read_local_meta(os.path.join(sources["b"], bad.name), os.path.join(sources["b"], bad.index),
                                   bad.name, bad.samples).keys)
    assert not set(keys) & bad_keys
    assert per_source(keys, sources) == {"a": 10, "b": 30}
