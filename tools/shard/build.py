"""`build_dataset`: a raw corpus -> shards + DALI indices + manifest, resumable, in parallel, in parts.

This module orchestrates; each step has its own module:
    config.py       BuildOptions: every setting, checked in one place
    destination.py  opening and probing DST
    plan.py         which sample goes into which shard (a pure function of the listing)
    state.py        the build's state in DST: the plan file, one record (sidecar) per finished shard
    tasks.py        building one shard, and one process's loop over shards
    processes.py    worker processes (fork on Linux, a spawn pool elsewhere)
    progress.py     the shared counters and the progress bar
    merge.py        manifest.json and rejects.jsonl, written last (by a whole build, or by the last part)
The command line (cli.py) prints; nothing here does, but the progress bar.

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

import dataclasses
import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from lmim.pipeline.format.manifest import Manifest
from lmim.pipeline.storage import Store
from lmim.tools.shard.config import BuildOptions
from lmim.tools.shard.destination import check_destination, open_destination, scrub_url
from lmim.tools.shard.errors import BuildError
from lmim.tools.shard.merge import merge, merge_parts
from lmim.tools.shard.plan import Plan, make_plan
from lmim.tools.shard.processes import FORKS, context, run_forked, run_spawned
from lmim.tools.shard.progress import Counters, ProgressBar, attach, reporting
from lmim.tools.shard.sources import Corpus, SourceError, open_corpus
from lmim.tools.shard.repair import damaged_shards, failing_recheck
from lmim.tools.shard.state import (TMP_DIR, ShardRecord, claim, completed_records, restore_plan,
                                    restore_records, shard_name)
from lmim.tools.shard.tasks import ShardTask, TaskContext, build_shard, run_shards, scratch_writer_gone

__all__ = ["BuildError", "BuildOptions", "BuildSummary", "BuildResult", "build_dataset", "run_build", "merge_parts"]


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


@dataclass
class BuildResult:
    """A run's summary and what the command line needs to word it (kept out of the summary, whose
    fields are the `--json` record)."""

    summary: BuildSummary
    dataset: str                # DST as messages name it (no credentials)
    part: tuple[int, int]       # (i, N) of this run; (0, 1) for a whole build
    already_complete: bool      # DST already held this finished dataset: the run did nothing
    repaired: list[str] = dataclasses.field(default_factory=list)  # shards of a finished dataset rebuilt (missing or damaged)
    # a --part run on a finished dataset: other parts' shards found missing or of another size (it repairs its own only)
    others_damaged: list[str] = dataclasses.field(default_factory=list)


def build_dataset(src: str, dst: str, options: BuildOptions | None = None, **keywords: Any) -> BuildSummary:
    """Build (or finish building) the dataset at `dst` from the corpus at `src`.

    Args:
        src: class-folder tree, flat folder, file list or tar archive; local path or fsspec URL.
        dst: dataset root; local path or fsspec URL (s3://bucket/prefix).
        options: the settings (default `BuildOptions()`); `keywords` name single ones and override them.

    Keywords (BuildOptions' fields):
        shard_max_bytes: byte limit per shard (None: no byte limit).
        shard_max_samples: sample limit per shard (None: no count limit).
        workers: worker processes (0 or 1: build in this process).
        seed: seed of the global shuffle.
        part: (i, N): build only part i of N (shards n with n % N == i); the part that finds every
            part's shards complete when it ends writes the manifest (`merge_parts` re-runs that).
        max_side: re-encode images whose longer side is larger (JPEG at `quality`).
        quality: JPEG quality for re-encoded and converted images.
        full_decode: decode every image to check it (default: header and end-marker checks).
        storage_options: fsspec options for DST (and SRC unless `source_storage_options` is given);
            they override the AWS environment.
        progress: show a progress bar on stderr (`lmim shard` also prints a summary).
        labels: "auto" | "folders" | "none" (see `lmim.tools.shard.sources.open_corpus`).
        max_pixels: images declaring more pixels are rejected as decompression bombs.
        prefix: shard file name prefix.
        source_storage_options: fsspec options for SRC when they differ from DST's.
        fsync: flush each local shard to disk before moving it into place (survives power loss,
            not only a killed process; done in a background thread, so it costs little).
        recheck: read every shard already built in full and rebuild those that fail `lmim verify`'s
            check (without it, a finished shard is trusted when it is there at its recorded size).

    Raises:
        BuildError: a bad setting, SRC or DST, in one sentence.
    """
    options = BuildOptions(**keywords) if options is None else dataclasses.replace(options, **keywords)
    return run_build(src, dst, options).summary


def run_build(src: str, dst: str, options: BuildOptions) -> BuildResult:
    """`build_dataset`, with what the command line needs to report the run."""
    t0 = time.perf_counter()
    dest = open_destination(dst, options.storage_options)
    check_destination(dest, src)
    try:
        corpus = open_corpus(src, labels=options.labels, storage_options=options.source_options)
    except SourceError as e:
        raise BuildError(str(e)) from None
    try:
        if not corpus.items:
            what = f" ({len(corpus.rejects)} unusable entries)" if corpus.rejects else ""
            raise BuildError(f"SRC {scrub_url(src)} holds no images{what}; nothing to build")
        settings = options.content_settings()
        plan = make_plan(corpus, seed=options.seed, shard_max_bytes=options.shard_max_bytes,
                         shard_max_samples=options.shard_max_samples, options=settings)
        build_info = {"tool": "lmim shard", "source": scrub_url(src), "source_kind": corpus.kind, "seed": options.seed,
                      "shard_max_bytes": options.shard_max_bytes, "shard_max_samples": options.shard_max_samples,
                      **settings, "fingerprint": plan.fingerprint, "planned_shards": len(plan.shards),
                      "planned_samples": len(corpus.items)}
        plan_doc = {**build_info, "classes": corpus.classes, "listing_rejects": corpus.rejects}
        done = claim(dest, plan, plan_doc)
        part = (options.part_index, options.part_count)
        if done is None:
            return BuildResult(_run(dest, corpus, plan, options, t0), scrub_url(dest.url), part, already_complete=False)
        damaged = _damaged_of_mine(dest, done, plan, options)
        others = _damaged_of_others(dest, done, plan, options)
        if not damaged:
            return BuildResult(_summary_from_manifest(done, t0), scrub_url(dest.url), part, already_complete=not others,
                               others_damaged=others)
        restore_plan(dest, plan_doc)  # the merge that rewrites the manifest reads it
        numbers = _plan_numbers(plan, options)
        restore_records(dest, done, plan, [item.id for item in corpus.items], options.prefix,
                        skip=set(damaged.values()) | {numbers[name] for name in others},
                        listing_rejects=corpus.rejects)
        # the shards were just checked (read in full under --recheck): _run need not read them again
        summary = _run(dest, corpus, plan, dataclasses.replace(options, recheck=False), t0,
                       rebuild=frozenset(damaged.values()))
        return BuildResult(summary, scrub_url(dest.url), part, already_complete=False, repaired=sorted(damaged),
                           others_damaged=others)
    finally:
        corpus.close()


def _damaged_of_mine(dest: Store, manifest: Manifest, plan: Plan, options: BuildOptions) -> dict[str, int]:
    """{shard file name: plan number} of this run's shards of a finished dataset that must be rebuilt
    (a part build repairs its own shards only, as it builds only those)."""
    numbers = _plan_numbers(plan, options)
    mine = [s for s in manifest.shards if _is_mine(numbers.get(s.name), options)]
    return {name: numbers[name] for name in damaged_shards(dest, mine, manifest.classes, recheck=options.recheck)}


def _damaged_of_others(dest: Store, manifest: Manifest, plan: Plan, options: BuildOptions) -> list[str]:
    """Names of the other parts' shards of a finished dataset that are missing or of another size (one
    listing, no reads): a --part run does not rebuild them, but must not call the dataset complete."""
    if options.part_count == 1:
        return []
    numbers = _plan_numbers(plan, options)
    others = [s for s in manifest.shards if s.name in numbers and not _is_mine(numbers[s.name], options)]
    return damaged_shards(dest, others, manifest.classes, recheck=False)


def _plan_numbers(plan: Plan, options: BuildOptions) -> dict[str, int]:
    """{shard file name: its number in the plan}."""
    return {f"{shard_name(options.prefix, n)}.tar": n for n in range(len(plan.shards))}


def _is_mine(number: int | None, options: BuildOptions) -> bool:
    """Whether shard `number` of the plan is this part's to build (as `_run` splits them)."""
    return number is not None and number % options.part_count == options.part_index


def _run(dest: Store, corpus: Corpus, plan: Plan, options: BuildOptions, t0: float,
         rebuild: frozenset[int] = frozenset()) -> BuildSummary:
    """Build this run's missing shards and those in `rebuild` (found damaged), then merge (a whole
    build) or summarise this part."""
    part_i, part_n = options.part_index, options.part_count
    mine = [n for n in range(len(plan.shards)) if _is_mine(n, options)]
    done = completed_records(dest, plan, options.prefix)
    if options.recheck:  # a resumed build trusts a finished shard's size; --recheck reads it too
        recorded = {r.info.name: n for n, r in done.items() if n in mine and r.info is not None}
        failing = failing_recheck(dest, [done[n].info for n in recorded.values()], corpus.classes)
        rebuild = rebuild | {recorded[name] for name in failing}
    done = {n: r for n, r in done.items() if n not in rebuild}
    todo = [n for n in mine if n not in done]
    tmp_dir = _scratch_dir(dest, {shard_name(options.prefix, n) for n in mine})
    ctx = TaskContext(root=dest.url, storage_options=dest.storage_options, source_options=options.source_options,
                      tmp_dir=tmp_dir, fingerprint=plan.fingerprint, image=options.image, fsync=options.fsync)
    tasks = [ShardTask(number=n, name=shard_name(options.prefix, n), items=[corpus.items[i] for i in plan.shards[n]],
                       keys=[plan.keys[i] for i in plan.shards[n]], context=ctx) for n in todo]
    counters = Counters(context())
    bar = ProgressBar(sum(len(t.items) for t in tasks), counters, enabled=options.progress and bool(tasks),
                      desc=f"part {part_i}/{part_n}" if part_n > 1 else "shard")
    try:
        results = _build_tasks(tasks, options.workers, counters)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a write into the scratch folder; say which disk filled
            raise OSError(e.errno, e.strerror, tmp_dir) from e
        raise
    finally:
        bar.close()
        if not dest.local:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    this_run = dict(built_shards=len(tasks), resumed_shards=len(mine) - len(tasks),
                    images_read=sum(r.images_read for r in results), bytes_read=sum(r.bytes_read for r in results))
    # A whole build merges; so does the part that finds every part's shards complete (the last to
    # finish: merging is deterministic and each file is written atomically, so two parts finishing
    # at once both write the same bytes, and no lock can be left behind by a part that dies).
    manifest = merge(dest, only_if_complete=part_n > 1)
    if manifest is not None:
        return BuildSummary(manifest.total_samples, len(manifest.shards), len(manifest.classes or []),
                            int(manifest.build.get("rejects", 0)), seconds, manifest.total_bytes, **this_run)
    records = [r for r in list(done.values()) + results if _is_mine(r.shard, options)]
    infos = [r.info for r in records if r.info is not None]
    return BuildSummary(sum(i.samples for i in infos), len(infos), len(corpus.classes or []),
                        sum(len(r.rejects) for r in records), seconds, sum(i.bytes for i in infos),
                        **this_run, complete=False)


def _scratch_dir(dest: Store, mine: set[str]) -> str:
    """Where shards are written before they are put in place. Local DST: its own _build/tmp (a rename
    into place is then atomic), cleared of leftovers of a killed run of this part (other parts own
    other names; the same part running at once elsewhere keeps its files: only a writer that is gone
    leaves leftovers); remote DST: a fresh local temporary folder, removed after the run."""
    if not dest.local:
        return tempfile.mkdtemp(prefix="lmim-shard-")
    tmp_dir = os.path.join(dest.path, TMP_DIR)
    os.makedirs(tmp_dir, exist_ok=True)
    now = time.time()
    for fname in os.listdir(tmp_dir):
        if fname.split(".", 1)[0] not in mine:
            continue
        try:
            age = now - os.path.getmtime(os.path.join(tmp_dir, fname))
        except OSError:
            continue
        if scratch_writer_gone(fname, age_s=age):
            try:
                os.remove(os.path.join(tmp_dir, fname))
            except FileNotFoundError:
                pass
    return tmp_dir


def _build_tasks(tasks: list[ShardTask], workers: int, counters: Counters) -> list[ShardRecord]:
    """Every task's record: built in this process, in forked children (Linux) or in a spawn pool."""
    if workers <= 1 or len(tasks) <= 1:
        with reporting(counters):
            return run_shards(tasks, itertools.count().__next__)
    if FORKS:
        with reporting(counters):  # the forked children inherit it
            rows = run_forked(len(tasks), workers,
                              lambda next_index: [r.to_dict() for r in run_shards(tasks, next_index)])
        return [ShardRecord.from_dict(row) for row in rows]
    return run_spawned(build_shard, tasks, workers, initializer=attach, initargs=(counters,))


def _summary_from_manifest(manifest: Manifest, t0: float) -> BuildSummary:
    return BuildSummary(manifest.total_samples, len(manifest.shards), len(manifest.classes or []),
                        int(manifest.build.get("rejects", 0)), time.perf_counter() - t0, manifest.total_bytes,
                        resumed_shards=len(manifest.shards))
