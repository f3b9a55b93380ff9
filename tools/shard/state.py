"""A build's own state in DST, which is what makes it resumable and lets `--part i/N` runs meet.

    _build/plan.json                 the plan's fingerprint, shard count, classes, listing rejects
    _build/shards/shard-000000.json  a shard's record (sidecar), written after the shard: it is complete
    _build/tmp/                      local DST only: shards being written (temporary names)

Every file here is JSON that a newer lmim must keep reading: a build killed by one version is
finished by the next.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from typing import Any

from lmim.pipeline.format.manifest import MANIFEST_NAME, REJECTS_NAME, Manifest, ShardInfo
from lmim.pipeline.storage import Store
from lmim.tools.shard.destination import check_not_foreign, scrub_url
from lmim.tools.shard.errors import BuildError, reach_error
from lmim.tools.shard.plan import Plan

__all__ = ["BUILD_DIR", "PLAN_NAME", "SIDECAR_DIR", "TMP_DIR", "ShardRecord", "shard_name", "read_json",
           "claim", "restore_plan", "restore_records", "completed_records", "fingerprint_records"]

BUILD_DIR = "_build"
PLAN_NAME = f"{BUILD_DIR}/plan.json"
SIDECAR_DIR = f"{BUILD_DIR}/shards"
TMP_DIR = f"{BUILD_DIR}/tmp"


def shard_name(prefix: str, n: int) -> str:
    return f"{prefix}-{n:06d}"


@dataclass
class ShardRecord:
    """One built shard, as its sidecar stores it (and as a worker process hands it back)."""

    shard: int                      # its number in the plan
    fingerprint: str                # the plan it was built for
    info: ShardInfo | None          # None when every input was rejected: no shard file at all
    rejects: list[dict[str, str]]   # {"source", "reason"} per input left out
    images_read: int                # inputs processed
    bytes_read: int                 # source bytes read

    def to_dict(self) -> dict[str, Any]:
        # field order is the sidecar's key order
        return {"shard": self.shard, "fingerprint": self.fingerprint,
                "info": asdict(self.info) if self.info is not None else None, "rejects": self.rejects,
                "images_read": self.images_read, "bytes_read": self.bytes_read}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardRecord":
        info = d.get("info")
        return cls(shard=int(d["shard"]), fingerprint=d["fingerprint"],
                   info=ShardInfo.from_dict(info) if info else None, rejects=list(d["rejects"]),
                   images_read=int(d["images_read"]), bytes_read=int(d["bytes_read"]))

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


def read_json(dest: Store, name: str) -> dict | None:
    """A JSON file of DST; None when it is absent, torn or foreign (it is then rewritten)."""
    try:
        return json.loads(dest.read_bytes(name))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None


def claim(dest: Store, plan: Plan, plan_doc: dict[str, Any]) -> Manifest | None:
    """Check DST holds nothing foreign, write the plan (`plan_doc`) unless this build's is there;
    return the manifest when this very dataset is already complete."""
    try:
        manifest_raw = read_json(dest, MANIFEST_NAME)
        existing_plan = read_json(dest, PLAN_NAME)
    except Exception as e:
        raise reach_error("DST", scrub_url(dest.url), e) from None
    if manifest_raw is not None:
        if manifest_raw.get("build", {}).get("fingerprint") == plan.fingerprint:
            return Manifest.from_json(json.dumps(manifest_raw))
        raise BuildError(f"DST {scrub_url(dest.url)} already holds a different dataset (its manifest was built "
                         f"from other sources or settings); choose an empty DST or delete it first")
    if existing_plan is not None and existing_plan.get("fingerprint") != plan.fingerprint:
        raise BuildError(f"DST {scrub_url(dest.url)} holds an unfinished build of other sources or settings; "
                         f"re-run that build, or choose an empty DST")
    if existing_plan is None:
        if not dest.local:  # a local DST was checked before the build began
            try:
                check_not_foreign(dest)
            except BuildError:
                raise
            except Exception as e:
                raise reach_error("DST", scrub_url(dest.url), e) from None
        _write_plan(dest, plan_doc)
    return None


def restore_plan(dest: Store, plan_doc: dict[str, Any]) -> None:
    """Write the plan of a finished dataset again unless it is there: repairing a shard ends with a
    merge, which reads it (a user may have removed `_build/` once the dataset was complete)."""
    existing = read_json(dest, PLAN_NAME)
    if existing is None or existing.get("fingerprint") != plan_doc["fingerprint"]:
        _write_plan(dest, plan_doc)


def restore_records(dest: Store, manifest: Manifest, plan: Plan, item_ids: list[str], prefix: str,
                    skip: set[int], listing_rejects: list[dict[str, str]]) -> int:
    """Write the sidecar again of every shard of a finished dataset that has lost it (a user may
    remove `_build/` once the dataset is complete), except those in `skip` (found damaged: they are
    rebuilt). Without them a repair would rebuild every shard, and a `--part` repair could never
    merge, since the merge gathers every part's records. Returns how many were written.

    A record is rebuilt from the manifest (the shard's info) and `rejects.jsonl` (its rejected
    inputs, found by the plan: each input belongs to one shard); `item_ids` are the corpus items' ids
    in plan index order. `listing_rejects` (the plan's: rejected when SRC was listed, e.g. a path
    listed twice, whose source is that of the copy kept) belong to no shard: the merge adds them
    from the plan, so they are left out here. Shards whose every input was rejected have no
    manifest entry and get a record with no info, as the build wrote.
    """
    have = fingerprint_records(dest, plan.fingerprint)
    lost = [n for n in range(len(plan.shards)) if n not in have and n not in skip]
    if not lost:
        return 0
    info_by_name = {s.name: s for s in manifest.shards}
    shard_of = {item_ids[i]: n for n, members in enumerate(plan.shards) for i in members}
    at_listing = {(r.get("source"), r.get("reason")) for r in listing_rejects}
    rejects: dict[int, list[dict[str, str]]] = {}
    for reject in _read_rejects(dest):
        if (reject.get("source"), reject.get("reason")) in at_listing:
            continue
        n = shard_of.get(reject.get("source"))
        if n is not None:
            rejects.setdefault(n, []).append(reject)
    for n in lost:
        info = info_by_name.get(f"{shard_name(prefix, n)}.tar")
        record = ShardRecord(shard=n, fingerprint=plan.fingerprint, info=info, rejects=rejects.get(n, []),
                             images_read=0, bytes_read=0)
        dest.write_bytes(f"{SIDECAR_DIR}/{shard_name(prefix, n)}.json", record.to_json())
    return len(lost)


def _read_rejects(dest: Store) -> list[dict[str, Any]]:
    """The records of a finished dataset's rejects.jsonl ([] when it is gone: the rewritten one then
    lists only the inputs rejected again)."""
    try:
        text = dest.read_bytes(REJECTS_NAME).decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _write_plan(dest: Store, plan_doc: dict[str, Any]) -> None:
    # a refused first write leaves nothing behind: a local DST this build created is removed again
    existed = dest.local and dest.exists()
    try:
        dest.write_bytes(PLAN_NAME, json.dumps(plan_doc, indent=1).encode())
    except PermissionError:
        if dest.local and not existed:
            shutil.rmtree(dest.path, ignore_errors=True)
        raise BuildError(f"DST {scrub_url(dest.url)} is not writable; choose another DST or fix its "
                         f"permissions") from None
    except Exception as e:
        if dest.local and not existed:
            shutil.rmtree(dest.path, ignore_errors=True)
        reason = f"{type(e).__name__}: {e}"
        if isinstance(e, FileNotFoundError) and not dest.local and "bucket" in str(e).lower():
            bucket = scrub_url(dest.url).split("://", 1)[1].split("/", 1)[0]
            raise BuildError(f"cannot write to DST {scrub_url(dest.url)}: its bucket {bucket!r} does not exist "
                             f"({reason}); create the bucket or check its name") from None
        raise BuildError(f"cannot write to DST {scrub_url(dest.url)} ({reason})") from None


def completed_records(dest: Store, plan: Plan, prefix: str) -> dict[int, ShardRecord]:
    """Records of the shards already complete: this plan's fingerprint, the expected sidecar name,
    and the shard and its index in place at the recorded size (a resume never trusts less)."""
    out = {}
    for fname in dest.list(SIDECAR_DIR):
        if not fname.endswith(".json"):
            continue
        side = read_json(dest, f"{SIDECAR_DIR}/{fname}")
        if not side or side.get("fingerprint") != plan.fingerprint:
            continue
        n = int(side["shard"])
        if fname != f"{shard_name(prefix, n)}.json" or n >= len(plan.shards):
            continue
        record = ShardRecord.from_dict(side)
        if record.info is not None:
            try:
                if dest.size(record.info.name) != record.info.bytes or not dest.exists(record.info.index):
                    continue
            except FileNotFoundError:
                continue
        out[n] = record
    return out


def fingerprint_records(dest: Store, fingerprint: str) -> dict[int, ShardRecord]:
    """Every record of the plan `fingerprint`, by shard number (what a merge gathers from all parts)."""
    out = {}
    for fname in dest.list(SIDECAR_DIR):
        if fname.endswith(".json"):
            side = read_json(dest, f"{SIDECAR_DIR}/{fname}")
            if side and side.get("fingerprint") == fingerprint:
                out[int(side["shard"])] = ShardRecord.from_dict(side)
    return out
