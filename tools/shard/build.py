"""`build_dataset`: a raw corpus -> shards + DALI indices + manifest, resumable, in parallel, in parts.

Layout of a dataset root while and after it is built:
    shard-000000.tar, shard-000000.idx, ...   complete shards only (moved/uploaded when finished)
    _build/plan.json                           fingerprint, shard count, classes, listing rejects
    _build/shards/shard-000000.json            sidecar: written after its shard, marks it complete
    _build/tmp/                                local DST only: shards being written (temporary names)
    rejects.jsonl, manifest.json               written last, by the merge step
A shard whose sidecar exists (with the plan's fingerprint) is never rebuilt, so re-running the
same command after a kill finishes the job; since shard contents are a pure function of the plan,
the result is byte-identical to an uninterrupted build.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

from lmim.pipeline.forking import fork_safe_gc
from lmim.pipeline.manifest import MANIFEST_NAME, REJECTS_NAME, Manifest, ShardInfo
from lmim.tools.shard.images import DEFAULT_MAX_PIXELS, Reject, prepare_image
from lmim.tools.shard.plan import Plan, make_plan
from lmim.tools.shard.sources import Corpus, SourceError, SourceItem, iter_items, open_corpus
from lmim.tools.shard.writer import Destination, TarShardWriter

BUILD_DIR = "_build"
PLAN_NAME = f"{BUILD_DIR}/plan.json"
SIDECAR_DIR = f"{BUILD_DIR}/shards"
TMP_DIR = f"{BUILD_DIR}/tmp"
DEFAULT_PREFIX = "shard"
TOOL_VERSION = 1


class BuildError(ValueError):
    """A problem with the arguments or the destination; the message is one sentence for the user."""


@dataclass
class BuildSummary:
    samples: int            # samples in the dataset (all parts built so far, for a part build)
    shards: int             # non-empty shards in the dataset
    classes: int            # number of classes (0 when unlabelled)
    rejects: int            # inputs skipped (listed in rejects.jsonl)
    seconds: float          # wall time of this run
    bytes: int              # bytes of all shards
    built_shards: int = 0   # shards written by this run
    resumed_shards: int = 0  # shards found complete and skipped
    images_read: int = 0    # images processed by this run
    bytes_read: int = 0     # source bytes read by this run
    complete: bool = True   # False for a part build until `lmim merge` has run

    @property
    def images_per_s(self) -> float:
        return self.images_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0


def shard_name(prefix: str, n: int) -> str:
    return f"{prefix}-{n:06d}"


# ---------------------------------------------------------------------------------------------
# worker side

_COUNTERS: tuple[Any, Any] | None = None  # shared (images, bytes) counters for the progress bar


def _init_worker(counters) -> None:
    global _COUNTERS
    _COUNTERS = counters


def _report(images: int, nbytes: int) -> None:
    if _COUNTERS is not None:
        with _COUNTERS[0].get_lock():
            _COUNTERS[0].value += images
        with _COUNTERS[1].get_lock():
            _COUNTERS[1].value += nbytes


def _sample_json(item: SourceItem, prepared, source_bytes: int) -> bytes:
    meta = {"source": item.id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"),
            "width": prepared.info.width, "height": prepared.info.height,
            "format": prepared.info.format, "mode": prepared.info.mode, "source_bytes": source_bytes}
    if item.label is not None:
        meta["label"] = item.label
    if prepared.converted:
        meta["converted"] = prepared.converted
    return json.dumps(meta, ensure_ascii=True, separators=(",", ":")).encode()


def write_shard(task: dict) -> tuple[dict, str | None, str | None]:
    """Read, check and write one shard to local temporary files (the CPU-bound part).

    Returns (sidecar without "info", temporary tar path or None when every input was rejected,
    index text). One bad input becomes a reject; only destination errors propagate.
    """
    name = task["name"]
    tmp_dir = task["tmp_dir"]
    os.makedirs(tmp_dir, exist_ok=True)
    # per-process temporary names: a straggler from a killed run can never rename our file
    tmp_tar = os.path.join(tmp_dir, f"{name}.tar.tmp-{os.getpid()}")
    writer = TarShardWriter(tmp_tar)
    rejects: list[dict] = []
    read_bytes = pending_n = pending_b = 0
    opts = task["image_options"]
    try:
        keys = {id(it): k for it, k in zip(task["items"], task["keys"])}
        for item, data in iter_items(task["items"], task["source_options"]):
            key = keys[id(item)]
            if isinstance(data, BaseException):  # unreadable file: a reject, never a failed build
                e = data
                reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
                rejects.append({"source": item.id, "reason": f"unreadable ({reason})"})
                continue
            read_bytes += len(data)
            pending_n += 1
            pending_b += len(data)
            try:
                prepared = prepare_image(data, **opts)
            except Reject as e:
                rejects.append({"source": item.id, "reason": str(e)})
            except Exception as e:  # a decoder bug on one file must not stop the build either
                rejects.append({"source": item.id, "reason": f"cannot be processed ({type(e).__name__}: {e})"})
            else:
                members = [(prepared.ext, prepared.data)]
                if item.label is not None:
                    members.append(("cls", str(item.label).encode()))
                members.append(("json", _sample_json(item, prepared, len(data))))
                writer.add(key, members)
            if pending_n >= 16:
                _report(pending_n, pending_b)
                pending_n = pending_b = 0
        _report(pending_n, pending_b)
        result = writer.close()
    except BaseException:
        writer.abort()
        raise
    sidecar = {"shard": task["number"], "fingerprint": task["fingerprint"], "info": None,
               "rejects": rejects, "images_read": len(task["items"]), "bytes_read": read_bytes}
    if not result.samples:
        os.remove(tmp_tar)  # every input of this shard was rejected: no shard at all
        return sidecar, None, None
    sidecar["info"] = asdict(ShardInfo(name=f"{name}.tar", index=f"{name}.idx", samples=result.samples,
                                       bytes=result.bytes, checksum=result.checksum))
    return sidecar, tmp_tar, result.index_text


def finalize_shard(task: dict, sidecar: dict, tmp_tar: str | None, index_text: str | None) -> dict:
    """Put a written shard in place (the I/O-bound part): index, then tar, then the sidecar that
    marks it complete. Local: fsync + rename; remote: upload (a PUT is visible only when complete)."""
    dest = Destination(task["root"], task["storage_options"])
    name = task["name"]
    fsync = task.get("fsync", True)
    if tmp_tar is not None:
        idx_tmp = os.path.join(task["tmp_dir"], f"{name}.idx.tmp-{os.getpid()}")
        with open(idx_tmp, "w", encoding="utf-8") as f:
            f.write(index_text)
        dest.put_file(idx_tmp, f"{name}.idx", fsync=fsync)
        dest.put_file(tmp_tar, f"{name}.tar", fsync=fsync)
    dest.write_bytes(f"{SIDECAR_DIR}/{name}.json", json.dumps(sidecar).encode(), fsync=fsync)
    return sidecar


def build_shard(task: dict) -> dict:
    """Write and finalize one shard; returns its sidecar."""
    return finalize_shard(task, *write_shard(task))


class _ShardLoop:
    """One process's share of the work: it writes shard after shard while a background thread puts
    the previous one in place (fsync/rename or upload), so disk flushes and uploads overlap the
    CPU work. At most two finished shards wait for that thread (bounded temporary space)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmim-finalize")
        self.pending: list = []
        self.results: list[dict] = []

    def run(self, task: dict) -> None:
        written = write_shard(task)
        while len(self.pending) >= 2:
            self.results.append(self.pending.pop(0).result())
        self.pending.append(self.pool.submit(finalize_shard, task, *written))

    def finish(self) -> list[dict]:
        try:
            for fut in self.pending:
                self.results.append(fut.result())
        finally:
            self.pool.shutdown(wait=True)
        return self.results


