"""Two real processes (gloo): disjoint shards (or disjoint halves of one shared shard), equal batch counts,
no hang; and the GPU path where there is one."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lmim.pipeline import build_loader
from lmim.pipeline.config import DataConfig
from tests.test_pipeline import GEOM, keys_of, make_dataset


def _rank_main(rank: int, world: int, url: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world)
    loader = build_loader(DataConfig(url=url, batch_size=4, num_threads=1, num_visible=4), rank=rank,
                          world_size=world, **GEOM)
    keys, steps = [], 0
    for _ in range(2):  # two epochs
        for batch in loader:
            x = batch.images.mean().reshape(1)
            dist.all_reduce(x)  # a collective per step, as DDP does: unequal batch counts would hang here
            keys.append(batch.keys)
            steps += 1
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"keys": keys, "steps": steps, "len": len(loader)}, f)
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_processes_gloo(tmp_path):
    url = make_dataset(str(tmp_path / "ds"), n=30, per_shard=7)  # 7, 7, 7, 7, 2: uneven
    torch.multiprocessing.spawn(_rank_main, args=(2, url, str(tmp_path)), nprocs=2, join=True)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert res[0]["steps"] == res[1]["steps"] == 2 * res[0]["len"] > 0
    for epoch in range(2):
        n = res[0]["len"]
        a = {k for b in res[0]["keys"][epoch * n:(epoch + 1) * n] for k in b}
        b = {k for b in res[1]["keys"][epoch * n:(epoch + 1) * n] for k in b}
        assert a.isdisjoint(b)


@pytest.mark.timeout(180)
def test_two_processes_share_one_shard(tmp_path):
    """A data set in ONE shard on two ranks (shared-shards mode): each epoch the ranks take disjoint
    halves of it, together every sample once, in equal batch counts (the all_reduce would hang otherwise)."""
    url = make_dataset(str(tmp_path / "ds"), n=16, per_shard=16)
    torch.multiprocessing.spawn(_rank_main, args=(2, url, str(tmp_path)), nprocs=2, join=True)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    n = res[0]["len"]
    assert res[0]["steps"] == res[1]["steps"] == 2 * n == 4
    for epoch in range(2):
        a = [k for b in res[0]["keys"][epoch * n:(epoch + 1) * n] for k in b]
        b = [k for b in res[1]["keys"][epoch * n:(epoch + 1) * n] for k in b]
        assert set(a).isdisjoint(b) and len(set(a) | set(b)) == 16
    assert res[0]["keys"][:n] != res[0]["keys"][n:]   # reshuffled between epochs


@pytest.mark.gpu
def test_gpu_decode_matches_cpu(tmp_path):
    url = make_dataset(str(tmp_path / "ds"), n=16, per_shard=8)
    c = DataConfig(url=url, batch_size=4, num_threads=2, num_visible=4)
    gpu = list(build_loader(c, device="cuda", **GEOM))
    cpu = list(build_loader(c, device="cpu", **GEOM))
    assert keys_of(gpu) == keys_of(cpu)
    for g, h in zip(gpu, cpu):
        assert g.images.is_cuda and g.visible.is_cuda and g.images.shape == h.images.shape
        # nvJPEG vs libjpeg-turbo IDCT and DALI's vs torch's resamplers: close, not equal.
        assert (g.images.cpu() - h.images).abs().mean() < 0.05
    ev = list(build_loader(c, device="cuda", train=False, **GEOM))
    assert ev[0].images.is_cuda and ev[0].images.shape[1:] == (3, 32, 32)
