"""Atomic, rotated checkpoints on top of `Accelerator.save_state` / `load_state`.

Layout of a run folder:

    run_dir/checkpoints/step_00001000/   complete checkpoints, newest kept `keep` of them
        model.safetensors                 LatentMIM state_dict() (online + EMA target), unwrapped keys
        optimizer.bin, scaler.pt          AdamW state, fp16 loss scaler (Accelerate)
        rng_state_{rank}.json             python / numpy / torch / cuda RNG of every process
        trainer_state.json                the trainer's counters (TrainState)
        loader_state.json                 every rank's data loader position
        config.yaml                       the full resolved config (lmim.tools.export reads its `model:` section)
        complete.json                     written last: step, sequence (the order checkpoints were written
                                          in), processes, time, size + checksum of every file
    run_dir/checkpoints/.tmp-step_...    a checkpoint being written (or one interrupted mid-write)

Writing goes to `.tmp-step_N` and is renamed to `step_N` only when every process has finished
and `complete.json` is on disk; a rename is atomic on POSIX file systems, so a reader never sees
a half-written `step_*`. `latest_checkpoint` only trusts `step_*` folders that hold
`complete.json`, so a run killed at any moment resumes from the newest checkpoint that was
finished. Deleting an old checkpoint renames it away first for the same reason.

Reading a checkpoint never runs code from it: the weights are safetensors, the trainer and loader
states and every process's RNG states JSON, and the optimizer file goes through
`torch.load(weights_only=True)` (Accelerate's loader: tensors and containers only). Accelerate's
own RNG pickle is replaced by the JSON file as it is written; one left in an older checkpoint is
read by Accelerate with weights_only=True too, and the JSON, when present, wins. Every file is checked against
the size and checksum (XXH3, as shards) recorded in `complete.json` before anything is loaded, so a damaged checkpoint
is refused with one sentence (and `resume=auto` falls back to the previous one) instead of being
half-loaded.

The run folder must be on a file system every process sees (a shared volume on multi-node runs),
since process 0 writes the model/optimizer and every process writes its own RNG state.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist

from lmim.pipeline.format.checksum import algorithm_of, checksum_of_file
from lmim.pipeline.storage import as_os_error, file_mode_for_new_files

__all__ = [
    "COMPLETE_MARKER",
    "unfinished_checkpoints",
    "CheckpointError",
    "load_checkpoint",
    "verify_checkpoint",
    "TrainState",
    "RankedState",
    "checkpoints_dir",
    "list_checkpoints",
    "latest_checkpoint",
    "is_complete",
    "remove_incomplete",
    "save_checkpoint",
    "install_unwrapped_model_hooks",
    "read_marker",
    "rng_untouched",
]

COMPLETE_MARKER = "complete.json"
_NAME = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
DAMAGED_PREFIX = "damaged-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, phrased as one sentence for the user."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are not what its marker recorded (missing, cut, other bytes) or whose
    marker is garbled: damage, as opposed to a read that failed or a state that does not fit this run."""


@dataclass
class TrainState:
    """The trainer's own counters, checkpointed through `register_for_checkpointing`."""

    step: int = 0                      # the schedules' position: lr, EMA, cadence, checkpoint names (moved on a rebase)
    updates: int = 0                   # optimizer steps over the run's whole life, resumes included (never moved back)
    micro_step: int = 0                # micro-batches (forward/backward passes) done
    images_seen: int = 0               # over all processes
    world_size: int = 1
    steps_per_epoch: int = 0           # of the run that saved it (0: unknown, a checkpoint of an older lmim)
    effective_batch: int = 0           # images per optimizer step, all processes (0: unknown)
    history: dict[str, Any] = field(default_factory=dict)  # small things worth keeping (last k-NN, ...)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checked before anything is set: a saved value of the wrong type would only fail steps later."""
        if not isinstance(state, dict):
            raise ValueError(f"trainer_state is a {type(state).__name__}, not an object")
        for key, value in state.items():
            want = dict if key == "history" else int
            if key not in self.__dataclass_fields__:
                raise ValueError(f"trainer_state has an unknown field {key!r}")
            if isinstance(value, bool) or not isinstance(value, want) or (want is int and value < (key == "world_size")):
                raise ValueError(f"trainer_state's {key!r} is {value!r}")
        for key, value in state.items():
            setattr(self, key, value)
        if "updates" not in state:  # a checkpoint of an older lmim: its step is the best count there is
            self.updates = self.step   # (short of the truth if that run was resumed on fewer steps per epoch)