def _work(tasks: list[dict], claim) -> list[dict]:
    """Build tasks in this process: all of them, or those won from the shared `claim` counter."""
    loop = _ShardLoop()
    try:
        while True:
            if claim is None:
                i = len(loop.results) + len(loop.pending)
            else:
                with claim.get_lock():
                    i = claim.value
                    claim.value += 1
            if i >= len(tasks):
                break
            loop.run(tasks[i])
    finally:
        results = loop.finish()
    return results


def _prctl():
    """libc's prctl, resolved in the parent: a forked child then calls it without dlopen/dlsym
    (the loader's locks may have been held by another thread at fork time)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(parent: int, prctl) -> None:
    """Ask Linux to SIGKILL this worker when the build process dies: a killed build must not leave
    workers running that a re-run would race with."""
    if prctl is not None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _run_forked(tasks: list[dict], workers: int, counters, result_dir: str) -> list[dict]:
    """Fork `workers - 1` children; they and this process claim shards from a shared counter.

    Forked children inherit the task list (nothing is pickled) and start in milliseconds; each
    writes its sidecars as JSON into `result_dir` (or its traceback when it fails).
    """
    import traceback

    ctx = mp.get_context("fork")
    claim = ctx.Value("q", 0)
    children = []
    parent, prctl = os.getpid(), _prctl()
    with fork_safe_gc():  # no child may finalize the parent's objects (DALI pipelines); pipeline/forking.py
        for w in range(1, min(workers, len(tasks))):
            pid = os.fork()
            if pid == 0:  # child
                _die_with_parent(parent, prctl)
                code = 0
                out = os.path.join(result_dir, f"worker-{w}.json")
                try:
                    _init_worker(counters)
                    res = {"results": _work(tasks, claim)}
                except BaseException:
                    res = {"error": traceback.format_exc()}
                    code = 1
                try:
                    with open(out, "w") as f:
                        json.dump(res, f)
                finally:
                    os._exit(code)
            children.append((w, pid))
    results: list[dict] = []
    error: BaseException | None = None
    try:
        _init_worker(counters)
        results += _work(tasks, claim)
    except BaseException as e:  # still reap the children before raising
        error = e
        with claim.get_lock():
            claim.value = len(tasks)  # stop the children after their current shard
    finally:
        _init_worker(None)
    failures = []
    for w, pid in children:
        _, status = os.waitpid(pid, 0)
        out = os.path.join(result_dir, f"worker-{w}.json")
        try:
            with open(out) as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = {"error": f"worker process {pid} died (wait status {status}) without a result"}
        if "error" in res:
            failures.append(res["error"])
        else:
            results += res["results"]
    if error is not None:
        raise error
    if failures:
        raise RuntimeError("a shard worker failed; re-run the same command to resume:\n" + failures[0])
    return results


# ---------------------------------------------------------------------------------------------
# main side

def _scrub_url(url: str) -> str:
    """The URL without any user:password@ part (never written to logs or manifests)."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        host, sep, path = rest.partition("/")
        if "@" in host:
            host = host.rsplit("@", 1)[1]
        return f"{scheme}://{host}{sep}{path}"
    return url


