"""Every expected way a training run ends badly, as one sentence and one exit code.

`classify` is the single place that maps an exception to what the user reads; `lmim pretrain`
prints its sentence and exits with its code, and `status.json` records its kind and sentence, so
a scheduler, a person and a script all see the same thing.
"""
from __future__ import annotations

import errno
import os
import select
import sys
from dataclasses import dataclass

from lmim.pipeline.config import DataConfigError
from lmim.pipeline.errors import DataError, StoreUnreachable, store_client_credentials_error, store_client_network_error
from lmim.pipeline.storage import is_remote
from lmim.train.checkpoint import CheckpointError
from lmim.train.config import ConfigError
# Ctrl-C (130) and SIGTERM (143) live in the light train/signals.py (the dispatcher needs them before
# torch loads); re-exported here with the other codes.
from lmim.train.signals import (EXIT_INTERRUPTED, EXIT_TERMINATED, RUN_AGAIN, Terminated,  # noqa: F401
                                interruption, sigterm_interrupts)

# Exit codes, documented in docs/TRAINING.md ("When things go wrong").
EXIT_DIVERGED = 1      # the loss guard or the collapse guard stopped the run
EXIT_CONFIG = 2        # a bad setting (including an unwritable run_dir)
EXIT_CHECKPOINT = 3    # no checkpoint could be loaded
EXIT_DATA = 4          # the dataset cannot be used as promised
EXIT_STORAGE = 5       # the object store is unreachable or refuses access
EXIT_DISK = 6          # the local disk is full, read-only or not writable
EXIT_PEER = 7          # another process of a multi-process launch stopped, breaking a collective this one was in
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool whose output's reader went away
EXIT_UNEXPECTED = 70   # a bug: the traceback is the message

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (`| head`); a BrokenPipeError may also come
    from a socket to the store, which is a storage failure."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so Python's own flush at exit stays quiet."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class TrainingError(RuntimeError):
    """The run stopped for a reason the user must act on (non-finite loss, collapse with action=stop)."""


@dataclass(frozen=True)
class Failure:
    code: int
    kind: str       # "diverged" | "config" | "checkpoint" | "data" | "storage" | "disk" | "peer" | "interrupted" | "bug"
    sentence: str
    expected: bool = True

    @property
    def status(self) -> str:
        """What status.json says of a run that ended this way."""
        return "interrupted" if self.kind == "interrupted" else "failed"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


@dataclass(frozen=True)
class Rerun:
    """How the user picks up after a stop that loses nothing, and what a write without a file name was writing:
    a training run resumes from its checkpoints, the other commands are simply run again."""
    how: str
    output: str
    storage_options: str | None  # where the user sets the store's endpoint and credentials besides AWS_*; None: nowhere
    data_code: int         # a dataset that cannot be used: the trainer's own code; the other commands' bad input


TRAINING_RUN = Rerun("rerun with resume=auto (it goes on from the last complete checkpoint, if one was written)",
                     "the run folder", "data.storage_options", EXIT_DATA)
ONE_COMMAND = Rerun(RUN_AGAIN, "the output", "--storage-option", EXIT_CONFIG)
# `lmim export` and `lmim bench ...` take no storage options: only the AWS_* environment reaches their store
ENVIRONMENT_ONLY = Rerun(RUN_AGAIN, "the output", None, EXIT_CONFIG)


def _besides_env(rerun: Rerun, joiner: str) -> str:
    """The alternative to the AWS_* environment this command offers, as a sentence fragment, or nothing."""
    return f"{joiner}{rerun.storage_options}" if rerun.storage_options else ""


# What gloo says (its TCP transport, named in the message) when the other end of a collective has gone
# away, its process exited or killed, or the network to it failed: the collective fails at once with
# one of these. NCCL reports a remote failure as "remote process exited or there was a network
# error", though a lost NCCL peer more often ends in its watchdog aborting the process.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "remote process exited or there was a network error")
_COLLECTIVE_TRANSPORTS = ("gloo/transport", "NCCL")


