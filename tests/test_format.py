"""lmim.pipeline.format: the writer, the reader and `lmim verify` agree on one format.

- The index the builder writes while it writes a tar is the one `lmim verify` derives from the
  tar's members, and the loader's parser reads it back to the same members.
- A member name splits into key and extension at the first dot of its base name, everywhere.
"""
from __future__ import annotations

import tarfile

import pytest

from lmim.pipeline.errors import ShardError
from lmim.pipeline.format.index import index_text, lines_of_members, parse_index, sample_line
from lmim.pipeline.format.keys import is_readable_key, make_key, member_name, split_member
from lmim.pipeline.shards import write_index
from lmim.tools.shard.writer import TarShardWriter


def test_member_names_split_at_the_first_dot_of_the_base_name():
    assert split_member(member_name("cat-0a1b", "json")) == ("cat-0a1b", "json")
    assert split_member("a.b/c.d.e") == ("a.b/c", "d.e")
    assert split_member("noext") == ("noext", "")
    assert is_readable_key(make_key("photos/holiday 2024/img.001.JPG"))
    assert not is_readable_key("a b") and not is_readable_key("x/a.b") and is_readable_key("x.y/a")


def test_the_written_index_is_the_one_verify_derives_and_the_loader_parses(tmp_path):
    path = tmp_path / "s.tar"
    writer = TarShardWriter(str(path))
    samples = {"k1": [("jpg", b"\xff\xd8" + b"x" * 700), ("json", b'{"width":1,"height":1}'), ("cls", b"3")],
               "k2": [("png", b"p" * 10), ("json", b"{}")]}
    for key, members in samples.items():
        writer.add(key, members)
    result = writer.close()
    with tarfile.open(path) as tf:
        members = [(m.name, m.offset_data, m.size) for m in tf]
    lines = lines_of_members(members)
    assert result.index_text == index_text(lines)
    parsed = parse_index(result.index_text, "s.tar", expected_samples=2, file_size=result.bytes)
    assert [sample_line(c) for c in parsed] == lines
    assert list(parsed[0]) == ["jpg", "json", "cls"] and parsed[1]["png"][1] == 10
    # the loader's per-epoch index (any subset, any order) is the same text format
    write_index(str(tmp_path / "e.idx"), lines[::-1])
    assert (tmp_path / "e.idx").read_text() == index_text(lines[::-1])


@pytest.mark.parametrize("text,needle", [("", "no 'v1.x N' header"), ("v1.2 2\njpg 0 1 a.jpg\n", "lists 1 samples"),
                                         ("v1.2 1\njpg 0 99 a.jpg\n", "'a' (jpg) ends at byte 99")])
def test_a_bad_index_is_a_shard_error_naming_the_shard(text, needle):
    with pytest.raises(ShardError, match="shard s.tar") as err:
        parse_index(text, "s.tar", expected_samples=1, file_size=50)
    assert needle in str(err.value)


def _entry(**change):
    entry = {"name": "shard-000000.tar", "index": "shard-000000.idx", "samples": 4, "bytes": 1024,
             "checksum": "xxh3_128:00ff"}
    entry.update(change)
    return {k: v for k, v in entry.items() if v is not None}


def _manifest(**change):
    data = {"format": "lmim-webdataset", "version": 2, "shards": [_entry()], "classes": ["a", "b"], "build": {}}
    data.update(change)
    return data


@pytest.mark.parametrize("data, needle", [
    ([1, 2, 3], "holds a JSON list"),
    (None, "holds a JSON NoneType"),
    (_manifest(shards=None), "no list of `shards`"),
    (_manifest(shards=[7]), "not an object"),
    (_manifest(shards=[_entry(checksum=None)]), "missing fields ['checksum']"),
    (_manifest(shards=[_entry(extra=1)]), "unknown fields ['extra']"),
    (_manifest(shards=[_entry(samples="4")]), "`samples` is '4', not a count"),
    (_manifest(shards=[_entry(bytes=-1)]), "`bytes` is -1, not a count"),
    (_manifest(shards=[_entry(checksum="md5:abc")]), "not one this lmim can check"),
    (_manifest(shards=[_entry(name="../other/shard-000000.tar")]), "points outside the dataset"),
    (_manifest(shards=[_entry(index="/etc/passwd")]), "points outside the dataset"),
    (_manifest(classes="ab"), "`classes` is not a list of names"),
    (_manifest(version="2"), "`version` is '2', not a number"),
])
def test_a_manifest_of_the_wrong_shape_is_not_a_dataset_naming_what_is_wrong(data, needle):
    """Valid JSON that is not an lmim manifest (edited by hand, cut, from elsewhere) is refused with one
    sentence saying what is wrong, never a Python error from deeper in (AttributeError, TypeError)."""
    import json

    from lmim.pipeline.errors import NotADataset
    from lmim.pipeline.format.manifest import Manifest

    if isinstance(data, dict) and data.get("format") is not None:
        data["format"] = Manifest(shards=[]).format
    with pytest.raises(NotADataset) as exc:
        Manifest.from_json(json.dumps(data))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_a_wrong_shape_manifest_reaches_the_user_as_one_sentence(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text("[1, 2, 3]")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "lmim.tools.cli", "verify", str(tmp_path / "ds")], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "holds a JSON list, not an lmim manifest" in out.stderr


def test_a_sample_size_is_a_positive_int32_or_a_reason_in_words():
    from lmim.pipeline.format.sample_meta import image_size

    assert image_size(b'{"width": 500, "height": 375, "mode": "RGB"}') == (500, 375)
    assert image_size(b'{"width": 28.0, "height": 28}') == (28, 28)
    assert image_size(b'{"width": "64", "height": "48"}') == (64, 48)   # quoted, as some writers do
    for bad, why in [(b'{"width": 3000000000, "height": 2}', "outside 1..2147483647"),
                     (b'{"width": 1e999, "height": 2}', "width is not an integer"),
                     (b'{"width": 0, "height": 2}', "outside"), (b'{"width": 2, "height": true}', "height is not"),
                     (b'{"width": "2x8", "height": 2}', "not an integer"), (b'{"height": 2}', "without integer"),
                     (b"[" * 5000, "without integer"), (b"\xff", "without integer")]:
        with pytest.raises(ValueError, match=why):
            image_size(bad)
