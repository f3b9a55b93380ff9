"""Worker processes for the shard builder: forked children that die with the build, or a spawn pool.

On Linux the build forks: children inherit the task list (nothing is pickled) and start in
milliseconds, and every process, the build's own included, takes the next task from a shared
counter until none is left. Linux is asked to kill each child when the build dies, so a killed
build never leaves workers running that a re-run would race with. Elsewhere (no safe fork) a
spawn pool runs one whole task per call.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing.context import BaseContext
from typing import Any, Callable, Sequence, TypeVar

from lmim.pipeline.forking import fork_safe_gc

__all__ = ["FORKS", "context", "run_forked", "run_spawned"]

T = TypeVar("T")
R = TypeVar("R")

FORKS = sys.platform.startswith("linux")  # elsewhere fork is unsafe (macOS) or absent (Windows)


def context() -> BaseContext:
    """The multiprocessing context the workers run in (for values shared with them)."""
    return mp.get_context("fork" if FORKS else "spawn")


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent: a forked child then calls it without dlopen/dlsym
    (the loader's locks may have been held by another thread at fork time)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(parent: int, prctl: Callable[..., int] | None) -> None:
    """Ask Linux to SIGKILL this worker when the build process dies."""
    if prctl is not None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def run_forked(count: int, workers: int, work: Callable[[Callable[[], int]], list[Any]]) -> list[Any]:
    """Run `work(next_index)` here and in `min(workers, count) - 1` forked children; all results.

    `next_index` hands out 0, 1, ..., count - 1 once each across all the processes, then numbers
    past the end. A child hands back its list as JSON (so it must hold JSON values only) through a
    file, or its traceback when it fails. Raises this process's own error after the children are
    reaped (they stop after their current task), else RuntimeError with the first child's traceback.
    """
    ctx = mp.get_context("fork")
    claim = ctx.Value("q", 0)

    def next_index() -> int:
        with claim.get_lock():
            i = claim.value
            claim.value += 1
        return i

    result_dir = tempfile.mkdtemp(prefix="lmim-shard-results-")
    try:
        children = _fork_children(min(workers, count) - 1, work, next_index, result_dir)
        results: list[Any] = []
        error: BaseException | None = None
        try:
            results += work(next_index)
        except BaseException as e:  # still reap the children before raising
            error = e
            with claim.get_lock():
                claim.value = count  # stop the children after their current task
        failures = []
        for w, pid in children:
            outcome = _reap(w, pid, result_dir)
            if "error" in outcome:
                failures.append(outcome["error"])
            else:
                results += outcome["results"]
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)
    if error is not None:
        raise error
    if failures:
        raise RuntimeError("a shard worker failed; re-run the same command to resume:\n" + failures[0])
    return results


def _fork_children(n: int, work: Callable[[Callable[[], int]], list[Any]], next_index: Callable[[], int],
                   result_dir: str) -> list[tuple[int, int]]:
    children = []
    parent, prctl = os.getpid(), _prctl()
    with fork_safe_gc():  # no child may finalize the parent's objects (DALI pipelines); pipeline/forking.py
        for w in range(1, n + 1):
            pid = os.fork()
            if pid == 0:  # child: never returns
                _die_with_parent(parent, prctl)
                code = 0
                try:
                    outcome: dict[str, Any] = {"results": work(next_index)}
                except BaseException:
                    outcome = {"error": traceback.format_exc()}
                    code = 1
                try:
                    with open(_result_path(result_dir, w), "w") as f:
                        json.dump(outcome, f)
                finally:
                    os._exit(code)
            children.append((w, pid))
    return children


def _result_path(result_dir: str, w: int) -> str:
    return os.path.join(result_dir, f"worker-{w}.json")


def _reap(w: int, pid: int, result_dir: str) -> dict[str, Any]:
    """Wait for child `w`; its {"results": [...]} or {"error": text}, also when it died without a word."""
    _, status = os.waitpid(pid, 0)
    try:
        with open(_result_path(result_dir, w)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"error": f"worker process {pid} died (wait status {status}) without a result"}


def run_spawned(fn: Callable[[T], R], items: Sequence[T], workers: int, initializer: Callable[..., None],
                initargs: tuple[Any, ...]) -> list[R]:
    """`fn(item)` for every item in a pool of spawned processes (set up by `initializer(*initargs)`),
    results in the order they finish."""
    results: list[R] = []
    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context("spawn"),
                             initializer=initializer, initargs=initargs) as pool:
        pending = {pool.submit(fn, item) for item in items}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            results += [f.result() for f in finished]
    return results
