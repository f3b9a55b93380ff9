"""`lmim bench pipeline` runs end to end on a tiny synthetic dataset (no timing assertions)."""
from __future__ import annotations

import json

import pytest

from lmim.tools.cli import main


@pytest.mark.timeout(300)
def test_bench_pipeline_json(capsys, tmp_path):
    rc = main(["bench", "pipeline", "--json", "--images", "24", "--image-size", "64", "48", "--shard-samples", "8",
               "--batch-size", "4", "--grid", "4", "--patch", "8", "--gap", "2", "--num-visible", "4",
               "--rounds", "2", "--s3-loopback", "--workdir", str(tmp_path)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ratio"] > 0 and out["dali_images_per_s"] > 0 and out["baseline_images_per_s"] > 0
    # Whole-shard streaming: one GET per shard (3 shards) plus the manifest, per pass.
    assert 0 < out["stream_requests_per_sample"] <= 0.5
    assert out["stream_bytes_per_sample"] > 0
    # More ranks (5) than shards (3): each rank fetches the shards its range crosses, whole.
    assert out["shared_shards_world_size"] == 5
    assert out["stream_requests_per_sample"] < out["shared_shards_requests_per_sample"] <= 1.0
    # The two-source weighted mix: timed beside one source, and streamed whole shard by whole shard
    # (each source fetches its shards once a run, not once a sample: 24 samples would be ~1.0).
    assert out["mix_images_per_s"] > 0 and out["mix_ratio"] > 0 and len(out["mix_rounds"]) == 2
    assert 0 < out["mix_stream_requests_per_sample"] <= 0.5
    # The integrity check's cost per local shard, and the machine the figures came from.
    assert out["checksum_algorithm"] == "xxh3_128" and out["checksum_ms_per_shard"] > 0
    assert out["checksum_share_of_read"] > 0 and out["machine"].startswith("CPU ")


def test_bench_pipeline_bad_url(capsys, tmp_path):
    rc = main(["bench", "pipeline", str(tmp_path / "nothing-here")])
    assert rc == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_bench_pipeline_batch_larger_than_the_dataset_names_the_bench_option(capsys, tmp_path):
    """The loader's own sentence says data.batch_size (a training key); the bench's option is --batch-size."""
    rc = main(["bench", "pipeline", "--images", "6", "--image-size", "32", "32", "--batch-size", "8",
               "--grid", "4", "--patch", "8", "--gap", "0", "--num-visible", "4", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--batch-size 8 is larger than the dataset (6 samples" in err and "data.batch_size" not in err
