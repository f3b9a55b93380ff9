"""The loader/backend contract (lmim.pipeline.backend): plans in, typed results and errors out."""
from __future__ import annotations

import pickle

import numpy as np

from lmim.pipeline.backend import CropPlan, EpochPlan
from lmim.pipeline.errors import SampleError, ShardError, StoreUnreachable
from lmim.pipeline.order import crop_windows


def test_errors_cross_a_process_boundary_with_where_they_happened():
    """DataLoader workers hand errors over pickled: type, shard, key and position survive."""
    err = pickle.loads(pickle.dumps(SampleError("shard-000001.tar", "cat-0a1b", "undecodable (x)", position=(1, 7))))
    assert type(err) is SampleError and err.position == (1, 7) and err.key == "cat-0a1b"
    assert str(err) == "sample 'cat-0a1b' in shard shard-000001.tar: undecodable (x)"
    assert SampleError("s", "k", "m").position is None
    out = pickle.loads(pickle.dumps(StoreUnreachable("shard-000002.tar", "network error")))
    assert type(out) is StoreUnreachable and isinstance(out, ShardError) and out.shard == "shard-000002.tar"


def test_an_epoch_plan_resumed_at_a_batch_counts_batches_like_the_epoch():
    shards, samples = np.arange(10) // 4, np.arange(10) % 4
    crops = CropPlan(seed=3, rank=1, scale=(0.2, 1.0), ratio=(0.75, 4 / 3), hflip=0.5)
    plan = EpochPlan(epoch=2, start=5, shards=shards, samples=samples, batch_size=4, crops=crops)
    assert plan.num_batches == 3 and plan.span(5) == (0, 4) and plan.span(7) == (8, 10)
    w, h = np.array([64, 80]), np.array([48, 60])
    got = plan.windows(6, w, h)
    want = crop_windows(w, h, 3, 2, 1, 6, (0.2, 1.0), (0.75, 4 / 3), 0.5)  # (seed, epoch, rank, batch)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
