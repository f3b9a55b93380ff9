"""One live run per run folder: `lmim pretrain` (process 0) holds an exclusive lock on its run_dir.

Two runs writing one folder (a scheduler's requeue while the old job is still dying, the same
command submitted twice) interleave their checkpoints and metrics, and the second one's start-up
clean-up can delete the first one's checkpoint in progress. The lock is a POSIX record lock
(`fcntl.lockf`) on `run_dir/.lock`: NFS carries it to the server (NLM / NFSv4), so it holds across
nodes; the kernel drops it when the process ends, however it ends; and forked workers (DataLoader)
do not inherit it. The file stays (empty) after the run: removing it could let two runs lock two
different files. Where the file system has no locks (ENOLCK, some Lustre mounts) the run goes on
unlocked. Not on Windows (no fcntl): unlocked there too.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunFolderLock"]

LOCK_NAME = ".lock"


class RunFolderBusy(Exception):
    """Another process holds the run folder's lock."""


class RunFolderLock:
    """An exclusive, non-blocking lock on a run folder, held until `release` (or the process ends).

    `claimed` says this process may write the folder's status and logs: it holds the lock, or the
    file system offers none (then nothing can be checked and the run goes on as before)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.claimed = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, run_dir: Path) -> None:
        """Take the lock of the existing folder `run_dir` (a no-op when claimed already).

        Raises:
            RunFolderBusy: another process holds it.
        """
        if self.claimed:
            return
        if fcntl is None:
            self.claimed = True
            return
        try:
            fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                self.claimed = True   # a folder this process cannot write: its own writes will say so
                return
            raise
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(str(run_dir)) from None
            self.claimed = True   # no locks on this file system (ENOLCK, ENOSYS, EINVAL): run unlocked
            return
        self._fd, self.claimed = fd, True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor drops the lock
            self._fd = None
        self.claimed = False

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
