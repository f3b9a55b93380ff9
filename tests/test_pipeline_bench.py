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
    from lmim.tools.shard import build_dataset
    from lmim.tools.sample_images import write_photo_jpegs

    write_photo_jpegs(tmp_path / "src", 12, size=(32, 32), num_classes=2, seed=0)
    build_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
    rc = main(["bench", "pipeline", str(tmp_path / "ds"), "--batch-size", "8", "--grid", "4", "--patch", "8",
               "--gap", "0", "--num-visible", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "--batch-size 8 makes fewer than 2 batches of the dataset (12 samples" in err
    assert "data.batch_size" not in err
    # Without a URL the same is known before minutes of building a corpus, and so are a bad --mask
    # and a pass of one (untimed) batch: usage errors, and nothing is built (its JSON said "ratio": NaN).
    (tmp_path / "w").mkdir()
    for argv, want in ((["--images", "10", "--batch-size", "8"], "fewer than 2 batches of --batch-size 8"),
                       (["--mask", "nonsense"], "argument --mask: invalid choice"),
                       (["--max-batches", "1"], "must be 0 (a whole epoch) or at least 2"),
                       (["s3://b/ds", "--s3-loopback"], "give a local path or no URL")):
        with pytest.raises(SystemExit) as stop:
            main(["bench", "pipeline", "--workdir", str(tmp_path / "w"), *argv])
        assert stop.value.code == 2 and want in capsys.readouterr().err
    assert list((tmp_path / "w").iterdir()) == []
    with pytest.raises(SystemExit) as stop:   # as `lmim bench shard --tmp` (this was an I/O error, exit 6)
        main(["bench", "pipeline", "--workdir", str(tmp_path / "nowhere")])
    assert stop.value.code == 2 and "is not an existing folder" in capsys.readouterr().err
