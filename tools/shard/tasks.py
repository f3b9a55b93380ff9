"""Building one shard: read its inputs, check them, write the tar and index, put them in place.

A `ShardTask` says everything a worker process needs for one shard; the `TaskContext` it carries
is what all shards of one run share. Writing (CPU-bound) and putting in place (I/O-bound: fsync
and rename, or upload) are separate steps so one process can overlap them (`run_shards`).
A shard's contents are a pure function of its task, so any process may build any shard.
"""
from __future__ import annotations

import json
import os
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from lmim.pipeline.format.manifest import ShardInfo
from lmim.pipeline.storage import Store
from lmim.tools.shard.config import ImageOptions
from lmim.tools.shard.images import Prepared, Reject, prepare_image
from lmim.tools.shard.progress import report
from lmim.tools.shard.sources import SourceItem, iter_items
from lmim.tools.shard.state import SIDECAR_DIR, ShardRecord
from lmim.tools.shard.writer import TarShardWriter

_HOST = socket.gethostname()


def scratch_suffix() -> str:
    """The end of a temporary shard file's name: its writer's host and process, so that a later run of
    the same part removes only the leftovers of writers that are gone (`build._scratch_dir`)."""
    return f".tmp-{_HOST}-{os.getpid()}"


# A temporary shard is written in minutes; one this old is a leftover whatever its name says.
_STALE_S = 6 * 3600


def scratch_writer_gone(fname: str, *, age_s: float = 0.0) -> bool:
    """Whether a temporary file's writer has ended (a killed run's leftover, to remove): a process of
    this host that is gone, this very process (a pid reused after a restart: it has written nothing
    yet), a name from before host and pid were recorded, or a file older than hours. False for a live
    writer (the same part run twice at once) or another host's recent one."""
    tail = fname.rpartition(".tmp-")[2]
    host, sep, pid = tail.rpartition("-")
    if age_s > _STALE_S or (not sep and tail.isdigit()):   # stale, or an older lmim's `.tmp-<pid>`
        return True
    if not sep or host != _HOST or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # alive, another user's
        return False
    return False

__all__ = ["TaskContext", "ShardTask", "Written", "write_shard", "finalize_shard", "build_shard", "run_shards"]

_REPORT_EVERY = 16  # images between progress reports (one lock round trip each)


@dataclass(frozen=True)
class TaskContext:
    """What every shard of one run shares."""

    root: str                                   # DST (URL or local path)
    storage_options: dict[str, Any]             # fsspec options for DST
    source_options: dict[str, Any] | None       # fsspec options for SRC
    tmp_dir: str                                # local folder for shards being written
    fingerprint: str                            # the plan's
    image: ImageOptions
    fsync: bool                                 # flush local shards to disk before moving them in place


@dataclass(frozen=True)
class ShardTask:
    number: int                 # in the plan
    name: str                   # file name without extension (prefix-000042)
    items: list[SourceItem]     # inputs, in stored order
    keys: list[str]             # sample key per input
    context: TaskContext


@dataclass
class Written:
    """A shard written to local temporary files, not yet in place."""

    record: ShardRecord
    tmp_tar: str | None         # None when every input was rejected: no shard at all
    index_text: str | None


def _sample_json(item: SourceItem, prepared: Prepared, source_bytes: int) -> bytes:
    meta = {"source": item.id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"),
            "width": prepared.info.width, "height": prepared.info.height,
            "format": prepared.info.format, "mode": prepared.info.mode, "source_bytes": source_bytes}
    if item.label is not None:
        meta["label"] = item.label
    if prepared.converted:
        meta["converted"] = prepared.converted
    return json.dumps(meta, ensure_ascii=True, separators=(",", ":")).encode()


def _unreadable(e: BaseException) -> str:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    return f"unreadable ({reason})"


