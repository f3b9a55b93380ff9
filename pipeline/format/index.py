"""The DALI webdataset index (`.idx`) beside each shard: its one writer and its one parser.

Version 1.2, as DALI's `wds2idx` writes it: a header `v1.2 N`, then one line per sample holding,
for each of the sample's tar members in stored order, `ext offset size name` (`offset`: where the
member's data starts in the tar). An index may list any subset of a shard's samples in any order,
which is how the loader makes DALI read the plan's order (per-epoch indices).

The builder writes an index while it writes the tar (`component`, `index_text`), the loader
parses it (`parse_index`) and writes per-epoch ones (`index_text`), and `lmim verify` derives the
expected lines from the tar's members (`lines_of_members`).
"""
from __future__ import annotations

from typing import Iterable, Sequence

from lmim.pipeline.errors import ShardError
from lmim.pipeline.format.keys import split_member

INDEX_VERSION = "v1.2"

# One sample as an index line describes it: {ext: (offset, size, member name)}, in stored order.
Components = dict[str, tuple[int, int, str]]


def component(ext: str, offset: int, size: int, name: str) -> str:
    """One member's part of an index line."""
    return f"{ext} {offset} {size} {name}"


def sample_line(components: Components) -> str:
    """The index line of one sample."""
    return " ".join(component(ext, off, size, name) for ext, (off, size, name) in components.items())


def index_text(lines: Sequence[str]) -> str:
    """A whole index listing `lines` (one per sample), in this order."""
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def lines_of_members(members: Iterable[tuple[str, int, int]]) -> list[str]:
    """The index lines `wds2idx` would write for a tar's (name, data offset, size) members, in tar order.

    Consecutive members with the same key make one sample, as readers group them.
    """
    lines, last = [], None
    for name, off, size in members:
        key, ext = split_member(name)
        comp = component(ext, off, size, name)
        if key == last:
            lines[-1] += " " + comp
        else:
            lines.append(comp)
            last = key
    return lines


def parse_index(text: str, shard: str, expected_samples: int, file_size: int) -> list[Components]:
    """Parse and validate an index against its shard: one {ext: (offset, size, name)} per sample.

    Raises ShardError (naming `shard`) for a missing header, a sample count other than the
    header's or the manifest's (`expected_samples`), or a member that ends past `file_size`.
    """
    lines = text.splitlines()
    if not lines or not lines[0].startswith("v1."):
        raise ShardError(shard, "bad index: the .idx file has no 'v1.x N' header; rebuild it with `lmim shard SRC DST --recheck`")
    try:
        declared = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise ShardError(shard, f"bad index: unreadable header {lines[0]!r}") from None
    rows = [ln for ln in lines[1:] if ln.strip()]
    if declared != len(rows) or len(rows) != expected_samples:
        raise ShardError(shard, f"bad index: it lists {len(rows)} samples (header says {declared}), "
                                f"the manifest says {expected_samples}")
    out = []
    for n, row in enumerate(rows):
        parts = row.split()
        if len(parts) % 4:
            raise ShardError(shard, f"bad index: line {n + 2} is not 'ext offset size name' groups")
        comps: Components = {}
        for j in range(0, len(parts), 4):
            ext, off, size, name = parts[j], parts[j + 1], parts[j + 2], parts[j + 3]
            try:
                off_i, size_i = int(off), int(size)
            except ValueError:
                raise ShardError(shard, f"bad index: line {n + 2} has a non-numeric offset or size") from None
            if off_i < 0 or size_i < 0 or off_i + size_i > file_size:
                key = split_member(name)[0]
                raise ShardError(shard, f"truncated or bad index: sample {key!r} ({ext}) ends at byte "
                                        f"{off_i + size_i} but the shard has {file_size} bytes")
            comps[ext] = (off_i, size_i, name)
        out.append(comps)
    return out