def _open_destination(dst: str, storage_options: dict | None) -> Destination:
    try:
        return Destination(dst, storage_options)
    except (ValueError, ImportError) as e:
        scheme = dst.split("://", 1)[0]
        raise BuildError(f"unknown or unavailable storage scheme {scheme!r} in DST {_scrub_url(dst)} ({e}); "
                         f"use a local path, s3://bucket/prefix or another fsspec URL") from None


def _check_local_writable(path: str) -> None:
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise BuildError(f"DST {path} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BuildError(f"DST {path} is not writable (no write permission on {probe}); choose another DST")


def _read_json(dest: Destination, name: str) -> dict | None:
    try:
        return json.loads(dest.read_bytes(name))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # a torn or foreign file: treated as absent (it is rewritten)


def _parse_part(part: tuple[int, int] | None) -> tuple[int, int]:
    if part is None:
        return 0, 1
    i, n = int(part[0]), int(part[1])
    if n < 1 or not 0 <= i < n:
        raise BuildError(f"--part {i}/{n} is out of range; use i/N with 0 <= i < N")
    return i, n


def build_dataset(src: str, dst: str, *, shard_max_bytes: int | None = 256 << 20, shard_max_samples: int | None = None,
                  workers: int = 2, seed: int = 0, part: tuple[int, int] | None = None, max_side: int | None = None,
                  quality: int = 95, full_decode: bool = False, storage_options: dict | None = None,
                  progress: bool = True, labels: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS,
                  prefix: str = DEFAULT_PREFIX, source_storage_options: dict | None = None,
                  fsync: bool = True) -> BuildSummary:
    """Build (or finish building) the dataset at `dst` from the corpus at `src`.

    Args:
        src: class-folder tree, flat folder, file list or tar archive; local path or fsspec URL.
        dst: dataset root; local path or fsspec URL (s3://bucket/prefix).
        shard_max_bytes: byte limit per shard (None: no byte limit).
        shard_max_samples: sample limit per shard (None: no count limit).
        workers: worker processes (0 or 1: build in this process).
        seed: seed of the global shuffle.
        part: (i, N): build only part i of N (shards n with n % N == i); run `merge_parts` after all.
        max_side: re-encode images whose longer side is larger (JPEG at `quality`).
        quality: JPEG quality for re-encoded and converted images.
        full_decode: decode every image to check it (default: header and end-marker checks).
        storage_options: fsspec options for DST (and SRC unless `source_storage_options` is given);
            they override the AWS environment.
        progress: show a progress bar and print a summary on stderr.
        labels: "auto" | "folders" | "none" (see `lmim.tools.shard.sources.open_corpus`).
        max_pixels: images declaring more pixels are rejected as decompression bombs.
        prefix: shard file name prefix.
        source_storage_options: fsspec options for SRC when they differ from DST's.
        fsync: flush each local shard to disk before moving it into place (survives power loss,
            not only a killed process; done in a background thread, so it costs little).
    """
    t0 = time.perf_counter()
    if shard_max_bytes is None and shard_max_samples is None:
        raise BuildError("give a shard size limit: --shard-max-bytes and/or --shard-max-samples")
    if (shard_max_bytes is not None and shard_max_bytes <= 0) or (shard_max_samples is not None and shard_max_samples <= 0):
        raise BuildError("shard limits must be positive")
    if not 1 <= quality <= 100:
        raise BuildError(f"--quality must be between 1 and 100, not {quality}")
    if max_side is not None and max_side < 1:
        raise BuildError(f"--max-side must be a positive number of pixels, not {max_side}")
    if not prefix or any(c in prefix for c in "./ \t"):
        raise BuildError(f"--prefix {prefix!r} must be non-empty and hold no dot, slash or space")
    part_i, part_n = _parse_part(part)
    src_options = source_storage_options if source_storage_options is not None else storage_options
    dest = _open_destination(dst, storage_options)
    if dest.local and "://" not in src:
        src_abs = os.path.realpath(src.rstrip("/") or "/")
        dst_real = os.path.realpath(dest.path)
        if src_abs == dst_real:
            raise BuildError("SRC and DST are the same folder; give DST a new folder")
        if os.path.isdir(src_abs) and dst_real.startswith(src_abs.rstrip(os.sep) + os.sep):
            raise BuildError(f"DST {dest.path} is inside SRC {src}: its shards would become part of the "
                             f"corpus; put DST outside SRC")
    if dest.local:
        _check_local_writable(dest.path)
    try:
        corpus = open_corpus(src, labels=labels, storage_options=src_options)
    except SourceError as e:
        raise BuildError(str(e)) from None
    try:
        if not corpus.items:
            what = f" ({len(corpus.rejects)} unusable entries)" if corpus.rejects else ""
            raise BuildError(f"SRC {_scrub_url(src)} holds no images{what}; nothing to build")
        options = {"max_side": max_side, "quality": quality, "full_decode": full_decode, "labels": labels,
                   "max_pixels": max_pixels, "prefix": prefix, "version": TOOL_VERSION}
        plan = make_plan(corpus, seed=seed, shard_max_bytes=shard_max_bytes, shard_max_samples=shard_max_samples,
                         options=options)
        build_info = {"tool": "lmim shard", "source": _scrub_url(src), "source_kind": corpus.kind, "seed": seed,
                      "shard_max_bytes": shard_max_bytes, "shard_max_samples": shard_max_samples, **options,
                      "fingerprint": plan.fingerprint, "planned_shards": len(plan.shards),
                      "planned_samples": len(corpus.items)}
        done = _prepare_destination(dest, plan, corpus, build_info)
        if done is not None:  # the dataset is already complete
            if progress:
                print(f"lmim shard: {_scrub_url(dest.url)} is already complete ({done.total_samples} samples in "
                      f"{len(done.shards)} shards); nothing to do", file=sys.stderr)
            return _summary_from_manifest(done, t0)
        return _run(dest, corpus, plan, build_info, part_i, part_n, workers, progress, src_options, t0,
                    image_options={"max_side": max_side, "quality": quality, "max_pixels": max_pixels,
                                   "full_decode": full_decode}, fsync=fsync)
    finally:
        corpus.close()


def _prepare_destination(dest: Destination, plan: Plan, corpus: Corpus, build_info: dict) -> Manifest | None:
    """Check DST holds nothing foreign, write the plan; return the manifest if already complete."""
    try:
        manifest_raw = _read_json(dest, MANIFEST_NAME)
        existing_plan = _read_json(dest, PLAN_NAME)
    except PermissionError:
        raise BuildError(f"DST {_scrub_url(dest.url)} is not readable with these credentials") from None
    except Exception as e:
        raise BuildError(f"cannot reach DST {_scrub_url(dest.url)} ({type(e).__name__}: {e})") from None
    if manifest_raw is not None:
        if manifest_raw.get("build", {}).get("fingerprint") == plan.fingerprint:
            return Manifest.from_json(json.dumps(manifest_raw))
        raise BuildError(f"DST {_scrub_url(dest.url)} already holds a different dataset (its manifest was built "
                         f"from other sources or settings); choose an empty DST or delete it first")
    if existing_plan is not None and existing_plan.get("fingerprint") != plan.fingerprint:
        raise BuildError(f"DST {_scrub_url(dest.url)} holds an unfinished build of other sources or settings; "
                         f"re-run that build, or choose an empty DST")
    if existing_plan is None:
        if dest.local:
            existed = os.path.exists(dest.path)
        plan_doc = {**build_info, "classes": corpus.classes, "listing_rejects": corpus.rejects}
        try:
            dest.write_bytes(PLAN_NAME, json.dumps(plan_doc, indent=1).encode())
        except PermissionError:
            if dest.local and not existed:
                shutil.rmtree(dest.path, ignore_errors=True)
            raise BuildError(f"DST {_scrub_url(dest.url)} is not writable; choose another DST or fix its permissions") from None
        except Exception as e:
            if dest.local and not existed:
                shutil.rmtree(dest.path, ignore_errors=True)
            raise BuildError(f"cannot write to DST {_scrub_url(dest.url)} ({type(e).__name__}: {e})") from None
    return None


def _completed(dest: Destination, plan: Plan, prefix: str) -> dict[int, dict]:
    """Sidecars of shards already complete (matching fingerprint and shard size)."""
    out = {}
    for fname in dest.list(SIDECAR_DIR):
        if not fname.endswith(".json"):
            continue
        side = _read_json(dest, f"{SIDECAR_DIR}/{fname}")
        if not side or side.get("fingerprint") != plan.fingerprint:
            continue
        n = int(side["shard"])
        if fname != f"{shard_name(prefix, n)}.json" or n >= len(plan.shards):
            continue
        info = side.get("info")
        if info is not None:
            try:
                if dest.size(info["name"]) != info["bytes"] or not dest.exists(info["index"]):
                    continue
            except FileNotFoundError:
                continue
        out[n] = side
    return out


def _run(dest: Destination, corpus: Corpus, plan: Plan, build_info: dict, part_i: int, part_n: int,
         workers: int, progress: bool, src_options: dict | None, t0: float, image_options: dict,
         fsync: bool = True) -> BuildSummary:
    prefix = build_info["prefix"]
    mine = [n for n in range(len(plan.shards)) if n % part_n == part_i]
    done = _completed(dest, plan, prefix)
    todo = [n for n in mine if n not in done]
    if dest.local:
        tmp_dir = os.path.join(dest.path, TMP_DIR)
        os.makedirs(tmp_dir, exist_ok=True)
        mine_names = {shard_name(prefix, n) for n in mine}
        for fname in os.listdir(tmp_dir):  # leftovers of a killed run of this part (other parts own other names)
            if fname.split(".", 1)[0] in mine_names:
                try:
                    os.remove(os.path.join(tmp_dir, fname))
                except FileNotFoundError:
                    pass
    else:
        tmp_dir = tempfile.mkdtemp(prefix="lmim-shard-")
    tasks = [{"number": n, "name": shard_name(prefix, n), "items": [corpus.items[i] for i in plan.shards[n]],
              "keys": [plan.keys[i] for i in plan.shards[n]], "root": dest.url, "storage_options": dest.storage_options,
              "source_options": src_options, "tmp_dir": tmp_dir, "fingerprint": plan.fingerprint,
              "image_options": image_options, "fsync": fsync} for n in todo]
    total_images = sum(len(t["items"]) for t in tasks)
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    bar = _Progress(total_images, counters, enabled=progress and bool(tasks),
                    desc=f"part {part_i}/{part_n}" if part_n > 1 else "shard")
    result_dir = tempfile.mkdtemp(prefix="lmim-shard-results-")
    try:
        if workers <= 1 or len(tasks) <= 1:
            _init_worker(counters)
            try:
                results = _work(tasks, None)
            finally:
                _init_worker(None)
        elif sys.platform.startswith("linux"):
            results = _run_forked(tasks, workers, counters, result_dir)
        else:  # no fork: a spawn pool, one whole shard (write + finalize) per task
            ctx = mp.get_context("spawn")
            results = []
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                                     initializer=_init_worker, initargs=(counters,)) as pool:
                pending = {pool.submit(build_shard, t) for t in tasks}
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    results += [f.result() for f in finished]
    finally:
        bar.close()
        shutil.rmtree(result_dir, ignore_errors=True)
        if not dest.local:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    images_read = sum(r["images_read"] for r in results)
    bytes_read = sum(r["bytes_read"] for r in results)
    if part_n == 1:
        manifest = merge_parts(dest.url, storage_options=dest.storage_options, _dest=dest)
        summary = BuildSummary(manifest.total_samples, len(manifest.shards), len(manifest.classes or []),
                               int(manifest.build.get("rejects", 0)), seconds, manifest.total_bytes,
                               built_shards=len(tasks), resumed_shards=len(mine) - len(tasks),
                               images_read=images_read, bytes_read=bytes_read)
    else:
        sides = list(done.values()) + results
        mine_sides = [s for s in sides if s["shard"] % part_n == part_i]
        infos = [s["info"] for s in mine_sides if s.get("info")]
        summary = BuildSummary(sum(i["samples"] for i in infos), len(infos), len(corpus.classes or []),
                               sum(len(s["rejects"]) for s in mine_sides), seconds, sum(i["bytes"] for i in infos),
                               built_shards=len(tasks), resumed_shards=len(mine) - len(tasks),
                               images_read=images_read, bytes_read=bytes_read, complete=False)
    if progress:
        _print_summary(summary, part_i, part_n, dest.url)
    return summary


