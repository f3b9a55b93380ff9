"""The precision and thread choices the trainer makes from the machine's capabilities.

The choice functions are pure (capabilities in, decision out), so every machine kind is tested
here whatever this machine is; one test runs the trainer to check the choice reaches Accelerate.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lmim.train.config import ConfigError, load_config
from lmim.train.hardware import (
    _cgroup_cpu_limit,
    available_cores,
    bf16_runs_natively,
    choose_precision,
    core_share,
    cpu_has_native_bf16,
    describe_machine,
    plan_threads,
)

ZEN3 = frozenset("fpu sse2 avx avx2 fma".split())                       # no AVX-512
ZEN4 = frozenset("avx2 avx512f avx512bw avx512vl avx512_bf16".split())  # native bf16
SKYLAKE = frozenset("avx2 avx512f avx512bw avx512vl avx512dq".split())  # AVX-512 but bf16 emulated
SAPPHIRE = frozenset("avx2 avx512f avx512_bf16 amx_tile amx_bf16".split())
GRAVITON3 = frozenset("fp asimd sve bf16".split())


@pytest.mark.parametrize("flags, native", [(ZEN3, False), (ZEN4, True), (SKYLAKE, False), (SAPPHIRE, True),
                                           (GRAVITON3, True), (frozenset(), False)])
def test_native_bf16_needs_bf16_instructions_not_just_avx512(flags, native):
    assert cpu_has_native_bf16(flags) is native


@pytest.mark.parametrize("hardware, onednn, max_isa, native", [
    (True, True, None, True),
    (True, True, "avx512_core_bf16", True),
    (True, True, "ALL", True),
    (True, True, "AVX512_CORE", False),   # oneDNN capped below bf16: its own check still says yes
    (True, False, "AVX2", False),         # torch's oneDNN check says no
    (False, True, None, False),           # AVX-512 without bf16 instructions (Skylake)
])
def test_native_bf16_needs_the_instructions_and_a_onednn_allowed_to_use_them(hardware, onednn, max_isa, native):
    assert bf16_runs_natively(hardware, onednn, max_isa) is native


def test_auto_follows_what_torch_reports_of_the_cpu_not_only_its_flags():
    """ONEDNN_MAX_CPU_ISA=AVX2 keeps torch's bf16 GEMMs off the bf16 instructions (emulated, slow) on a
    CPU whose /proc/cpuinfo lists avx512_bf16: auto must then pick fp32. A real torch, in a child process."""
    import subprocess
    import sys

    code = ("from lmim.train.hardware import resolve_precision as r; "
            "print(r('auto', on_cuda=False).precision); print(r('auto', on_cuda=False).reason)")
    env = {**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    capped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert capped.returncode == 0, capped.stderr[-2000:]
    precision, reason = capped.stdout.strip().splitlines()
    assert precision == "no"
    if cpu_has_native_bf16():   # a CPU with bf16: the log names the cap, not the CPU, as the reason
        assert "ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA=AVX2" in reason, reason


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_bf16_with_it():
    assert choose_precision("auto", on_cuda=False, cpu_bf16=False).precision == "no"
    assert choose_precision("auto", on_cuda=False, cpu_bf16=True).precision == "bf16"
    assert "no native bf16" in choose_precision("auto", on_cuda=False, cpu_bf16=False).reason


def test_auto_on_a_gpu_follows_its_bf16_support_and_never_picks_fp16():
    assert choose_precision("auto", on_cuda=True, cuda_bf16=True).precision == "bf16"
    assert choose_precision("auto", on_cuda=True, cuda_bf16=False).precision == "no"


def test_explicit_bf16_is_honoured_but_warned_about_where_it_is_emulated():
    slow = choose_precision("bf16", on_cuda=False, cpu_bf16=False)
    assert slow.precision == "bf16" and slow.warning and "precision=auto" in slow.warning
    assert choose_precision("bf16", on_cuda=False, cpu_bf16=True).warning is None
    assert choose_precision("bf16", on_cuda=True, cuda_bf16=True).warning is None
    for p in ("no", "fp16"):
        assert choose_precision(p, on_cuda=True, cuda_bf16=True).precision == p


def test_auto_is_the_default_and_a_valid_choice():
    assert load_config(None, []).precision == "auto"
    assert load_config(None, ["precision=fp32"]).precision == "no"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["precision=fp8"])


@pytest.mark.parametrize("cores, want, loader", [(1, 2, 1), (2, 2, 2), (2, 8, 2), (4, 2, 2), (16, 8, 8), (64, 2, 2),
                                                 (4, 0, 1)])
def test_cpu_thread_plan_gives_the_model_every_core_and_the_loader_at_most_one_thread_per_core(cores, want, loader):
    plan = plan_threads(cores, want, model_on_cpu=True)
    assert plan.torch_threads == cores
    assert plan.loader_threads == loader
    assert f"{loader} for the loader" in plan.reason


def test_gpu_thread_plan_gives_the_loader_all_but_one_core():
    plan = plan_threads(16, 8, model_on_cpu=False)
    assert (plan.torch_threads, plan.loader_threads) == (1, 8)
    assert plan_threads(4, 8, model_on_cpu=False).loader_threads == 3


def test_cgroup_quota_caps_the_cores(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_limit(tmp_path) is None
    assert _cgroup_cpu_limit(tmp_path / "absent") is None
    assert 1 <= available_cores()


def test_a_quota_below_the_cgroup_root_counts_too(tmp_path: Path):
    """No cgroup namespace (a systemd service with CPUQuota=, a scheduler's job cgroup): the quota is
    on the process's own cgroup or an ancestor, not on the mount's root; the tightest applies."""
    root, proc = tmp_path / "cgroup", tmp_path / "self_cgroup"
    job = root / "system.slice" / "train.service"
    job.mkdir(parents=True)
    proc.write_text("0::/system.slice/train.service\n")
    assert _cgroup_cpu_limit(root, proc) is None
    (job / "cpu.max").write_text("300000 100000\n")
    assert _cgroup_cpu_limit(root, proc) == 3.0
    (root / "system.slice" / "cpu.max").write_text("200000 100000\n")   # the parent is tighter
    assert _cgroup_cpu_limit(root, proc) == 2.0
    # cgroup v1: the cpu controller's own hierarchy, mounted as cpu,cpuacct on many distributions
    v1 = root / "cpu,cpuacct" / "slurm" / "job_7"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("12:cpu,cpuacct:/slurm/job_7\n0::/\n")
    assert _cgroup_cpu_limit(root, proc) == 0.5


_LAUNCH_ENV = ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION")


@pytest.fixture
def sixteen_cores(monkeypatch):
    """A 16-core node without a cgroup quota, and no launcher's variables: the launch is set per test."""
    import lmim.train.hardware as hardware

    monkeypatch.setattr(hardware, "_affinity_cores", lambda: 16)
    monkeypatch.setattr(hardware, "_cgroup_cpu_limit", lambda: None)
    for key in _LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_the_node_s_cores_are_divided_among_its_training_processes(sixteen_cores):
    assert core_share()[0] == 16
    sixteen_cores.setenv("LOCAL_WORLD_SIZE", "2")
    cores, why = core_share()
    assert cores == 8 and "shared by 2 processes" in why


@pytest.mark.parametrize("launcher", [
    {"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2"},   # torchrun --nproc_per_node 2
    {"ACCELERATE_MIXED_PRECISION": "no"},                        # accelerate launch, one GPU process
])
def test_the_launchers_default_omp_num_threads_1_does_not_starve_the_process(sixteen_cores, launcher):
    """torchrun and `accelerate launch` export OMP_NUM_THREADS=1 when the user set none; as a cap it
    left every rank one core, and a GPU's DALI loader one thread, on a node of 16."""
    for key, value in launcher.items():
        sixteen_cores.setenv(key, value)
    sixteen_cores.setenv("OMP_NUM_THREADS", "1")
    cores, why = core_share()
    assert cores == 16 // int(launcher.get("LOCAL_WORLD_SIZE", "1"))
    assert "OMP_NUM_THREADS=1 ignored" in why
    assert plan_threads(cores, 8, model_on_cpu=False).loader_threads == min(8, cores - 1)   # was 1


def test_an_omp_num_threads_someone_chose_caps_the_share(sixteen_cores):
    sixteen_cores.setenv("OMP_NUM_THREADS", "1")                 # no launcher: the user's own 1
    assert core_share() == (1, "16 in this process's CPU affinity, OMP_NUM_THREADS=1")
    sixteen_cores.setenv("TORCHELASTIC_RUN_ID", "none")          # torchrun --nproc_per_node 1 sets no OMP:
    sixteen_cores.setenv("LOCAL_WORLD_SIZE", "1")                # a 1 there is the user's
    assert core_share()[0] == 1
    sixteen_cores.setenv("TORCHELASTIC_RUN_ID", "none")
    sixteen_cores.setenv("LOCAL_WORLD_SIZE", "2")
    sixteen_cores.setenv("OMP_NUM_THREADS", "4")                 # under torchrun, a value it never sets
    assert core_share()[0] == 4
    sixteen_cores.setenv("OMP_NUM_THREADS", "12")                # above the share: the share holds
    assert core_share()[0] == 8


def test_describe_machine_names_the_cpu_and_its_bf16():
    line = describe_machine("cpu")
    assert line.startswith("CPU ") and "bf16" in line and " core" in line


def test_the_trainer_applies_and_reports_its_precision_and_thread_choice(tmp_path: Path, capsys):
    import torch

    from tests.test_train import _run
    from lmim.train.hardware import resolve_precision

    before = torch.get_num_threads()
    try:
        out = _run(tmp_path / "r", "precision=auto", "threads=1", "epochs=1")
        assert out["precision"] == resolve_precision("auto", on_cuda=False).precision
        assert out["threads"]["torch"] == 1 and torch.get_num_threads() == 1
        assert 1 <= out["threads"]["loader"] <= max(1, out["threads"]["cores"])
        printed = capsys.readouterr().out
        assert "precision=auto:" in printed and "threads:" in printed and "allocator:" in printed
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads"):
        load_config(None, ["threads=0"])


def test_more_model_threads_than_cores_is_said(tmp_path: Path, capsys, monkeypatch):
    """threads=N above the process's share of the cores was taken silently (oversubscribed pools)."""
    import torch

    import lmim.train.pretrain as pretrain
    from tests.test_train import _run

    monkeypatch.setattr(pretrain, "core_share", lambda: (1, "a share of 1 core"))
    before = torch.get_num_threads()
    try:
        _run(tmp_path / "r", "threads=2", "max_steps=1")
    finally:
        torch.set_num_threads(before)
    assert "warning: threads=2 is more than the 1 core(s)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, device", [
    (["--device", "cuda:1"], "cuda:1"), (["--device=cuda:0", "--json"], "cuda:0"), (["--device", "cuda"], "cuda"),
    (["--device", "cpu"], "cpu"), ([], "cpu"), (["--large"], "cuda"), (["--rounds", "2", "--device"], "cpu"),
    (["--dev", "cuda:1"], "cuda:1"), (["--devi=cuda"], "cuda"), (["--depth", "cuda"], "cpu"),
])
def test_the_bench_machine_line_names_the_device_the_run_measures(argv, device):
    """`--device cuda:1` and `--device=cuda:0` named the CPU in the machine line (only `cuda` and
    `--device=cuda` were recognised), so a GPU figure could be filed as a CPU one."""
    from lmim.tools.bench.cli import bench_device

    assert bench_device(argv) == device
