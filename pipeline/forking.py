"""Forking a process that may hold DALI pipelines (the shard builder's workers, DataLoader workers).

A forked child inherits every Python object but none of the parent's threads. If the child's
garbage collector finalizes a DALI pipeline that was waiting in a reference cycle (an exception's
traceback is enough to make one), its destructor waits for executor threads that do not exist
in the child and hangs (seen in the tests: `pthread_cond_destroy` in `Executor2::~Impl`) or
crashes. So: collect cyclic garbage in the parent, where the threads exist, then freeze every
object so that no child ever collects anything the parent made (`gc.freeze`, the documented
pre-fork idiom).
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

__all__ = ["fork_safe_gc"]


@contextmanager
def fork_safe_gc() -> Iterator[None]:
    """Fork children inside this block; the parent's collector resumes normally afterwards."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