def peer_gone(err: BaseException) -> str | None:
    """What the collective library said, when `err` (or the error it was raised from: `__cause__`, not
    an error that merely was being handled) is a collective that broke because another process of the
    launch or the network to it went away; None otherwise."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e) if isinstance(e, RuntimeError) else ""
        transport = next((t for t in _COLLECTIVE_TRANSPORTS if t in text), None)
        fragment = next((f for f in _PEER_GONE if f in text), None)
        if transport and fragment:
            return f"{transport.split('/')[0]}: {fragment.lower()}"
        e = e.__cause__
    return None


def classify(err: BaseException, rerun: Rerun = TRAINING_RUN, *, launched: bool = False) -> Failure:
    """What the user reads for `err`: one sentence naming the thing and what to do (`rerun` says how to go on).
    `launched`: this is one process of several started by a launcher (torchrun, accelerate launch),
    which stops them all with SIGTERM once one has failed."""
    interrupted = interruption(err, rerun.how, launched=launched)
    if interrupted is not None:
        return Failure(interrupted[0], "interrupted", interrupted[1])
    if (gone := peer_gone(err)) is not None:
        return Failure(EXIT_PEER, "peer",
                       f"another process of this launch stopped, or the network to it failed, while this one was "
                       f"exchanging data with it ({gone}); the other process's own message (above, or in its log) "
                       f"says why, if it had one to say: fix that, then {rerun.how}.")
    if isinstance(err, BrokenPipeError) and stdout_closed():
        return Failure(EXIT_CLOSED_PIPE, "interrupted",
                       f"stopped: the reader of the output went away (e.g. `| head`); {rerun.how}.")
    if isinstance(err, TrainingError):
        return Failure(EXIT_DIVERGED, "diverged", _one_line(err))
    if isinstance(err, (ConfigError, DataConfigError)):  # DataConfigError: a data.* value that needs the data to check
        return Failure(EXIT_CONFIG, "config", _one_line(err))
    if isinstance(err, CheckpointError):
        return Failure(EXIT_CHECKPOINT, "checkpoint",
                       f"{_one_line(err)} Point resume= at another checkpoint, or move the damaged one away.")
    if isinstance(err, StoreUnreachable):
        return Failure(EXIT_STORAGE, "storage", f"the data store cannot be reached: {_one_line(err)}")
    if isinstance(err, DataError):
        return Failure(rerun.data_code, "data", f"the data cannot be read: {_one_line(err)}")
    if (cred := store_client_credentials_error(err)) is not None:
        return Failure(EXIT_STORAGE, "storage",
                       f"the data store client found no usable credentials ({_one_line(cred)}): set "
                       f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE{_besides_env(rerun, ' or ')}, "
                       f"then {rerun.how}.")
    if not isinstance(err, OSError) and (net := store_client_network_error(err)) is not None:
        return Failure(EXIT_STORAGE, "storage",
                       f"the data store cannot be reached ({_one_line(net)}): check the endpoint (AWS_ENDPOINT_URL"
                       f"{_besides_env(rerun, ' or ')}) and the network, then {rerun.how}.")
    if isinstance(err, OSError):
        where = str(err.filename) if err.filename else rerun.output
        if err.errno in _DISK_ERRNOS:
            return Failure(EXIT_DISK, "disk",
                           f"cannot write {where} ({err.strerror}): free some space or fix the disk, then {rerun.how}.")
        if isinstance(err, PermissionError) and (not err.filename or is_remote(where)):
            return Failure(EXIT_STORAGE, "storage",
                           f"the data store refused access ({_one_line(err)}): check the credentials "
                           f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE{_besides_env(rerun, ', or ')}) "
                           "and the bucket policy.")
        if isinstance(err, PermissionError):
            return Failure(EXIT_DISK, "disk", f"permission denied on {where}: fix its permissions or choose another path.")
        if isinstance(err, (ConnectionError, TimeoutError)):
            return Failure(EXIT_STORAGE, "storage",
                           f"the data store cannot be reached ({_one_line(err)}): check the endpoint and the network, "
                           f"then {rerun.how}.")
        return Failure(EXIT_DISK, "disk", f"I/O error on {where} ({type(err).__name__}: {_one_line(err)}): check that "
                       "the path is where it should be and can be written (a folder, not a file), or choose another.")
    return Failure(EXIT_UNEXPECTED, "bug", f"unexpected {type(err).__name__}: {_one_line(err)} (a bug; please report "
                   "it with the traceback printed above, also kept in run_dir/logs/error.log once the run folder "
                   "exists)", expected=False)
