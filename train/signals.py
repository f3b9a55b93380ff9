"""Interruptions (Ctrl-C, SIGTERM, SIGHUP) as exceptions, with no heavy imports.

The `lmim` dispatcher installs `sigterm_interrupts` around every command before anything is
imported, so `kill` unwinds a command as Ctrl-C does: its `finally` blocks remove temporary
folders, `subprocess.run` stops the children it started, and the command ends with one sentence
and 143. That must work while torch is still loading, so this module imports nothing of lmim's.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

__all__ = ["EXIT_HUNG_UP", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "RUN_AGAIN", "HungUp", "Terminated",
           "hold_interruptions", "pending_interruption", "raise_pending", "sigterm_interrupts", "interruption"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143   # 128 + SIGTERM, as a shell reports a process killed by it
EXIT_HUNG_UP = 129      # 128 + SIGHUP
RUN_AGAIN = "run the same command again"   # how a command other than a training run goes on


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `scancel`, a preempting scheduler, torchrun stopping its workers), raised in
    the main thread so the run unwinds as from Ctrl-C: status.json says interrupted, loaders close."""


class HungUp(Terminated):
    """SIGHUP: the terminal or ssh session the command ran in closed. It killed a run on the spot,
    leaving status.json at "running" and a half-written checkpoint folder."""


# The interruption last raised by a signal. Python runs a handler between any two bytecodes, also
# inside a finalizer, where the exception it raises is printed as "Exception ignored" and dropped:
# DALI's Pipeline.__del__ caught about one SIGHUP in eight in a tiny run (a pipeline ends every step
# there), and the run trained on. `raise_pending` raises it again at a safe point.
_pending: list[type[KeyboardInterrupt]] = []

# Whether an interruption or a failure is unwinding the command now. A SIGTERM or SIGHUP then is
# remembered in `_pending`, not raised: raised, it would cut the clean-up and the report short wherever
# they had got to (a traceback, no status). Under srun the scheduler signals every process and the
# launcher forwards its own, so two come together; and a launcher stops every process once one has
# failed, often while the others are still reporting their own failure. A second Ctrl-C (a person
# insisting) still raises.
_unwinding: list[bool] = [False]


# stdout / stderr when they were a terminal as the command started (after a hang-up isatty says no)
_terminal_fds: list[int] = []


def _leave_the_terminal() -> None:
    """After a hang-up every write to the terminal fails (EIO): a progress bar or the closing sentence
    would turn the interruption into an I/O error (exit 1, or "disk"). Output that went to the
    terminal goes nowhere from now on; files and pipes (a scheduler's log) are kept."""
    for fd in _terminal_fds:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        except OSError:
            pass


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def raise_pending() -> None:
    """Raise the interruption a signal asked for if it has not ended the command yet (see `_pending`);
    call it where stopping is safe, e.g. between training steps."""
    if _pending:
        _unwinding[0] = True
        raise _pending[0]()


def hold_interruptions() -> None:
    """A failure is unwinding the command: from now until the command ends, a SIGTERM or SIGHUP is
    remembered (`interruption_pending`), not raised (see `_unwinding`)."""
    _unwinding[0] = True


def pending_interruption() -> type[KeyboardInterrupt] | None:
    """The interruption a signal asked for in this command (raised, swallowed or held), or None."""
    return _pending[0] if _pending else None


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block SIGTERM raises `Terminated` in the main thread (a preempted job then records
    why it stopped instead of leaving status.json at "running"), and SIGHUP `HungUp`, unless it is
    ignored (`nohup` ignores it: that choice stands); Ctrl-C still raises KeyboardInterrupt, and all
    three are remembered for `raise_pending`. The old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # A failure held interruptions outside any such block (a test calling the trainer's run() itself):
    # nothing of it is unwinding in here.
    _unwinding[0] = False

    def _raise(signum, frame):
        kind = {getattr(signal, "SIGHUP", None): HungUp, signal.SIGINT: KeyboardInterrupt}.get(signum, Terminated)
        if kind is HungUp:
            _leave_the_terminal()
        if _unwinding[0] and kind is not KeyboardInterrupt:
            _pending[:] = _pending or [kind]   # remembered, not raised (see `_unwinding`)
            return
        _pending[:] = [kind]
        _unwinding[0] = True
        raise kind()

    hook = sys.unraisablehook

    def _quiet_when_pending(unraisable) -> None:
        # the interruption a finalizer swallowed is remembered (and raised again at the next step):
        # no "Exception ignored ... Traceback" for it on the user's terminal
        if not (_pending and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            hook(unraisable)
        else:   # nothing is unwinding after all: a later SIGTERM must still stop the command
            _unwinding[0] = False

    sys.unraisablehook = _quiet_when_pending
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # Ctrl-C: Python's own, remembered too
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise)
    hup = getattr(signal, "SIGHUP", None)   # not on Windows
    if hup is not None and signal.getsignal(hup) == signal.SIG_DFL:
        previous[hup] = signal.signal(hup, _raise)
        _terminal_fds[:] = [fd for fd in (1, 2) if _isatty(fd)]
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = hook
        _pending.clear()   # a later command in the same process (a test, a bench) starts afresh
        _unwinding[0] = False


def interruption(err: BaseException, how: str, *, launched: bool = False) -> tuple[int, str] | None:
    """(exit code, sentence) when `err` is Ctrl-C or SIGTERM, None otherwise; `how` says how to go on.
    `launched`: one of several processes a launcher started, which SIGTERMs the rest once one fails."""
    if isinstance(err, ImportError) and _pending:
        # Ctrl-C (or SIGTERM) cut an import in half and something swallowed it; the import that came next
        # failed for that ("cannot load module more than once per process", numpy's): the interruption's
        # doing, not a broken installation
        err = _pending[0]()
    if isinstance(err, HungUp):
        return EXIT_HUNG_UP, (f"stopped by SIGHUP (the terminal or ssh session closed; run long jobs under nohup, "
                              f"tmux or a scheduler); {how}.")
    if isinstance(err, Terminated):
        if launched:
            return EXIT_TERMINATED, (f"stopped by SIGTERM (kill, scancel, preemption, or the launcher stopping every "
                                     f"process once one of them has failed: if one did, its own message says why); "
                                     f"{how}.")
        return EXIT_TERMINATED, f"stopped by SIGTERM (kill, scancel or preemption); {how}."
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"interrupted; {how}."
    return None