def write_shard(task: ShardTask) -> Written:
    """Read, check and write one shard to local temporary files (the CPU-bound part).

    One bad input becomes a reject; only destination errors propagate.
    """
    ctx, opts = task.context, task.context.image
    os.makedirs(ctx.tmp_dir, exist_ok=True)
    # per-process temporary names: a straggler from a killed run can never rename our file
    tmp_tar = os.path.join(ctx.tmp_dir, f"{task.name}.tar{scratch_suffix()}")
    writer = TarShardWriter(tmp_tar)
    rejects: list[dict[str, str]] = []
    read_bytes = pending_n = pending_b = 0
    try:
        keys = {id(it): k for it, k in zip(task.items, task.keys)}
        for item, data in iter_items(task.items, ctx.source_options):
            if isinstance(data, BaseException):  # unreadable file: a reject, never a failed build
                rejects.append({"source": item.id, "reason": _unreadable(data)})
                continue
            read_bytes += len(data)
            pending_n += 1
            pending_b += len(data)
            try:
                prepared = prepare_image(data, max_side=opts.max_side, quality=opts.quality,
                                         max_pixels=opts.max_pixels, full_decode=opts.full_decode)
            except Reject as e:
                rejects.append({"source": item.id, "reason": str(e)})
            except Exception as e:  # a decoder bug on one file must not stop the build either
                rejects.append({"source": item.id, "reason": f"cannot be processed ({type(e).__name__}: {e})"})
            else:
                members = [(prepared.ext, prepared.data)]
                if item.label is not None:
                    members.append(("cls", str(item.label).encode()))
                members.append(("json", _sample_json(item, prepared, len(data))))
                writer.add(keys[id(item)], members)
            if pending_n >= _REPORT_EVERY:
                report(pending_n, pending_b)
                pending_n = pending_b = 0
        report(pending_n, pending_b)
        result = writer.close()
    except BaseException:
        writer.abort()
        raise
    record = ShardRecord(shard=task.number, fingerprint=ctx.fingerprint, info=None, rejects=rejects,
                         images_read=len(task.items), bytes_read=read_bytes)
    if not result.samples:
        os.remove(tmp_tar)  # every input of this shard was rejected: no shard at all
        return Written(record, None, None)
    record.info = ShardInfo(name=f"{task.name}.tar", index=f"{task.name}.idx", samples=result.samples,
                            bytes=result.bytes, checksum=result.checksum)
    return Written(record, tmp_tar, result.index_text)


def finalize_shard(task: ShardTask, written: Written) -> ShardRecord:
    """Put a written shard in place (the I/O-bound part): index, then tar, then the sidecar that
    marks it complete. Local: fsync + rename; remote: upload (a PUT is visible only when complete)."""
    ctx = task.context
    dest = Store(ctx.root, ctx.storage_options)
    if written.tmp_tar is not None:
        idx_tmp = os.path.join(ctx.tmp_dir, f"{task.name}.idx{scratch_suffix()}")
        with open(idx_tmp, "w", encoding="utf-8") as f:
            f.write(written.index_text)
        dest.put_file(idx_tmp, f"{task.name}.idx", fsync=ctx.fsync)
        dest.put_file(written.tmp_tar, f"{task.name}.tar", fsync=ctx.fsync)
    dest.write_bytes(f"{SIDECAR_DIR}/{task.name}.json", written.record.to_json(), fsync=ctx.fsync)
    return written.record


def build_shard(task: ShardTask) -> ShardRecord:
    """Write and finalize one shard; returns its record."""
    return finalize_shard(task, write_shard(task))


class _ShardLoop:
    """One process's share of the work: it writes shard after shard while a background thread puts
    the previous one in place (fsync/rename or upload), so disk flushes and uploads overlap the
    CPU work. At most two finished shards wait for that thread (bounded temporary space)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmim-finalize")
        self.pending: list[Future[ShardRecord]] = []
        self.results: list[ShardRecord] = []

    def run(self, task: ShardTask) -> None:
        written = write_shard(task)
        while len(self.pending) >= 2:
            self.results.append(self.pending.pop(0).result())
        self.pending.append(self.pool.submit(finalize_shard, task, written))

    def finish(self) -> list[ShardRecord]:
        try:
            for fut in self.pending:
                self.results.append(fut.result())
        finally:
            self.pool.shutdown(wait=True)
        return self.results


def run_shards(tasks: Sequence[ShardTask], next_index: Callable[[], int]) -> list[ShardRecord]:
    """Build `tasks[next_index()]` until it hands out an index past the end: every task, counting up
    in one process, or the ones this process wins from a counter shared with others."""
    loop = _ShardLoop()
    try:
        while (i := next_index()) < len(tasks):
            loop.run(tasks[i])
    finally:
        results = loop.finish()
    return results
