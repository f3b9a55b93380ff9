"""What the machine can do: native bf16, the cores this process may use, and one line naming it.

Figures measured on one machine are meaningless on another (bf16 autocast ran 1.37x faster than
fp32 on an Intel Xeon with AMX and 14x slower on an AMD EPYC without native bf16), so the trainer
picks its precision from here and every benchmark table prints `describe_machine()`.
"""

from __future__ import annotations

import functools
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# CPU flags (as /proc/cpuinfo spells them) that mean bf16 arithmetic in hardware. AVX-512 alone is
# not enough: oneDNN then emulates bf16 with integer shuffles, slower than fp32.
_BF16_FLAGS_X86 = ("avx512_bf16", "amx_bf16")
_BF16_FLAGS_ARM = ("bf16",)  # ARMv8.6 BF16 (Graviton3, Apple M2+ under Linux, Neoverse V1/N2)
_SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16", "sve")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model name", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether CPU feature flags (as /proc/cpuinfo spells them) include bf16 arithmetic."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in (*_BF16_FLAGS_X86, *_BF16_FLAGS_ARM))


# ONEDNN_MAX_CPU_ISA values that keep oneDNN (torch's bf16 GEMMs on the CPU) off the bf16 instructions
# even where the CPU has them: it then emulates bf16 (oneDNN's documented ISA names, lowest first).
_ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                       "AVX512_CORE_VNNI"})


def bf16_runs_natively(hardware_bf16: bool, onednn_bf16: bool, onednn_max_isa: str | None) -> bool:
    """bf16 on the CPU is fast only when the processor has bf16 instructions *and* torch's oneDNN may
    use them: torch reports the first (`torch.cpu`), oneDNN's own check the second (False, e.g., under
    ONEDNN_MAX_CPU_ISA=AVX2), and a cap at an AVX-512 level without bf16 leaves that check True while
    oneDNN emulates bf16, so the cap is read too."""
    capped = (onednn_max_isa or "").strip().upper() in _ONEDNN_ISAS_WITHOUT_BF16
    return hardware_bf16 and onednn_bf16 and not capped


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_native() -> bool:
    """What torch reports of this CPU and its oneDNN build: bf16 in hardware, usable by torch's kernels.

    x86: `torch.cpu`'s avx512_bf16 / AMX queries (cpuinfo, any OS); elsewhere (Arm) the /proc/cpuinfo
    `bf16` flag. Without torch (a tool that never trains) the flags alone decide.
    """
    try:
        import torch
    except ImportError:
        return cpu_has_native_bf16()
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        hardware = bool(probe()) or bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    else:
        hardware = cpu_has_native_bf16()
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: torch's own kernels, judged by the flags
        onednn = True
    return bf16_runs_natively(hardware, onednn, _onednn_cap())


def _onednn_cap() -> str | None:
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")   # oneDNN reads both names


def _bf16_held_back() -> str | None:
    """Why bf16 the CPU has in hardware is not used here (an ISA cap on oneDNN), for the log; else None."""
    cap = _onednn_cap()
    if cpu_has_native_bf16() and not cpu_bf16_is_native() and cap:
        return f"the CPU has bf16 but ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA={cap} keeps torch's oneDNN off it"
    return None


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str   # what Accelerate gets: "bf16" | "fp16" | "no"
    reason: str      # one sentence for the log
    warning: str | None = None  # set when an explicit choice is known to be slow here


# Measured on a 2-core AMD EPYC with AVX2 and no AVX-512 (issue 13): one step of the reference's small
# recipe (ViT 192 x 6, 32 px, batch 128) under bf16 autocast took 14x as long as in fp32 (19.4 s against 1.38 s).
_EMULATED_BF16_COST = "about 14x slower than fp32 in our measurement"


