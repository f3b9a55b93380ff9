"""Forking a process that may hold DALI pipelines (the shard builder's workers, DataLoader workers).

A forked child inherits every Python object but none of the parent's threads. If the child's
garbage collector finalizes a DALI pipeline that was waiting in a reference cycle (an exception's
traceback is enough to make one), its destructor waits for executor threads that do not exist
in the child and hangs (seen in the tests: `pthread_cond_destroy` in `Executor2::~Impl`) or
crashes. So every object is frozen across the fork (`gc.freeze`, the documented pre-fork idiom,
O(1)): no child ever collects anything the parent made, and the parent collects its garbage as
usual once the block ends. (A `gc.collect()` here would do too, but costs ~60 ms in a process
that has imported torch: a third of a small shard build.)
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

__all__ = ["fork_safe_gc"]


@contextmanager
def fork_safe_gc() -> Iterator[None]:
    """Fork children inside this block; the parent's collector resumes normally afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
