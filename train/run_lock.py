"""One live run per run folder: `lmim pretrain` holds an exclusive lock on its run_dir.

Two runs writing one folder (a scheduler's requeue while the old job is still dying, the same
command started twice) interleave their checkpoints and metrics, and the second one's start-up
clean-up can delete the first one's checkpoint in progress. The lock is `flock` on the folder itself
(no lock file to leave behind or to be mistaken for the run's); the kernel drops it when the
process ends, however it ends. On a file system without flock (some network mounts) it is skipped.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

__all__ = ["RunFolderBusy", "RunFolderLock"]


class RunFolderBusy(Exception):
    """Another process holds the run folder's lock."""


class RunFolderLock:
    """An exclusive, non-blocking lock on a run folder, held until `release` (or the process ends)."""

    def __init__(self) -> None:
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, run_dir: Path) -> None:
        """Take the lock on the existing folder `run_dir` (a no-op when held).

        Raises:
            RunFolderBusy: another process holds it.
        """
        if self._fd is not None:
            return
        fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(str(run_dir)) from None
            return   # no flock here (ENOLCK, EINVAL, EBADF on some network file systems): run unlocked
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