def choose_precision(requested: str, *, on_cuda: bool, cuda_bf16: bool = False,
                     cpu_bf16: bool = False) -> PrecisionChoice:
    """Resolve `precision` (auto | bf16 | fp16 | no) for the device the run will use.

    auto: bf16 autocast on a GPU that supports it (fp16 never: it needs loss scaling that an
    unattended default should not risk), on the CPU only with native bf16, fp32 otherwise.
    """
    if requested == "auto":
        if on_cuda:
            if cuda_bf16:
                return PrecisionChoice("bf16", "precision=auto: bf16 autocast, the GPU has bf16 in hardware")
            return PrecisionChoice("no", "precision=auto: fp32, the GPU has no bf16 in hardware (torch would emulate it)")
        if cpu_bf16:
            return PrecisionChoice("bf16", "precision=auto: bf16 autocast, the CPU has native bf16 (avx512_bf16/amx/bf16)")
        return PrecisionChoice("no", "precision=auto: fp32, the CPU has no native bf16 (bf16 would be emulated and slow)")
    label = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[requested]
    reason = f"precision={requested}: {label}, as configured"
    if requested == "bf16" and not on_cuda and not cpu_bf16:
        return PrecisionChoice("bf16", reason, warning=(
            f"precision=bf16 on a CPU without native bf16 ({cpu_model()}) is emulated, {_EMULATED_BF16_COST}; "
            "use precision=auto or precision=no."))
    return PrecisionChoice(requested, reason)


def resolve_precision(requested: str, on_cuda: bool) -> PrecisionChoice:
    """choose_precision with this machine's capabilities."""
    cuda_bf16 = False
    if on_cuda:
        import torch

        cuda_bf16 = cuda_bf16_is_native()
    choice = choose_precision(requested, on_cuda=on_cuda, cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16_is_native())
    held_back = None if on_cuda else _bf16_held_back()
    if held_back and choice.precision == "no" and requested == "auto":
        return PrecisionChoice("no", f"precision=auto: fp32, {held_back} (bf16 would be emulated and slow)")
    if held_back and choice.warning:
        return PrecisionChoice(choice.precision, choice.reason, warning=f"precision=bf16 here is emulated: {held_back}; "
                               f"{_EMULATED_BF16_COST}; use precision=auto or precision=no.")
    return choice


def cuda_bf16_is_native() -> bool:
    """bf16 in the current GPU's hardware (compute capability 8.0+): torch's plain is_bf16_supported()
    also says yes where bf16 is only emulated (V100, T4), which auto must not pick."""
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3: no emulation counted
        return bool(torch.cuda.is_bf16_supported())


