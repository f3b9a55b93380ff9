"""Shard builder: every input kind round-trips through DALI; parts, resume after SIGKILL, errors, verify."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from lmim.pipeline.format.manifest import MANIFEST_NAME, REJECTS_NAME, read_manifest
from lmim.tools.sample_images import write_photo_jpegs
from lmim.tools.shard import BuildError, build_dataset, merge_parts, verify_dataset
from lmim.pipeline.format.keys import make_key
from lmim.tools.shard.options import parse_bytes, storage_options_from
from lmim.tools.shard.readback import read_back

REPO = Path(__file__).resolve().parents[1]
SMALL = (64, 48)


# ------------------------------------------------------------------------------------------------
# helpers (also used by tests/test_shard_images.py and tests/test_shard_s3.py)

def read_all(root: str, storage_options: dict | None = None) -> dict[str, dict]:
    """source path -> {data, label, shape, meta, key, ext} for every sample, read and decoded by DALI."""
    out = {}
    for s in read_back(root, decode=True, storage_options=storage_options):
        src = s.meta["source"]
        assert src not in out, f"sample {src} stored twice"
        out[src] = {"data": s.data, "label": s.label, "shape": s.shape, "meta": s.meta, "key": s.key, "ext": s.ext}
    return out


def assert_round_trip(root: str, expected: dict[str, tuple[bytes, int | None]], storage_options: dict | None = None):
    """The dataset verifies, and DALI reads back exactly `expected` (source -> (original bytes, label))."""
    assert verify_dataset(root, storage_options) == []
    got = read_all(root, storage_options)
    assert set(got) == set(expected)
    for src, (data, label) in expected.items():
        g = got[src]
        assert g["data"] == data, f"{src}: stored bytes differ from the original"
        assert g["label"] == label, src
        assert g["shape"] == (g["meta"]["height"], g["meta"]["width"], 3), src
        assert "." not in g["key"] and g["key"] == make_key(src)
    assert read_manifest(root, storage_options).total_samples == len(expected)


def tree_expected(root: Path, labels: bool = True) -> dict[str, tuple[bytes, int | None]]:
    """source id -> (bytes, label) for every file under root (labels from sorted top-level folders)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    out = {}
    for p in files:
        rel = p.relative_to(root).as_posix()
        out[rel] = (p.read_bytes(), classes.index(rel.split("/")[0]) if labels else None)
    return out


def manifest_core(root: str) -> dict:
    m = json.loads(Path(root, MANIFEST_NAME).read_text())
    return {"shards": m["shards"], "classes": m["classes"], "total": m["total_samples"]}


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classes")
    write_photo_jpegs(root, 18, size=SMALL, num_classes=3, seed=1)
    return root


# ------------------------------------------------------------------------------------------------
# input kinds

def test_class_folder_tree_round_trip(class_tree, tmp_path):
    dst = tmp_path / "ds"
    s = build_dataset(str(class_tree), str(dst), shard_max_samples=5, workers=2, progress=False)
    assert (s.samples, s.shards, s.classes, s.rejects) == (18, 4, 3, 0)
    m = read_manifest(str(dst))
    assert m.classes == ["class_000", "class_001", "class_002"]
    assert [x.samples for x in m.shards] == [5, 5, 5, 3]
    assert m.build["source_kind"] == "class-folders"
    assert_round_trip(str(dst), tree_expected(class_tree))
    assert (dst / REJECTS_NAME).read_text() == ""
    # the global shuffle mixes classes across shards (stored order is not the sorted source order)
    order = [s.meta["source"] for s in read_back(str(dst), decode=False)]
    assert order != sorted(order)