def merge_parts(dst: str, *, storage_options: dict | None = None, _dest: Destination | None = None) -> Manifest:
    """Write `manifest.json` and `rejects.jsonl` once every planned shard of every part is complete.

    Raises BuildError naming the missing shards (and the parts that own them) otherwise.
    """
    dest = _dest or _open_destination(dst, storage_options)
    plan_doc = _read_json(dest, PLAN_NAME)
    if plan_doc is None:
        if _read_json(dest, MANIFEST_NAME) is not None:
            return Manifest.from_json(dest.read_bytes(MANIFEST_NAME).decode())
        raise BuildError(f"{_scrub_url(dest.url)} holds no lmim build (no {PLAN_NAME}); run `lmim shard SRC DST` first")
    prefix = plan_doc["prefix"]
    n_planned = int(plan_doc["planned_shards"])
    sides = {}
    for fname in dest.list(SIDECAR_DIR):
        if fname.endswith(".json"):
            side = _read_json(dest, f"{SIDECAR_DIR}/{fname}")
            if side and side.get("fingerprint") == plan_doc["fingerprint"]:
                sides[int(side["shard"])] = side
    missing = [n for n in range(n_planned) if n not in sides]
    if missing:
        names = ", ".join(shard_name(prefix, n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise BuildError(f"{len(missing)} of {n_planned} shards are not built yet ({names}); finish every "
                         f"`lmim shard --part i/N` run, then merge again")
    shards = [ShardInfo.from_dict(sides[n]["info"]) for n in range(n_planned) if sides[n].get("info")]
    rejects = list(plan_doc.get("listing_rejects", []))
    for n in range(n_planned):
        rejects.extend(sides[n]["rejects"])
    rejects.sort(key=lambda r: r["source"])
    build = {k: v for k, v in plan_doc.items() if k not in ("classes", "listing_rejects")}
    build["rejects"] = len(rejects)
    build["rejects_file"] = REJECTS_NAME
    manifest = Manifest(shards=shards, classes=plan_doc.get("classes"), build=build)
    dest.write_bytes(REJECTS_NAME, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode())
    dest.write_bytes(MANIFEST_NAME, manifest.to_json().encode())  # last: its presence means complete
    if dest.local:
        shutil.rmtree(os.path.join(dest.path, TMP_DIR), ignore_errors=True)
    return manifest


def _summary_from_manifest(manifest: Manifest, t0: float) -> BuildSummary:
    return BuildSummary(manifest.total_samples, len(manifest.shards), len(manifest.classes or []),
                        int(manifest.build.get("rejects", 0)), time.perf_counter() - t0, manifest.total_bytes,
                        resumed_shards=len(manifest.shards))


class _Progress:
    """A tqdm bar fed from the workers' shared counters by a small polling thread."""

    def __init__(self, total: int, counters, enabled: bool, desc: str):
        self.enabled = enabled
        if not enabled:
            return
        from tqdm import tqdm

        self.counters = counters
        self.bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
        self.t0 = time.perf_counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _update(self) -> None:
        images, nbytes = self.counters[0].value, self.counters[1].value
        self.bar.update(images - self.bar.n)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{nbytes / 1e6 / dt:.1f} MB/s", refresh=False)

    def _poll(self) -> None:
        while not self.stop.wait(0.25):
            self._update()

    def close(self) -> None:
        if not self.enabled:
            return
        self.stop.set()
        self.thread.join()
        self._update()
        self.bar.close()


def _print_summary(s: BuildSummary, part_i: int, part_n: int, url: str) -> None:
    what = f"part {part_i}/{part_n} of " if part_n > 1 else ""
    lines = [f"lmim shard: {what}{_scrub_url(url)}",
             f"  samples {s.samples}   shards {s.shards}   classes {s.classes}   rejects {s.rejects}"
             + (f" (see {REJECTS_NAME})" if s.rejects and s.complete else ""),
             f"  this run: {s.built_shards} shards built, {s.resumed_shards} already complete, "
             f"{s.images_read} images in {s.seconds:.1f} s ({s.images_per_s:.0f} img/s, {s.mb_per_s:.1f} MB/s)",
             f"  output: {s.bytes / 1e6:.1f} MB"]
    if part_n > 1:
        lines.append(f"  run `lmim merge {_scrub_url(url)}` once all {part_n} parts are done")
    print("\n".join(lines), file=sys.stderr)