# ---------------------------------------------------------------------------------------------- cores
def _own_cgroups(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup paths (v2 unified, v1 cpu controller) from /proc/self/cgroup; "/" when
    unknown (inside a container's own cgroup namespace both are "/")."""
    v2 = v1 = "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path or "/"
        elif "cpu" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _self_and_ancestors(base: Path, path: str) -> list[Path]:
    """base/path, then each parent folder up to base itself: a quota anywhere up the tree applies."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota_v2(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _quota_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs allowed by cgroup quotas (v2 `cpu.max`, or v1 CFS quota / period); None if unlimited.

    Looks at this process's own cgroup and every ancestor, not only the mount's root: without a
    cgroup namespace (a systemd service with CPUQuota=, a batch scheduler's job cgroup) the quota
    sits below the root. The tightest one applies.
    """
    v2_path, v1_path = _own_cgroups(proc_cgroup)
    limits = [q for d in _self_and_ancestors(root, v2_path) if (q := _quota_v2(d)) is not None]
    for mount in (root / "cpu", root / "cpu,cpuacct"):
        limits += [q for d in _self_and_ancestors(mount, v1_path) if (q := _quota_v1(d)) is not None]
    return min(limits) if limits else None


def count(n: int, noun: str) -> str:
    """'1 core', '2 cores'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _affinity_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup quota (containers)."""
    cores = _affinity_cores()
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


def local_processes() -> int:
    """Training processes sharing this machine (torchrun/accelerate set LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launcher_set_omp_default() -> bool:
    """Whether OMP_NUM_THREADS=1 is the launcher's default rather than anyone's choice: torchrun
    (`--nproc_per_node` > 1) and `accelerate launch` (on a GPU, or without `--num_cpu_threads_per_process`)
    export OMP_NUM_THREADS=1 into every process when it is not set. Taken as a cap it would leave one
    core per process (and one DALI thread to feed a GPU) on a node of dozens; the budget already
    divides the cores by the processes on the node, so that default is not a limit. (A user who
    wants one thread says `threads=1`.)"""
    env = os.environ
    # torchrun sets it only for more than one process on the node; `accelerate launch` whenever unset
    torchrun_default = "TORCHELASTIC_RUN_ID" in env and local_processes() > 1
    return (torchrun_default or "ACCELERATE_MIXED_PRECISION" in env) and env.get("OMP_NUM_THREADS", "").strip() == "1"


def core_share() -> tuple[int, str]:
    """This process's share of the cores, and what set it (for the start-up log): available_cores()
    over the node's training processes, capped by OMP_NUM_THREADS when someone chose it."""
    affinity, limit, procs = _affinity_cores(), _cgroup_cpu_limit(), local_processes()
    why = [f"{affinity} in this process's CPU affinity"]
    available = affinity
    if limit is not None and math.floor(limit) < affinity:   # available_cores()'s rule, its parts kept for the log
        why.append(f"cgroup CPU quota {limit:g}")
        available = max(1, math.floor(limit))
    cores = max(1, available // procs)
    if procs > 1:
        why.append(f"shared by {procs} processes on the node")
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if launcher_set_omp_default():
        why.append("OMP_NUM_THREADS=1 ignored (the launcher's default; threads=N sets the model's threads)")
    elif omp.isdigit() and int(omp) > 0 and int(omp) < cores:
        cores = int(omp)
        why.append(f"OMP_NUM_THREADS={omp}")
    return cores, ", ".join(why)


@dataclass(frozen=True)
class ThreadBudget:
    cores: int           # this process's share of the machine
    torch_threads: int   # intra-op threads for the model
    loader_threads: int  # DALI CPU threads (or DataLoader workers)
    reason: str


def plan_threads(cores: int, loader_threads: int, *, model_on_cpu: bool) -> ThreadBudget:
    """Split `cores` between the model and the loader.

    On a GPU the model needs one CPU thread to launch kernels and the loader gets `loader_threads`,
    at most the other cores.

    On the CPU the model keeps every core and the loader gets `loader_threads`, never more than
    there are cores. Splitting the cores strictly (model cores - loader) loses: on 2 cores the
    quickstart trainer made 235 images/s with 1 model + 1 loader thread against 356 with 2 + 1 and
    374 with 2 + 2 (ideal batches: 386; medians of 2, 2026-11-25), because every matmul wants all
    the cores. Decoding on as many threads as there are cores beats one thread: a decoding thread
    that takes a core from one model thread stalls every parallel region until that thread catches
    up, so the model loses the decode's wall time, and N threads decode a batch in 1/N of it. Small
    photos (80 px crops of 500 x 375 JPEGs), 2 cores, bf16, 4 alternating rounds: 385 images/s with
    2 + 2 against 350 with 2 + 1, higher in every round; the quickstart: 722 against 731 (noise).
    What must not happen is the loader asking for more threads than there are cores (DALI's
    default pool, or data.num_threads=8 on a 2-core VM): two busy pools on the same cores made a
    0.34 s step take 6-9 s.
    """
    cores = max(1, cores)
    want = max(1, loader_threads)
    if not model_on_cpu:
        loader = max(1, min(want, cores - 1))
        return ThreadBudget(cores, 1, loader, f"{count(cores, 'core')}: 1 for the GPU's host thread, {loader} for the loader")
    loader = min(want, cores)
    return ThreadBudget(cores, cores, loader,
                        f"{count(cores, 'core')}: {cores} for the model, {loader} for the loader (at most one per core)")


def describe_machine(device: str = "cpu") -> str:
    """One line naming the machine a figure came from: the GPU, or the CPU model and its relevant flags."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = device.split(":", 1)[1] if ":" in device else ""
            # GPU N as asked; one that is not there (or not a number) is the command's own error to say
            asked = index.isdigit() and int(index) < torch.cuda.device_count()
            index = int(index) if asked else torch.cuda.current_device()
            return f"GPU {torch.cuda.get_device_name(index)} (bf16 {'yes' if cuda_bf16_is_native() else 'no'})"
    flags = cpu_flags()
    shown = [f for f in _SHOWN_FLAGS if f in flags]
    bf16 = ("native bf16" if cpu_bf16_is_native() else
            f"native bf16 not used (oneDNN capped at {_onednn_cap()})" if _bf16_held_back() else "no native bf16")
    return f"CPU {cpu_model()}, {count(available_cores(), 'core')}, {bf16} (flags: {' '.join(shown) or 'none of note'})"