def test_index_equals_dalis_wds2idx_and_headers_equal_tarfiles(class_tree, tmp_path):
    """The index written while writing is exactly what DALI's own `wds2idx` derives from the tar."""
    from wds2idx import IndexCreator

    from lmim.tools.shard.writer import tar_header

    dst = tmp_path / "ds"
    build_dataset(str(class_tree), str(dst), shard_max_samples=7, progress=False)
    for tar in sorted(dst.glob("*.tar")):
        ref = tmp_path / (tar.stem + ".ref.idx")
        with IndexCreator(str(tar), str(ref), verbose=False) as ic:
            ic.create_index()
        assert tar.with_suffix(".idx").read_text() == ref.read_text()
    for name, size in [("a.jpg", 0), ("k-0123456789ab.json", 124), ("x" * 100, 8 ** 11 - 1)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        assert tar_header(name.encode(), size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_shuffle_is_seeded_and_shards_are_deterministic(class_tree, tmp_path):
    a = build_dataset(str(class_tree), str(tmp_path / "a"), shard_max_samples=6, seed=3, progress=False)
    b = build_dataset(str(class_tree), str(tmp_path / "b"), shard_max_samples=6, seed=3, workers=1, progress=False)
    c = build_dataset(str(class_tree), str(tmp_path / "c"), shard_max_samples=6, seed=4, progress=False)
    assert a.samples == b.samples == c.samples == 18
    assert manifest_core(str(tmp_path / "a")) == manifest_core(str(tmp_path / "b"))  # byte-identical shards
    order = lambda d: [s.meta["source"] for s in read_back(str(tmp_path / d), decode=False)]  # noqa: E731
    assert order("a") != order("c") and sorted(order("a")) == sorted(order("c"))


def test_flat_folder_recursive_unlabelled_with_symlink_loop(tmp_path):
    src = tmp_path / "flat"
    write_photo_jpegs(src, 6, size=SMALL, seed=2)
    write_photo_jpegs(src / "nested" / "deeper", 3, size=SMALL, seed=3)
    os.symlink("..", src / "nested" / "loop")           # a loop: must not recurse forever
    (src / ".hidden.jpg").write_bytes(b"junk")            # hidden files are not part of a corpus
    dst = tmp_path / "ds"
    s = build_dataset(str(src), str(dst), shard_max_bytes=parse_bytes("20KB"), progress=False)
    assert s.classes == 0 and s.samples == 9 and s.shards > 1
    m = read_manifest(str(dst))
    assert m.classes is None and m.build["source_kind"] == "folder"
    expected = {k: (v[0], None) for k, v in tree_expected(src, labels=False).items() if "/loop/" not in k
                and not k.startswith(".")}
    assert_round_trip(str(dst), expected)
    # byte limit: every shard with more than one sample stays under it
    for info in m.shards:
        assert info.samples == 1 or info.bytes <= parse_bytes("20KB")


def test_file_list_with_labels_spaces_and_missing_files(tmp_path):
    imgs = tmp_path / "imgs"
    paths = write_photo_jpegs(imgs, 5, size=SMALL, seed=4)
    spaced = imgs / "with space é.jpg"
    shutil.copy(paths[0], spaced)
    lst = tmp_path / "list.txt"
    lst.write_text("# comment line\n"
                   f"imgs/{paths[1].name} dog\n"
                   f"imgs/{paths[2].name}\tcat\n"
                   f"{paths[3]} dog\n"                       # absolute path
                   f"imgs/{spaced.name}\tcat\n"              # a tab separates a path holding spaces
                   f"imgs/missing.jpg\tdog\n", encoding="utf-8")
    dst = tmp_path / "ds"
    s = build_dataset(str(lst), str(dst), progress=False)
    assert (s.samples, s.classes, s.rejects) == (4, 2, 1)
    m = read_manifest(str(dst))
    assert m.classes == ["cat", "dog"] and m.build["source_kind"] == "file-list"
    expected = {f"imgs/{paths[1].name}": (paths[1].read_bytes(), 1), f"imgs/{paths[2].name}": (paths[2].read_bytes(), 0),
                str(paths[3]): (paths[3].read_bytes(), 1), f"imgs/{spaced.name}": (spaced.read_bytes(), 0)}
    assert_round_trip(str(dst), expected)
    rejects = [json.loads(x) for x in (dst / REJECTS_NAME).read_text().splitlines()]
    assert rejects == [{"source": "imgs/missing.jpg", "reason": "unreadable (No such file or directory)"}]


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_tar_archive_of_class_folders(class_tree, tmp_path, suffix):
    archive = tmp_path / f"corpus{suffix}"
    with tarfile.open(archive, "w:gz" if suffix.endswith("gz") else "w") as tf:
        tf.add(class_tree, arcname="train")               # wrapped in one folder, as archives usually are
    dst = tmp_path / "ds"
    s = build_dataset(str(archive), str(dst), shard_max_samples=7, progress=False)
    assert (s.samples, s.classes) == (18, 3)
    expected = {f"train/{k}": v for k, v in tree_expected(class_tree).items()}
    assert_round_trip(str(dst), expected)
    assert read_manifest(str(dst)).classes == ["class_000", "class_001", "class_002"]


def test_a_tar_archive_cut_inside_a_member_header_is_refused_not_built_in_part(class_tree, tmp_path):
    """tarfile (and GNU tar) end a listing quietly at a header cut short: the builder must not make a
    dataset of the archive's first half and report success."""
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tf:
        tf.add(class_tree, arcname="train")
    with tarfile.open(whole) as tf:
        cut_at = [m.offset for m in tf][len(tf.getmembers()) // 2] + 100   # 100 bytes into a header
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:cut_at])
    with pytest.raises(BuildError, match="cannot read the tar archive .* cut-off member header"):
        build_dataset(str(cut), str(tmp_path / "ds"), progress=False)


# ------------------------------------------------------------------------------------------------
# parts, resume, atomicity

def test_parts_then_merge_equal_one_build(class_tree, tmp_path):
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    build_dataset(str(class_tree), str(whole), shard_max_samples=4, progress=False)
    p0 = build_dataset(str(class_tree), str(parted), shard_max_samples=4, part=(0, 2), progress=False)
    assert not p0.complete and not (parted / MANIFEST_NAME).exists()
    with pytest.raises(BuildError, match=r"2 of 5 shards are not built yet \(shard-000001, shard-000003\)"):
        merge_parts(str(parted))
    build_dataset(str(class_tree), str(parted), shard_max_samples=4, part=(1, 2), progress=False)
    from lmim.tools.cli import main
    assert main(["merge", str(parted)]) == 0
    assert manifest_core(str(parted)) == manifest_core(str(whole))
    assert verify_dataset(str(parted)) == []
    # A shard deleted (or cut) after its part recorded it: merge refuses to write a manifest over it,
    # and the part that built it, run again, rebuilds it and writes the manifest.
    (parted / MANIFEST_NAME).unlink()
    (parted / "shard-000001.tar").unlink()
    with pytest.raises(BuildError, match=r"1 shard\(s\) recorded as built are missing .* \(shard-000001.tar\)"):
        merge_parts(str(parted))
    assert not (parted / MANIFEST_NAME).exists()
    build_dataset(str(class_tree), str(parted), shard_max_samples=4, part=(1, 2), progress=False)
    assert manifest_core(str(parted)) == manifest_core(str(whole)) and verify_dataset(str(parted)) == []


def _sidecars(dst: Path) -> list[Path]:
    return sorted((dst / "_build" / "shards").glob("*.json")) if (dst / "_build" / "shards").exists() else []


def test_sigkill_then_rerun_equals_uninterrupted_build(tmp_path):
    src = tmp_path / "src"
    write_photo_jpegs(src, 24, size=SMALL, num_classes=2, seed=5)
    dst, ref = tmp_path / "ds", tmp_path / "ref"
    # The real CLI in a child process with 2 worker processes; the test slows each shard down
    # (0.3 s) so that it can kill the build mid-way.
    code = ("import sys, time, lmim.tools.shard.tasks as b\n"
            "orig = b.write_shard\n"
            "def slow(task):\n    out = orig(task)\n    time.sleep(0.3)\n    return out\n"
            "b.write_shard = slow\n"
            "from lmim.tools.cli import main\n"
            f"sys.exit(main(['shard', {str(src)!r}, {str(dst)!r}, '--shard-max-samples', '3', '--workers', '2', '--quiet']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.time() + 60
    while len(_sidecars(dst)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(_sidecars(dst))
    time.sleep(1.0)  # the worker process died with the build: no shard completes after the kill
    assert len(_sidecars(dst)) == done_before
    assert 2 <= done_before < 8 and not (dst / MANIFEST_NAME).exists()
    with pytest.raises(FileNotFoundError, match="build has not finished"):
        read_manifest(str(dst))
    resumed = build_dataset(str(src), str(dst), shard_max_samples=3, workers=2, progress=False)
    assert len(_sidecars(dst)) == 8
    assert resumed.resumed_shards == done_before and resumed.built_shards == 8 - done_before
    assert resumed.images_read == 24 - 3 * done_before           # no sample processed twice
    build_dataset(str(src), str(ref), shard_max_samples=3, progress=False)
    assert manifest_core(str(dst)) == manifest_core(str(ref))
    assert (dst / REJECTS_NAME).read_text() == (ref / REJECTS_NAME).read_text()
    assert not list(dst.rglob("*.tmp*"))
    assert_round_trip(str(dst), tree_expected(src))


def test_rerun_of_complete_build_does_nothing_and_other_settings_are_refused(class_tree, tmp_path):
    dst = tmp_path / "ds"
    build_dataset(str(class_tree), str(dst), shard_max_samples=5, progress=False)
    before = {p: p.stat().st_mtime_ns for p in dst.glob("*.tar")}
    again = build_dataset(str(class_tree), str(dst), shard_max_samples=5, progress=False)
    assert again.built_shards == 0 and again.samples == 18
    assert before == {p: p.stat().st_mtime_ns for p in dst.glob("*.tar")}
    with pytest.raises(BuildError, match="already holds a different dataset"):
        build_dataset(str(class_tree), str(dst), shard_max_samples=6, progress=False)


# ------------------------------------------------------------------------------------------------
# bad arguments: one sentence, non-zero exit, nothing left behind

def _cli(argv, capsys) -> tuple[int, str]:
    from lmim.tools.cli import main
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def test_bad_arguments_fail_cleanly(class_tree, tmp_path, capsys):
    dst = tmp_path / "out" / "ds"
    rc, err = _cli(["shard", str(tmp_path / "nope"), str(dst)], capsys)
    assert rc == 2 and "does not exist" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")
    rc, err = _cli(["shard", str(empty), str(dst)], capsys)
    assert rc == 2 and "holds no images" in err
    rc, err = _cli(["shard", str(class_tree), "nosuchscheme://bucket/ds"], capsys)
    assert rc == 2 and "unknown or unavailable storage scheme 'nosuchscheme'" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, err = _cli(["shard", str(class_tree), str(blocker / "ds")], capsys)
    assert rc == 2 and "is a file, not a folder" in err
    rc, err = _cli(["merge", str(blocker)], capsys)         # a file given as the dataset to merge
    assert rc == 2 and f"DST {blocker} is a file, not a folder" in err and "Errno" not in err
    rc, err = _cli(["merge", str(blocker / "ds")], capsys)
    assert rc == 2 and f"runs through {blocker}, which is a file" in err
    rc, err = _cli(["shard", str(class_tree), str(class_tree)], capsys)
    assert rc == 2 and "same folder" in err
    rc, err = _cli(["shard", str(class_tree), str(class_tree / "ds")], capsys)
    assert rc == 2 and "is inside SRC" in err
    not_a_list = tmp_path / "binary.bin"
    not_a_list.write_bytes(b"\xff\xfe\x00\x81" * 10)
    rc, err = _cli(["shard", str(not_a_list), str(dst)], capsys)
    assert rc == 2 and "neither a tar archive nor a UTF-8 file list" in err
    with pytest.raises(SystemExit) as e:
        _cli(["shard", str(class_tree), str(dst), "--part", "3/2"], capsys)
    assert e.value.code == 2
    assert not (tmp_path / "out").exists()                 # nothing left behind
    assert sorted(p.name for p in class_tree.iterdir()) == ["class_000", "class_001", "class_002"]


def test_unwritable_destination(class_tree, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses new entries even to root
        target = Path("/sys/lmim-test-ds")
        if not Path("/sys").is_dir():
            pytest.skip("needs a non-root user or /sys")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "ds"
    try:
        rc, err = _cli(["shard", str(class_tree), str(target)], capsys)
        assert rc == 2 and "not writable" in err and not target.exists()
    finally:
        if os.geteuid() != 0:
            (tmp_path / "ro").chmod(0o700)


def test_storage_option_parsing():
    so = storage_options_from(["client_kwargs.endpoint_url=http://h:9000", "anon=false", "key=AK"], '{"secret": "S"}')
    assert so == {"secret": "S", "client_kwargs": {"endpoint_url": "http://h:9000"}, "anon": False, "key": "AK"}
    assert storage_options_from(None, None) is None
    assert parse_bytes("256MB") == 256 << 20 and parse_bytes("1g") == 1 << 30 and parse_bytes("1000") == 1000


# ------------------------------------------------------------------------------------------------
# verify

def test_verify_names_the_broken_shard(class_tree, tmp_path, capsys):
    dst = tmp_path / "ds"
    build_dataset(str(class_tree), str(dst), shard_max_samples=5, progress=False)
    rc, err = _cli(["verify", str(dst), "--decode"], capsys)
    assert rc == 0 and "OK, 18 samples in 4 shards" in err

    def broken(mutate) -> tuple[int, str]:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(dst, bad)
        mutate(bad)
        return _cli(["verify", str(bad)], capsys)

    def flip_byte(root):
        with open(root / "shard-000002.tar", "r+b") as f:
            f.seek(700)
            b = f.read(1)
            f.seek(700)
            f.write(bytes([b[0] ^ 0xFF]))

    rc, err = broken(flip_byte)
    assert rc == 1 and "shard shard-000002.tar: checksum does not match" in err
    rc, err = broken(lambda r: os.truncate(r / "shard-000001.tar", 4096))
    assert rc == 1 and "shard shard-000001.tar: size is 4096 bytes" in err
    rc, err = broken(lambda r: (r / "shard-000003.tar").unlink())
    assert rc == 1 and "shard shard-000003.tar: missing" in err

    def bad_index(root):
        p = root / "shard-000000.idx"
        lines = p.read_text().splitlines()
        parts = lines[1].split()
        parts[1] = str(int(parts[1]) + 512)
        lines[1] = " ".join(parts)
        p.write_text("\n".join(lines) + "\n")

    rc, err = broken(bad_index)
    assert rc == 1 and "shard shard-000000.tar: index shard-000000.idx does not match the tar" in err
    rc, err = broken(lambda r: (r / "shard-000000.idx").unlink())
    assert rc == 1 and "shard shard-000000.tar: index shard-000000.idx is missing" in err


def test_a_rerun_rebuilds_missing_and_damaged_shards_byte_identically(class_tree, tmp_path, capsys):
    """What pretraining and `lmim verify` tell the user to do for a broken shard must fix it: the same
    `lmim shard` command finds missing shards, missing indices and shards of the wrong size by one
    listing, `--recheck` also finds damage that keeps the size, and only those shards are rebuilt,
    byte-identical to the first build (the plan is deterministic); the manifest is written again."""
    dst = tmp_path / "ds"
    build_dataset(str(class_tree), str(dst), shard_max_samples=5, progress=False)
    first = {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file()}
    shard = ["shard", str(class_tree), str(dst), "--shard-max-samples", "5", "--workers", "1"]

    def repair(damage, *extra: str) -> str:
        damage()
        rc, err = _cli(["verify", str(dst)], capsys)
        assert rc == 1 and f"run the `lmim shard SRC {dst}` command that built the dataset again with --recheck" in err
        untouched = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.tar")}
        rc, err = _cli([*shard, *extra], capsys)
        assert rc == 0, err
        assert {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file()} == first
        rebuilt = {n for n, t in untouched.items() if (dst / n).stat().st_mtime_ns != t}
        assert _cli(["verify", str(dst)], capsys)[0] == 0
        return err, rebuilt

    err, rebuilt = repair(lambda: (dst / "shard-000001.tar").unlink())
    assert "repaired: rebuilt 1 missing or damaged shards (shard-000001.tar)" in err and not rebuilt
    err, rebuilt = repair(lambda: os.truncate(dst / "shard-000003.tar", 4096))
    assert "(shard-000003.tar)" in err and rebuilt == {"shard-000003.tar"}
    err, rebuilt = repair(lambda: (dst / "shard-000000.idx").unlink())
    assert "(shard-000000.tar)" in err and rebuilt == {"shard-000000.tar"}

    def flip_byte():
        with open(dst / "shard-000002.tar", "r+b") as f:
            f.seek(700)
            b = f.read(1)
            f.seek(700)
            f.write(bytes([b[0] ^ 0xFF]))

    flip_byte()   # the same size: one listing cannot see it, --recheck reads every shard
    rc, err = _cli(shard, capsys)
    assert rc == 0 and "already complete" in err
    flip_byte()   # (back to the original, then damaged again inside `repair`)
    err, rebuilt = repair(flip_byte, "--recheck")
    assert "(shard-000002.tar)" in err and rebuilt == {"shard-000002.tar"}
    # a dataset whose _build/ was removed once it was complete is repaired as well
    shutil.rmtree(dst / "_build")
    first = {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file()}
    err, rebuilt = repair(lambda: (dst / "shard-000001.tar").unlink())
    assert "(shard-000001.tar)" in err and not rebuilt   # the intact shards are kept, not rebuilt too


def test_a_repair_after_build_state_was_removed_rebuilds_only_the_damage_and_parts_still_merge(tmp_path, capsys):
    """`_build/` may go once a dataset is complete. A repair then restores the records of the intact
    shards from the manifest and rejects.jsonl, so it rebuilds only what is missing (not the whole
    dataset), the rewritten manifest and rejects.jsonl are byte-identical, and a `--part` repair can
    still meet the other parts in the merge (it said "not built yet" for their shards before)."""
    src = tmp_path / "src"
    write_photo_jpegs(src, 20, size=SMALL, num_classes=2, seed=3)
    (src / "class_000" / "broken.jpg").write_bytes(b"not a jpeg")
    dst = tmp_path / "ds"
    shard = ["shard", str(src), str(dst), "--shard-max-samples", "4", "--workers", "1"]
    for part in ("0/2", "1/2"):
        assert _cli([*shard, "--part", part], capsys)[0] == 0
    first = {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file()}
    assert b"broken.jpg" in first["rejects.jsonl"]
    shutil.rmtree(dst / "_build")
    (dst / "shard-000002.tar").unlink()      # part 0's
    (dst / "shard-000003.tar").unlink()      # part 1's
    kept = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.tar")}
    rc, err = _cli([*shard, "--part", "0/2"], capsys)
    assert rc == 0 and "rebuilt 1 missing or damaged shards (shard-000002.tar)" in err
    assert "1 shards of other parts are missing or damaged (shard-000003.tar)" in err
    rc, err = _cli([*shard, "--part", "1/2"], capsys)
    assert rc == 0 and "every part is done" in err
    assert {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file()} == first
    assert all((dst / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert _cli(["merge", str(dst)], capsys)[0] == 0
    # the same for a whole build: one shard missing, one shard rebuilt
    shutil.rmtree(dst / "_build")
    (dst / "shard-000001.tar").unlink()
    summary = build_dataset(str(src), str(dst), shard_max_samples=4, progress=False)
    assert (summary.built_shards, summary.rejects) == (1, 1)
    assert {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file()} == first


def test_recheck_also_rebuilds_a_damaged_shard_of_an_unfinished_build(class_tree, tmp_path):
    """Before the manifest exists a resumed build trusts a finished shard at its recorded size;
    with recheck it reads each one and rebuilds the damaged ones, byte-identical."""
    dst = tmp_path / "ds"
    assert not build_dataset(str(class_tree), str(dst), shard_max_samples=5, part=(0, 2), progress=False).complete
    good = (dst / "shard-000002.tar").read_bytes()
    (dst / "shard-000002.tar").write_bytes(good[:700] + bytes([good[700] ^ 0xFF]) + good[701:])
    again = build_dataset(str(class_tree), str(dst), shard_max_samples=5, part=(0, 2), progress=False)
    assert again.built_shards == 0
    again = build_dataset(str(class_tree), str(dst), shard_max_samples=5, part=(0, 2), progress=False, recheck=True)
    assert (again.built_shards, again.resumed_shards) == (1, 1)
    assert (dst / "shard-000002.tar").read_bytes() == good


def test_bench_shard_smoke(capsys):
    """`lmim bench shard` runs end to end and ends with one JSON object (no timing is asserted)."""
    from lmim.tools.cli import main

    assert main(["bench", "shard", "--n", "24", "--reps", "1", "--shard-mb", "0.5", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    assert figures["images"] == 24 and figures["ratio"] > 0 and figures["ratio_vs_tar"] > 0
    assert figures["ratio_vs_tar_no_fsync"] > 0
    assert set(figures["seconds"]) == {"ours", "ours_no_fsync", "shardwriter", "tar"}


def test_a_dst_holding_someone_elses_files_is_refused(class_tree, tmp_path):
    """Writing shard-000000.tar, manifest.json and rejects.jsonl into a folder of other files could
    overwrite files of the same names: a non-empty DST must already be an lmim dataset or build."""
    dst = tmp_path / "notes"
    dst.mkdir()
    (dst / "shard-000000.tar").write_bytes(b"my own tar")
    with pytest.raises(BuildError, match="already holds files that are not an lmim dataset"):
        build_dataset(str(class_tree), str(dst), progress=False)
    assert (dst / "shard-000000.tar").read_bytes() == b"my own tar"
    empty = tmp_path / "empty"
    empty.mkdir()
    build_dataset(str(class_tree), str(empty), progress=False)          # an empty folder is fine
    build_dataset(str(class_tree), str(empty), progress=False)          # and so is rerunning into the result


def test_a_source_without_one_readable_image_writes_no_dataset(tmp_path):
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    (src / "notes.txt").write_text("not an image")
    (src / "broken.jpg").write_bytes(b"not a jpeg either")
    with pytest.raises(BuildError, match="none of the 2 files of SRC could be read as an image"):
        build_dataset(str(tmp_path / "src"), str(tmp_path / "dst"), progress=False)
    assert not (tmp_path / "dst" / "manifest.json").exists()
    assert len((tmp_path / "dst" / "rejects.jsonl").read_text().splitlines()) == 2


def test_a_disk_that_fills_during_a_build_is_exit_6_and_a_rerun_finishes_it(tmp_path):
    """A real write failure, no mock: the build process may write no file larger than 40 kB
    (RLIMIT_FSIZE, SIGXFSZ ignored), so the first shard fails mid-write. The user reads one sentence
    naming the folder that could not be written and saying to run the same command again (no
    training-run advice), nothing half-written is left as a shard, and the rerun completes."""
    write_photo_jpegs(tmp_path / "src", 16, size=(160, 120), num_classes=2, seed=3)
    dst = tmp_path / "dst"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))\n"
            "from lmim.tools.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    args = ["shard", str(tmp_path / "src"), str(dst), "--quiet", "--workers", "1"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 6, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"cannot write {dst}" in lines[0] and "run the same command again" in lines[0]
    assert "resume=auto" not in lines[0] and "checkpoint" not in lines[0]
    assert not list(dst.glob("*.tar")) and not (dst / MANIFEST_NAME).exists()
    again = subprocess.run([sys.executable, "-m", "lmim.tools.cli", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert verify_dataset(str(dst)) == []


def test_a_part_run_on_a_finished_dataset_names_the_other_parts_damage_instead_of_calling_it_complete(
        class_tree, tmp_path, capsys):
    """A --part run rebuilds only its own shards; when another part's shard is gone it must not say the
    dataset is complete with nothing to do. Running that part repairs it."""
    dst = tmp_path / "ds"
    build_dataset(str(class_tree), str(dst), shard_max_samples=5, progress=False)
    (dst / "shard-000001.tar").unlink()                          # shard 1 is part 1/2's (1 % 2)
    shard = ["shard", str(class_tree), str(dst), "--shard-max-samples", "5", "--workers", "1"]
    rc, err = _cli([*shard, "--part", "0/2"], capsys)
    assert rc == 0 and "already complete" not in err
    assert "its own shards" in err and "1 of other parts are missing or damaged (shard-000001.tar)" in err
    assert not (dst / "shard-000001.tar").exists()
    rc, err = _cli([*shard, "--part", "1/2"], capsys)
    assert rc == 0 and "repaired: rebuilt 1" in err
    assert verify_dataset(str(dst)) == []


def test_bench_shard_with_nothing_readable_in_src_is_one_sentence(tmp_path, capsys):
    """It printed the shard builder's BuildError traceback (exit 1), pointing at a rejects.jsonl in a
    temporary folder deleted a moment later."""
    from lmim.tools.cli import main

    empty, junk = tmp_path / "empty", tmp_path / "junk"
    empty.mkdir()
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not a jpeg")
    assert main(["bench", "shard", "--src", str(empty), "--reps", "1"]) == 2
    assert "holds no files; give a folder of images" in capsys.readouterr().err
    assert main(["bench", "shard", "--src", str(junk), "--reps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot use --src" in err and "none of the 1 files of SRC could be read as an image" in err
    assert "Traceback" not in err and "rejects.jsonl" not in err


def test_a_repair_keeps_listing_rejects_once(tmp_path):
    """A path listed twice is rejected when SRC is listed (the plan keeps it), under the same source
    as the copy kept: restoring shard records from rejects.jsonl must not also file it under that
    shard, or each repair after `_build/` was removed added it again (1, 2, 3 ... lines)."""
    paths = write_photo_jpegs(tmp_path / "imgs", 6, size=SMALL, seed=5)
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p}\n" for p in paths) + f"{paths[1]}\n", encoding="utf-8")
    dst = tmp_path / "ds"
    build_dataset(str(lst), str(dst), shard_max_samples=2, progress=False)
    first = {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file()}
    assert b"listed twice" in first[REJECTS_NAME] and len(first[REJECTS_NAME].splitlines()) == 1
    for _ in range(2):
        shutil.rmtree(dst / "_build")
        (dst / "shard-000000.tar").unlink()
        assert build_dataset(str(lst), str(dst), shard_max_samples=2, progress=False).built_shards == 1
        assert {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file()} == first
