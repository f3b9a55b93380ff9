"""The last step of every build: `manifest.json` and `rejects.jsonl` from the plan and the shard records.

A whole build merges at its end; of a `--part i/N` build, the part that finds every shard
complete when it ends merges (`lmim merge DST` does it again by hand). The manifest is written
last: its presence means the dataset is complete.
"""
from __future__ import annotations

import json
import os
import shutil

from lmim.pipeline.format.manifest import MANIFEST_NAME, REJECTS_NAME, Manifest
from lmim.pipeline.storage import Store
from lmim.tools.shard.destination import open_destination, scrub_url
from lmim.tools.shard.errors import BuildError, reach_error
from lmim.tools.shard.repair import damaged_shards
from lmim.tools.shard.state import PLAN_NAME, TMP_DIR, fingerprint_records, read_json, shard_name

__all__ = ["merge_parts", "merge"]


def merge_parts(dst: str, *, storage_options: dict | None = None) -> Manifest:
    """Write `manifest.json` and `rejects.jsonl` once every planned shard of every part is complete.

    Raises BuildError naming the missing shards (and the parts that own them) otherwise.
    """
    return merge(open_destination(dst, storage_options))


def merge(dest: Store, *, only_if_complete: bool = False) -> Manifest | None:
    """`merge_parts` on an open DST (the builder's own, at the end of a whole build or of a part).

    With `only_if_complete`, shards still missing mean None (other parts are building) instead of an error.
    """
    try:  # the first read of DST by `lmim merge`: a store that does not answer or refuses an option
        plan_doc = read_json(dest, PLAN_NAME)
    except Exception as e:
        raise reach_error("DST", scrub_url(dest.url), e) from None
    if plan_doc is None:
        if only_if_complete:
            return None
        if read_json(dest, MANIFEST_NAME) is not None:
            return Manifest.from_json(dest.read_bytes(MANIFEST_NAME).decode())
        raise BuildError(f"{scrub_url(dest.url)} holds no lmim build (no {PLAN_NAME}); run `lmim shard SRC DST` first")
    prefix = plan_doc["prefix"]
    n_planned = int(plan_doc["planned_shards"])
    records = fingerprint_records(dest, plan_doc["fingerprint"])
    missing = [n for n in range(n_planned) if n not in records]
    if missing and only_if_complete:
        return None
    if missing:
        names = ", ".join(shard_name(prefix, n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise BuildError(f"{len(missing)} of {n_planned} shards are not built yet ({names}); finish every "
                         f"`lmim shard --part i/N` run, then merge again")
    shards = [records[n].info for n in range(n_planned) if records[n].info is not None]
    # The records say a shard was built; one listing says whether it is still there at its size (a
    # manifest over a deleted or cut shard would only fail later, in a trainer).
    damaged = damaged_shards(dest, shards, plan_doc.get("classes"), recheck=False)
    if damaged:
        names = ", ".join(damaged[:5]) + (" ..." if len(damaged) > 5 else "")
        raise BuildError(f"{len(damaged)} shard(s) recorded as built are missing or not their recorded size in "
                         f"{scrub_url(dest.url)} ({names}); run the same `lmim shard` command (each --part that "
                         f"built them) again to rebuild them, then merge")
    rejects = list(plan_doc.get("listing_rejects", []))
    for n in range(n_planned):
        rejects.extend(records[n].rejects)
    rejects.sort(key=lambda r: r["source"])
    build = {k: v for k, v in plan_doc.items() if k not in ("classes", "listing_rejects")}
    build["rejects"] = len(rejects)
    build["rejects_file"] = REJECTS_NAME
    manifest = Manifest(shards=shards, classes=plan_doc.get("classes"), build=build)
    dest.write_bytes(REJECTS_NAME, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode())
    if manifest.total_samples == 0:  # a dataset of nothing would only fail later, in a trainer
        raise BuildError(f"none of the {len(rejects)} files of SRC could be read as an image (each is listed with "
                         f"its reason in {scrub_url(dest.url)}/{REJECTS_NAME}); no dataset was written")
    dest.write_bytes(MANIFEST_NAME, manifest.to_json().encode())  # last: its presence means complete
    if dest.local:
        shutil.rmtree(os.path.join(dest.path, TMP_DIR), ignore_errors=True)
    return manifest