class RankedState:
    """Makes a per-process stateful object (the data loader) checkpointable through Accelerate.

    Accelerate saves registered objects from process 0 only, but each process's loader has its own
    position (its own shards). `state_dict()` therefore gathers every process's state (a
    collective: Accelerate calls it on all processes) and `load_state_dict` picks this process's.
    """

    def __init__(self, obj: Any, rank: int, world_size: int):
        self.obj, self.rank, self.world_size = obj, rank, world_size

    def state_dict(self) -> dict[str, Any]:
        state = self.obj.state_dict()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            states: list[Any] = [None] * self.world_size
            dist.all_gather_object(states, state)
        else:
            states = [state]
        return {"world_size": self.world_size, "states": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["world_size"]
        if isinstance(saved, bool) or not isinstance(saved, int) or saved < 1 or \
                not isinstance(state["states"], list) or len(state["states"]) != saved or \
                not all(isinstance(st, dict) for st in state["states"]):
            raise ValueError(f"loader_state holds {len(state['states']) if isinstance(state['states'], list) else 'no'} "
                             f"process state(s) for world_size {saved!r}")
        if saved != self.world_size:
            # Relaunched on a different number of processes (a preempted job back smaller or larger):
            # the loader re-splits what the interrupted epoch had left over this run's processes.
            # When that cannot be exact, the loader's own load warns and moves to the next epoch boundary.
            elastic = getattr(self.obj, "load_elastic_state", None)
            if elastic is not None and elastic(state["states"]):
                return
        self.obj.load_state_dict(state["states"][self.rank % saved])


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    """A checkpoint folder is complete when its marker (written last, before the rename) exists."""
    path = Path(path)
    return bool(_NAME.match(path.name)) and (path / COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()


def _sequence(path: Path) -> int | None:
    """The order in which `path` was written among its run's checkpoints (`complete.json`'s
    `sequence`); 0 for a checkpoint of an older lmim (no sequence), None when the marker cannot be read."""
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    value = marker.get("sequence", 0) if isinstance(marker, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def unfinished_checkpoints(run_dir: str | Path) -> list[Path]:
    """`step_*` folders without their marker (or weights): a copy cut short, or a marker removed by
    hand (the trainer's own writes are in `.tmp-step_*` until complete). Never resumed from; named."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir() and not is_complete(p))


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first. Temp/partial folders are ignored.

    Oldest means written first, not the lowest step: a run resumed with fewer steps per epoch (more
    processes, a larger batch or grad_accum) moves its step counter back (`pretrain._rebase_steps`),
    so its new checkpoints can have lower steps than the ones it resumed from. A checkpoint whose
    marker cannot be read goes just after the readable ones whose weights were written before its
    own (file times), so that a damaged newest checkpoint is still tried first (and named) by
    resume=auto, and a damaged old one is rotated out first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p, _sequence(p)))
    readable = [(_weights_written_at(path), seq) for _, path, seq in found if seq is not None]

    def order(item: tuple[int, Path, int | None]) -> tuple[float, int]:
        step, path, seq = item
        if seq is None:
            written = _weights_written_at(path)
            before = [s for t, s in readable if t <= written]
            seq = max(before) + 0.5 if before else -0.5
        return seq, step

    return [(step, path) for step, path, _ in sorted(found, key=order)]


def _weights_written_at(path: Path) -> float:
    """When a checkpoint's weights were written (their file's time; the marker may be the damaged file)."""
    try:
        return (path / "model.safetensors").stat().st_mtime
    except OSError:
        return 0.0


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted writes/deletions (call on process 0 only). Returns what was removed."""
    root = checkpoints_dir(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove a folder so that no half-deleted copy ever looks like a checkpoint: rename, then delete."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def folder_bytes(path: Path) -> int:
    """The size of the files directly in `path` (a checkpoint folder is flat)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def set_aside_damaged(path: str | Path) -> Path:
    """Rename a damaged checkpoint `step_N` to `damaged-step_N` (`-2`, `-3`, ... when taken) and return
    the new path: out of `list_checkpoints`, so neither resumed from nor counted by rotation, yet kept
    for a person to inspect (a checksum mismatch may be a disk's fault worth seeing)."""
    path = Path(path)
    aside, n = path.with_name(f"{DAMAGED_PREFIX}{path.name}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{n}")
    path.rename(aside)
    _fsync_dir(path.parent)
    return aside


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able data (python, numpy, torch CPU and CUDA)."""
    import base64
    import random

    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    b64 = lambda t: base64.b64encode(t.cpu().numpy().tobytes()).decode()  # noqa: E731
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import base64
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    tensor = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Run the block, then put this process's RNGs (python, numpy, torch, CUDA) back as they were."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(accelerator, run_dir: str | Path, step: int, config_yaml: str, keep: int,
                    states: dict[str, Any] | None = None) -> Path:
    """Write a complete checkpoint atomically and rotate old ones. Call on every process.

    Args:
        accelerator: the run's `Accelerator` (models/optimizers prepared, objects registered).
        run_dir: the run folder; checkpoints go to `run_dir/checkpoints/step_{step:08d}`.
        step: optimizer steps done.
        config_yaml: the resolved config, written as `config.yaml` in the checkpoint.
        keep: how many complete checkpoints to keep (the newest).
        states: objects with state_dict() returning JSON-able data, saved as `{name}.json`
            (`trainer_state`, `loader_state`); state_dict() is called on every process (it may
            be a collective) and process 0 writes the file.

    Returns:
        The final checkpoint folder.
    """
    root = checkpoints_dir(run_dir)
    final = root / _step_name(step)
    tmp = root / f"{_TMP_PREFIX}{_step_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    gathered = {name: obj.state_dict() for name, obj in (states or {}).items()}
    try:
        accelerator.save_state(str(tmp))
        # Every process: its RNG as JSON in place of Accelerate's pickle (loading must not unpickle).
        rank = accelerator.process_index
        _write_json(tmp / f"rng_state_{rank}.json", rng_state())
        (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)
        if accelerator.is_main_process:
            (tmp / "config.yaml").write_text(config_yaml)
            for name, value in gathered.items():
                _write_json(tmp / f"{name}.json", value)
    except Exception as err:
        # The half-written folder goes (it holds no marker, so it was never a checkpoint, and on a
        # full disk its bytes are what the next attempt needs).
        shutil.rmtree(tmp, ignore_errors=True)
        raise as_os_error(err, tmp) from err
    # Every process's files (its RNG state) must be on disk before the marker declares the folder whole.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        mode = file_mode_for_new_files()   # safetensors writes its file 0600; the rest follow the umask
        for p in tmp.iterdir():
            if p.is_file():
                p.chmod(mode)
        files = {p.name: {"bytes": p.stat().st_size, "checksum": checksum_of_file(str(p))}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        sequence = 1 + max((_sequence(p) or 0 for _, p in list_checkpoints(run_dir)), default=0)
        marker = {"step": step, "sequence": sequence, "num_processes": accelerator.num_processes, "time": time.time(),
                  "files": files}
        _write_json(tmp / COMPLETE_MARKER, marker)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run ending where it started)
            _discard(final)
        tmp.rename(final)
        _fsync_dir(root)
        for _, old in list_checkpoints(run_dir)[:-keep]:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def install_unwrapped_model_hooks(accelerator) -> None:
    """Make `model.safetensors` hold the bare LatentMIM state_dict whatever wraps the model.

    Accelerate saves the prepared (possibly DistributedDataParallel / compiled) module's state
    dict, whose keys carry `module.` / `_orig_mod.` prefixes; `lmim.tools.export` and every other
    reader want the plain keys. The save hook swaps in the unwrapped state dict, and the load
    hook loads into the unwrapped module (it shares its parameters with the wrapper).
    """

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i, m in enumerate(models):
            weights[i] = accelerator.unwrap_model(m, keep_torch_compile=False).state_dict()

    def load_hook(models: list, input_dir: str) -> None:
        for i, m in enumerate(models):
            models[i] = accelerator.unwrap_model(m, keep_torch_compile=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def read_marker(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / COMPLETE_MARKER).read_text())


def verify_checkpoint(path: str | Path, only: tuple[str, ...] | None = None) -> None:
    """Check every file of a complete checkpoint against the sizes and checksums in its marker.

    Args:
        only: check these files alone (e.g. the weights, for an export); default all.

    Raises:
        CheckpointError: a file is missing, has another size or other bytes than when it was written.
    """
    path = Path(path)
    try:
        marker = read_marker(path)
    except OSError as err:   # a read that failed (EIO, ESTALE, ...): not proof of damage
        raise CheckpointError(f"checkpoint {path} has an unreadable {COMPLETE_MARKER} ({err}).") from None
    except ValueError as err:
        raise CheckpointDamaged(f"checkpoint {path} has an unreadable {COMPLETE_MARKER} ({err}).") from None
    files = marker.get("files", {}) if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(w, dict) and isinstance(w.get("bytes"), int) and isinstance(w.get("checksum", ""), str)
            for w in files.values()):
        raise CheckpointDamaged(f"checkpoint {path} has a {COMPLETE_MARKER} that is not what lmim writes "
                                "(an object listing each file's bytes and checksum).")
    for name, want in files.items():  # checkpoints older than the digests: no list
        if only is not None and name not in only:
            continue
        f = path / name
        if not f.is_file():
            raise CheckpointDamaged(f"checkpoint {path} is missing {name}.")
        try:
            size = f.stat().st_size
            expected = want.get("checksum")  # absent in markers that recorded sizes only
            changed = size == want["bytes"] and bool(expected) and checksum_of_file(str(f), algorithm_of(expected)) != expected
        except OSError as err:
            raise CheckpointError(f"checkpoint {path}: {name} cannot be read ({err.strerror or err}).") from None
        if size != want["bytes"]:
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {name} has {size} bytes, {want['bytes']} were "
                                    "written.")
        if changed:
            raise CheckpointDamaged(f"checkpoint {path} is damaged: the bytes of {name} changed since it was written.")


def _read_state(path: Path, index: int, name: str) -> Any:
    """A saved state: `{name}.json`, or (checkpoints of earlier versions) the pickle Accelerate wrote,
    read with weights_only=True so that it cannot run code."""
    f = path / f"{name}.json"
    if f.is_file():
        return json.loads(f.read_text())
    legacy = path / f"custom_checkpoint_{index}.pkl"
    if legacy.is_file():
        import torch

        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise CheckpointError(f"checkpoint {path} has no {name}.json.")


def load_checkpoint(accelerator, path: str | Path, states: dict[str, Any], *, verify: bool = True) -> None:
    """Load a checkpoint written by save_checkpoint into the prepared model/optimizer and `states`.

    Nothing in the folder can run code (see the module docstring); every file is verified first
    (`verify=False`: the caller has just done so with `verify_checkpoint`).

    Raises:
        CheckpointError: the checkpoint is damaged or cannot be read (one sentence naming it).
    """
    import pickle

    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        saved = {name: _read_state(path, i, name) for i, name in enumerate(states)}
        rng_file = path / f"rng_state_{accelerator.process_index}.json"
        rng = json.loads(rng_file.read_text()) if rng_file.is_file() else None
        accelerator.load_state(str(path))
        if rng is not None:
            set_rng_state(rng)
        for name, obj in states.items():
            obj.load_state_dict(saved[name])
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError,
            EOFError, pickle.UnpicklingError) as err:
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
            # torch's own text goes on to suggest weights_only=False, i.e. running the pickle's code
            raise CheckpointError(f"checkpoint {path} holds a pickle that is not plain tensors and numbers; lmim "
                                  "never unpickles anything else, since loading it could run code.") from err
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        # torch's load_state_dict says "Error(s) in loading state_dict for X:" first, the detail after it
        telling = [ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))]
        first = (telling or lines or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {first[:300]}).") from err
