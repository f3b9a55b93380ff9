"""`lmim shard --part auto`: parts named by the scheduler, built at once by separate processes into one
s3:// prefix (moto's S3 API on loopback), the last part to finish writing the manifest."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmim.tools.sample_images import write_photo_jpegs
from lmim.tools.shard import BuildError, build_dataset, verify_dataset
from lmim.tools.shard.scheduler import part_from_environment

REPO = Path(__file__).resolve().parents[1]
SCHEDULER_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
                  "JOB_COMPLETION_INDEX", "JOB_COMPLETIONS", "RANK", "WORLD_SIZE")


@pytest.mark.parametrize("env, part", [
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_MAX": "7"}, (3, 8)),
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
      "SLURM_ARRAY_TASK_MAX": "13"}, (2, 4)),                     # --array=10-13
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_MAX": "6"}, (2, 4)),                      # --array=0-6:2
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_MAX": "0"}, (0, 1)),
    ({"JOB_COMPLETION_INDEX": "5", "JOB_COMPLETIONS": "6"}, (5, 6)),
    ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),
    # a SLURM array wins over the RANK a launcher inside it may also set
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "0", "WORLD_SIZE": "1"}, (1, 2)),
])
def test_part_from_each_scheduler(env, part):
    assert part_from_environment(env) == part


@pytest.mark.parametrize("env, fragment", [
    ({}, "--part auto found no scheduler in the environment"),
    ({"JOB_COMPLETION_INDEX": "2"}, "set it in the Job to the same number as spec.completions"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "gives part 4 of 4, which is out of range"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_MAX": "4"}, "is not evenly spaced"),       # --array=0,1,4
])
def test_no_or_bad_scheduler_is_one_sentence(env, fragment):
    with pytest.raises(BuildError) as info:
        part_from_environment(env)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_cli_without_a_scheduler_exits_2_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARS}
    proc = subprocess.run([sys.executable, "-m", "lmim.tools.cli", "shard", str(tmp_path), str(tmp_path / "out"),
                           "--part", "auto"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("lmim shard: --part auto found no scheduler") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parts-src")
    write_photo_jpegs(root, 30, size=(64, 48), num_classes=3, seed=11)
    return root


def test_concurrent_parts_from_three_schedulers_make_the_one_build(corpus, s3_server, s3_bucket, tmp_path):
    """Three processes at once, each told its part by a different scheduler's variables; the one
    that finishes last writes manifest.json; the result equals a single whole build."""
    import s3fs

    url = f"s3://{s3_bucket}/parts"
    base = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARS}
    envs = [
        {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
         "SLURM_ARRAY_TASK_MAX": "2"},
        {"JOB_COMPLETION_INDEX": "1", "JOB_COMPLETIONS": "3"},
        {"RANK": "2", "WORLD_SIZE": "3"},
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "lmim.tools.cli", "shard", str(corpus), url, "--part", "auto",
                               "--shard-max-samples", "4", "--workers", "1", "--quiet", "--json"],
                              cwd=REPO, env={**base, **e}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for e in envs]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    import json
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert any(s["complete"] for s in summaries)   # at least the last one merged
    assert sum(s["built_shards"] for s in summaries) == 8   # 30 images / 4 per shard, each built once

    ref = tmp_path / "ref"
    build_dataset(str(corpus), str(ref), shard_max_samples=4, workers=1, progress=False)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    remote = json.loads(fs.cat_file(f"{s3_bucket}/parts/manifest.json"))
    local = json.loads((ref / "manifest.json").read_text())
    assert remote["shards"] == local["shards"] and remote["classes"] == local["classes"]
    assert remote["build"]["fingerprint"] == local["build"]["fingerprint"]
    for shard in local["shards"]:   # byte for byte
        assert fs.cat_file(f"{s3_bucket}/parts/{shard['name']}") == (ref / shard["name"]).read_bytes()
    assert verify_dataset(url) == []


def test_a_part_that_is_not_last_leaves_the_merge_to_the_last(corpus, tmp_path, capsys):
    from lmim.tools.cli import main

    dst = tmp_path / "ds"
    assert main(["shard", str(corpus), str(dst), "--part", "1/2", "--shard-max-samples", "4", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "the last part to finish writes manifest.json" in err and not (dst / "manifest.json").exists()
    assert main(["shard", str(corpus), str(dst), "--part", "0/2", "--shard-max-samples", "4", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "every part is done: this part, the last to finish, wrote manifest.json" in err
    assert "samples 30" in err and (dst / "manifest.json").exists()
    assert verify_dataset(str(dst)) == []


def test_a_rerun_of_a_part_removes_only_the_leftovers_of_writers_that_are_gone(tmp_path):
    """The same part started twice at once: each cleared the other's live temporary shards as "leftovers
    of a killed run", and the other then failed with a disk error (exit 6) naming a file it had written."""
    import subprocess
    import sys
    import time

    from lmim.pipeline.storage import Store
    from lmim.tools.shard.build import TMP_DIR, _scratch_dir
    from lmim.tools.shard.tasks import scratch_suffix

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = scratch_suffix().rsplit("-", 1)[0]                     # ".tmp-<this host>"
    try:
        tmp = tmp_path / "dst" / TMP_DIR
        tmp.mkdir(parents=True)
        live = f"shard-000001.tar{host}-{running.pid}"           # the same part, building now
        dead = f"shard-000001.tar{host}-{ended.pid}"             # a killed run's
        mine = f"shard-000001.idx{scratch_suffix()}"              # this pid's, from before a restart
        older_lmim = "shard-000001.tar.tmp-4242"                  # before host and pid were recorded
        elsewhere = "shard-000001.tar.tmp-another-host-1"         # another node's, recent
        stale = "shard-000001.idx.tmp-another-host-2"             # another node's, a day old
        other_part = f"shard-000002.tar{host}-{ended.pid}"
        for name in (live, dead, mine, older_lmim, elsewhere, stale, other_part):
            (tmp / name).write_bytes(b"x")
        day_ago = time.time() - 86400
        os.utime(tmp / stale, (day_ago, day_ago))
        assert _scratch_dir(Store(str(tmp_path / "dst")), {"shard-000001"}) == str(tmp)
        assert sorted(p.name for p in tmp.iterdir()) == sorted([live, elsewhere, other_part])
    finally:
        running.kill()
        running.wait()
