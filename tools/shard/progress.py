"""Progress of a build: counters every worker process adds to, and the bar a thread draws from them.

Workers only add to two shared integers (images and source bytes), a few times a shard; the
tqdm bar lives in the build process alone, redrawn by a small polling thread, so no worker ever
writes to the terminal and the bar costs the workers nothing but a lock.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from multiprocessing.context import BaseContext
from typing import Iterator

__all__ = ["Counters", "attach", "reporting", "report", "ProgressBar"]


class Counters:
    """Images processed and source bytes read, by all processes of one build (shared memory)."""

    def __init__(self, ctx: BaseContext):
        self.images = ctx.Value("q", 0)
        self.bytes = ctx.Value("q", 0)

    def add(self, images: int, nbytes: int) -> None:
        with self.images.get_lock():
            self.images.value += images
        with self.bytes.get_lock():
            self.bytes.value += nbytes

    def read(self) -> tuple[int, int]:
        return self.images.value, self.bytes.value


# This process's counters. A module global, not a task field: shared-memory values reach a spawned
# worker only as a start-up argument (`attach` is the pool's initializer); forked ones inherit it.
_counters: Counters | None = None


def attach(counters: Counters | None) -> None:
    global _counters
    _counters = counters


@contextmanager
def reporting(counters: Counters) -> Iterator[None]:
    """`report` adds to `counters` in this process, and in the processes it forks, inside the block."""
    attach(counters)
    try:
        yield
    finally:
        attach(None)


def report(images: int, nbytes: int) -> None:
    if _counters is not None:
        _counters.add(images, nbytes)


# When stderr is a log file (a batch job, `nohup`, CI), a redrawn bar would write four lines a second;
# a plain line this often says the same.
LOG_LINE_SECONDS = 30.0


class ProgressBar:
    """A tqdm bar on stderr fed from `counters` by a polling thread; does nothing when not `enabled`.
    When stderr is not a terminal, a plain line every LOG_LINE_SECONDS and one at the end instead."""

    def __init__(self, total: int, counters: Counters, enabled: bool, desc: str):
        self.enabled = enabled
        if not enabled:
            return
        self.counters, self.total, self.desc = counters, total, desc
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
        self.t0 = time.perf_counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _update(self) -> None:
        images, nbytes = self.counters.read()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is None:
            print(f"{self.desc}: {images}/{self.total} images ({images / max(self.total, 1):.0%}), "
                  f"{images / dt:.0f} img/s, {nbytes / 1e6 / dt:.1f} MB/s", file=sys.stderr, flush=True)
            return
        self.bar.update(images - self.bar.n)
        self.bar.set_postfix_str(f"{nbytes / 1e6 / dt:.1f} MB/s", refresh=False)

    def _poll(self) -> None:
        while not self.stop.wait(0.25 if self.bar is not None else LOG_LINE_SECONDS):
            self._update()

    def close(self) -> None:
        if not self.enabled:
            return
        self.stop.set()
        self.thread.join()
        self._update()
        if self.bar is not None:
            self.bar.close()
