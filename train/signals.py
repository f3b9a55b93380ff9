"""Interruptions (Ctrl-C, SIGTERM) as exceptions, with no heavy imports.

The `lmim` dispatcher installs `sigterm_interrupts` around every command before anything is
imported, so `kill` unwinds a command as Ctrl-C does: its `finally` blocks remove temporary
folders, `subprocess.run` stops the children it started, and the command ends with one sentence
and 143. That must work while torch is still loading, so this module imports nothing of lmim's.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "RUN_AGAIN", "Terminated", "sigterm_interrupts", "interruption"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143   # 128 + SIGTERM, as a shell reports a process killed by it
RUN_AGAIN = "run the same command again"   # how a command other than a training run goes on


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `scancel`, a preempting scheduler, torchrun stopping its workers), raised in
    the main thread so the run unwinds as from Ctrl-C: status.json says interrupted, loaders close."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block SIGTERM raises `Terminated` in the main thread (a preempted job then records
    why it stopped instead of leaving status.json at "running"); the old handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interruption(err: BaseException, how: str) -> tuple[int, str] | None:
    """(exit code, sentence) when `err` is Ctrl-C or SIGTERM, None otherwise; `how` says how to go on."""
    if isinstance(err, Terminated):
        return EXIT_TERMINATED, f"stopped by SIGTERM (kill, scancel or preemption); {how}."
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"interrupted; {how}."
    return None
