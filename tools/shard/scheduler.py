"""`lmim shard --part auto`: which part of a build this process is, from its scheduler's environment.

A pure function of the environment, so each scheduler's convention is one branch here:
- SLURM job arrays (`sbatch --array=0-7`, also with a step such as `0-14:2`):
  SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_MAX;
- Kubernetes indexed Jobs (`completionMode: Indexed`): JOB_COMPLETION_INDEX, with the part count
  in JOB_COMPLETIONS (Kubernetes does not export `spec.completions`, so the Job sets it; see
  docs/TRAINING.md);
- torchrun-style launchers: RANK and WORLD_SIZE.
The first convention whose variables are present wins, in that order.
"""
from __future__ import annotations

from typing import Mapping

from lmim.tools.shard.errors import BuildError

__all__ = ["part_from_environment"]

_NONE_FOUND = ("--part auto found no scheduler in the environment (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX "
               "with JOB_COMPLETIONS, or RANK with WORLD_SIZE); run it as a SLURM array task or an indexed Job, "
               "or give --part i/N")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise BuildError(f"--part auto: {name}={env[name]!r} is not an integer") from None


def _checked(i: int, n: int, source: str) -> tuple[int, int]:
    if n < 1 or not 0 <= i < n:
        raise BuildError(f"--part auto: {source} gives part {i} of {n}, which is out of range")
    return i, n


def _slurm(env: Mapping[str, str]) -> tuple[int, int]:
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    count = _int(env, "SLURM_ARRAY_TASK_COUNT") if "SLURM_ARRAY_TASK_COUNT" in env else None
    lo = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    hi = _int(env, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else None
    if count is None:
        if hi is None:
            raise BuildError("--part auto: SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor "
                             "SLURM_ARRAY_TASK_MAX is; give --part i/N")
        count = hi - lo + 1
    hi = lo + count - 1 if hi is None else hi
    # `--array=lo-hi:step` numbers tasks lo, lo+step, ...: part = (task - lo) / step
    step = (hi - lo) // (count - 1) if count > 1 else 1
    if step < 1 or (task - lo) % step or lo + step * (count - 1) != hi:
        raise BuildError(f"--part auto: the SLURM array {lo}-{hi} with {count} tasks is not evenly spaced; "
                         "use --array=0-{N-1} or give --part i/N")
    return _checked((task - lo) // step, count, f"SLURM array task {task} ({lo}-{hi}, {count} tasks)")


def part_from_environment(env: Mapping[str, str]) -> tuple[int, int]:
    """(i, N) of this process from `env` (normally `os.environ`).

    Raises:
        BuildError: no scheduler's variables are set, or they are inconsistent (one sentence).
    """
    if "SLURM_ARRAY_TASK_ID" in env:
        return _slurm(env)
    if "JOB_COMPLETION_INDEX" in env:
        if "JOB_COMPLETIONS" not in env:
            raise BuildError("--part auto: JOB_COMPLETION_INDEX is set but not JOB_COMPLETIONS; set it in the Job "
                             "to the same number as spec.completions (docs/TRAINING.md)")
        return _checked(_int(env, "JOB_COMPLETION_INDEX"), _int(env, "JOB_COMPLETIONS"), "the indexed Job")
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(_int(env, "RANK"), _int(env, "WORLD_SIZE"), "RANK/WORLD_SIZE")
    raise BuildError(_NONE_FOUND)
