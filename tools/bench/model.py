"""`lmim bench model`: FLOPs per image by part, and the training step against a plain eager step.

    lmim bench model                       # CPU: small config, ours vs plain eager fp32, + FLOPs table
    lmim bench model --config vit_b16 --flops-only
    lmim bench model --config vit_b16 --device cuda --batch-size 256 --compile   # GPU: images/s, MFU
    lmim bench model --config ref_small --num-visible 7 --batch-size 128 --precision fp32 --reference ~/LatentMIM

A step = the trainer's `train_step` (forward + backward + clipping + AdamW step + EMA target
update; lr and EMA momentum from the default training config's schedules), on a batch already on
the device.
Baseline: the same model, eager fp32, timm's non-fused (explicit softmax) attention, per-parameter
AdamW (foreach=False) and a per-parameter Python EMA loop. Ours: the model's own kernels (SDPA or
the explicit form per model/attention.py; oneDNN fp32 linear layers on the CPU, model/cpu_linear.py), the
trainer's AdamW (fused where torch has a kernel: CUDA and CPU), one `_foreach_lerp_` EMA call, and bf16 autocast where it is faster (on a CPU
with native bf16 both fp32 and bf16 are measured and the faster is kept, on other CPUs fp32 only; on CUDA bf16). Timings alternate
baseline / ours over several rounds; medians are quoted. `ratio` = baseline step time / ours.
On CUDA the MFU is the model FLOPs per image (FlopCounterMode) x images/s over the bf16 matmul
peak measured in the same run.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lmim.model.config import ModelConfig
from lmim.pipeline.batch import Batch
from lmim.tools.argtypes import HelpFormatter, device_name as device_argument, positive_int
from lmim.train.allocator import keep_freed_memory
from lmim.train.config import load_config
from lmim.train.hardware import describe_machine, resolve_precision
from lmim.train.schedules import Schedules
from lmim.train.step import Stepper, make_optimizer, train_step

CONFIGS: dict[str, dict] = {
    # A small ViT a 2-core CPU can step a few times a second.
    "small": dict(arch="vit_tiny_patch16_224", embed_dim=192, depth=6, num_heads=3, patch_size=8, grid_size=8,
                  patch_gap=2, projector_hidden_dim=768, decoder_dim=128, decoder_depth=2, decoder_num_heads=4),
    # The reference code's small recipe (the side-by-side in docs/BENCHMARKS.md): 32 px, 4 px
    # patches, no gap; use with --num-visible 7 --batch-size 128.
    "ref_small": dict(arch="vit_tiny_patch16_224", embed_dim=192, depth=6, num_heads=3, patch_size=4, grid_size=8,
                      patch_gap=0, projector_hidden_dim=1024, decoder_dim=128, decoder_depth=2, decoder_num_heads=16),
    # The quickstart preset's model (train/configs/quickstart.yaml); use with --num-visible 16 --batch-size 128.
    "quickstart": dict(arch="vit_tiny_patch16_224", embed_dim=96, depth=4, num_heads=3, patch_size=4, grid_size=8,
                       patch_gap=0, projector_hidden_dim=384, decoder_dim=96, decoder_depth=2, decoder_num_heads=3),
    # For smoke tests of this command.
    "tiny": dict(arch="vit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=2, patch_size=4, grid_size=4,
                 patch_gap=2, projector_hidden_dim=96, decoder_dim=32, decoder_depth=1, decoder_num_heads=4),
    # The reference configuration of the paper (the ModelConfig defaults).
    "vit_b16": dict(),
}
PARTS = ("online_encoder_fwd_bwd", "target_encoder_fwd", "target_encoder_fwd_bwd", "projectors", "decoder_fwd_bwd")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _naive_ema(net, momentum: float) -> None:
    """The per-parameter loop a first implementation writes (the baseline)."""
    with torch.no_grad():
        tgt, src = net.online_target_pairs()
        for t, s in zip(tgt, src):
            t.mul_(momentum).add_(s, alpha=1 - momentum)


def _plain_adamw(params, lr: float) -> torch.optim.AdamW:
    """The per-parameter AdamW loop (the baseline)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), foreach=False)


class Variant:
    """One way of running the training step (`train_step`), with its own copy of the model and optimizer."""

    def __init__(self, name: str, stepper: Stepper, device: torch.device):
        self.name, self.stepper, self.device = name, stepper, device
        self.times: list[float] = []
        self.warmup_s = 0.0
        self._step = 0  # the optimizer step, for the schedules' lr and EMA momentum

    def step(self, batch: Batch) -> None:
        # No diagnostics (their SVD syncs a GPU): the trainer computes them only on logged steps.
        train_step(self.stepper, iter((batch,)), self._step, metrics=False)
        self._step += 1

    def timed(self, batch: Batch, steps: int) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(batch)
        _sync(self.device)
        dt = (time.perf_counter() - t0) / steps
        self.times.append(dt)
        return dt


class ReferenceVariant(Variant):
    """The reference implementation's step (tools/bench/reference.py) as the baseline; its Stepper
    holds the reference model, its optimizer, the schedules and the autocast dtype."""

    def step(self, batch: Batch) -> None:
        from lmim.tools.bench.reference import reference_step

        s = self.stepper
        reference_step(s.net, s.optimizer, batch.images, s.schedules.momentum(self._step), s.autocast)
        self._step += 1


def reference_variant(repo: str, cfg: ModelConfig, ours: Variant, num_visible: int, precision: str,
                      device: torch.device) -> ReferenceVariant:
    """The authors' code at lmim's sizes, with the schedules' EMA momentum and lr."""
    from lmim.tools.bench.reference import build_reference, reference_optimizer

    enc = ours.stepper.net.encoder
    torch.manual_seed(0)
    net = build_reference(repo, cfg, num_visible, embed_dim=enc.embed_dim, depth=len(enc.blocks),
                          num_heads=enc.blocks[0].attn.num_heads).to(device).train()
    sched = ours.stepper.schedules
    stepper = Stepper(net, net, reference_optimizer(net, sched.lr(0)), sched,
                      autocast=torch.bfloat16 if precision == "bf16" else None)
    return ReferenceVariant(f"reference implementation ({precision})", stepper, device)


def build_variants(cfg: ModelConfig, device: torch.device, candidates: list[str], compile_: bool,
                   batch_size: int) -> list[Variant]:
    from timm.layers import set_fused_attn

    from lmim.model.cpu_linear import use_plain_linear
    from lmim.model.latent_mim import LatentMIM

    # The schedules (lr, EMA momentum) and clipping of the default training config; with no data
    # set to cover, one step per epoch. Their values set the lr and the momentum, not the cost.
    train_cfg = load_config(None)
    sched = Schedules.from_config(train_cfg, steps_per_epoch=1, effective_batch=batch_size)
    clip = train_cfg.optim.clip_grad
    torch.manual_seed(0)
    set_fused_attn(False)  # timm's explicit-softmax attention for the baseline
    try:
        base_net = use_plain_linear(LatentMIM(cfg)).to(device)  # torch's own F.linear (MKL on the CPU)
    finally:
        set_fused_attn(True)
    state = base_net.state_dict()
    baseline = Stepper(base_net, base_net, _plain_adamw(base_net.param_groups(0.05), 1e-4), sched, clip_grad=clip,
                       ema=functools.partial(_naive_ema, base_net))
    variants = [Variant("baseline (eager fp32)", baseline, device)]
    for cand in candidates:
        torch.manual_seed(0)
        net = LatentMIM(cfg).to(device)
        net.load_state_dict(state)
        opt = make_optimizer(net, train_cfg.optim, sched.lr(0))  # the trainer's
        runner = torch.compile(net) if compile_ else net
        ours = Stepper(runner, net, opt, sched, clip_grad=clip, autocast=torch.bfloat16 if cand == "bf16" else None)
        variants.append(Variant(f"ours ({cand}{', compiled' if compile_ else ''})", ours, device))
    return variants


def measure_peak_bf16(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 matmul throughput (FLOP/s) on `device`."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in header:
            t.add_column(h, justify="right" if h != header[0] else "left")
        for r in rows:
            t.add_row(*r)
        Console().print(t)
    except ImportError:  # rich is a dependency; keep a plain fallback for minimal installs
        print(title)
        for r in [header] + rows:
            print("  " + " | ".join(r))


def precision_candidates(requested: str, auto_pick: str, *, on_gpu: bool, side_by_side: bool) -> list[str]:
    """The precisions ("fp32" | "bf16") to time lmim's step in; `auto_pick` is what the trainer's
    `precision=auto` picks on this machine.

    auto: that pick on a GPU; on a CPU whose pick is bf16 (native bf16) both fp32 and bf16, else fp32
    only (emulated bf16 was 14x slower than fp32: timing it only makes the bench take minutes). Side
    by side with the reference, auto is the pick alone, and the reference runs in it too."""
    if requested != "auto":
        return [requested]
    if on_gpu or side_by_side or auto_pick == "fp32":
        return [auto_pick]
    return ["fp32", "bf16"]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lmim bench model", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None,
                    help="model size (default: small on cpu, vit_b16 on cuda)")
    ap.add_argument("--device", type=device_argument, default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--batch-size", type=positive_int, default=None, help="default: 32 on cpu, 256 on cuda")
    ap.add_argument("--num-visible", type=positive_int, default=None, help="visible patches (default: the paper's 20/196 ratio)")
    ap.add_argument("--steps", type=positive_int, default=None, help="timed steps per round (default 3 cpu / 20 cuda)")
    ap.add_argument("--rounds", type=positive_int, default=None, help="alternating baseline/ours rounds (default 5 cpu / 3 cuda)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (slow to compile on CPUs)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="auto: bf16 on CUDA; on the CPU fp32, and bf16 autocast too where the CPU has native "
                         "bf16; with --reference, the precision the trainer's precision=auto picks, for both sides")
    ap.add_argument("--no-baseline", action="store_true", help="time only ours (e.g. a baseline that does not fit)")
    ap.add_argument("--reference", metavar="DIR", default=None,
                    help="a checkout of github.com/yibingwei-1/LatentMIM: its training step, at the same sizes and "
                         "precision, is the baseline instead of the plain eager step")
    ap.add_argument("--flops-only", action="store_true", help="only count FLOPs (no timing)")
    ap.add_argument("--objective", default="infonce", choices=("infonce", "norm_l2", "mae", "naive_mse"))
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = ap.parse_args(argv)

    from lmim.model.flops import default_num_visible, flops_per_image
    from lmim.model.masks import random_masks

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("lmim bench model: --device cuda but no CUDA device is visible; run on a GPU machine or use --device cpu.",
              file=sys.stderr)
        return 2
    if args.reference:
        if args.no_baseline:
            ap.error("argument --no-baseline: --reference makes the reference code the baseline; leave one out")
        if args.objective != "infonce":
            ap.error(f"argument --objective: --reference times the authors' Latent MIM step (patch InfoNCE), so a "
                     f"ratio against lmim's {args.objective} step would compare two methods; leave --objective out")
        from lmim.tools.bench.reference import reference_problem

        problem = reference_problem(args.reference)
        if problem is not None:
            print(f"lmim bench model: {problem}", file=sys.stderr)
            return 2
    on_gpu = device.type == "cuda"
    name = args.config or ("vit_b16" if on_gpu else "small")
    cfg = ModelConfig(**CONFIGS[name], objective=args.objective)
    k = args.num_visible or default_num_visible(cfg)
    if k >= cfg.grid_size ** 2:
        print(f"lmim bench model: argument --num-visible: must be below the {cfg.grid_size ** 2} patches of the "
              f"{name} config, got {k}", file=sys.stderr)
        return 2
    bs = args.batch_size or (256 if on_gpu else 32)
    steps = args.steps or (20 if on_gpu else 3)
    rounds = args.rounds or (3 if on_gpu else 5)

    flops = flops_per_image(cfg, num_visible=k)
    rows = [[p, f"{flops[p] / 1e9:.3f}"] for p in PARTS if p in flops]
    rows.append(["total step (fwd+bwd)", f"{flops['total_step'] / 1e9:.3f}"])
    _table(f"FLOPs per image, {name} ({cfg.arch}, grid {cfg.grid_size}, {k} visible), GFLOP", ["part", "GFLOP"], rows)
    result: dict = {"config": name, "device": str(device), "objective": cfg.objective, "num_visible": k,
                    "gflop_per_image": {p: round(v / 1e9, 4) for p, v in flops.items()}}
    if args.flops_only:
        if args.json:   # FLOPs do not depend on the machine; named anyway, as every bench's JSON does
            print(json.dumps({**result, "machine": describe_machine(str(device))}))
        return 0

    allocator = None
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    else:
        # The trainer's CPU allocator settings (lmim.train.allocator), for every variant in this process.
        allocator = keep_freed_memory()
        print(allocator)
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    auto_pick = "fp32" if resolve_precision("auto", on_cuda=on_gpu).precision == "no" else "bf16"
    candidates = precision_candidates(args.precision, auto_pick, on_gpu=on_gpu, side_by_side=bool(args.reference))
    variants = build_variants(cfg, device, candidates, args.compile, bs)
    if args.reference:
        variants[0] = reference_variant(str(Path(args.reference).expanduser()), cfg, variants[1], k, candidates[0], device)
    if args.no_baseline:
        variants = variants[1:]
    side = cfg.grid_size * (cfg.patch_size + cfg.patch_gap)
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(bs, cfg.in_chans, side, side, generator=g).to(device)
    vis, tgt = random_masks(bs, cfg.grid_size**2, k, generator=g)
    batch = Batch(images, vis.to(device), tgt.to(device))

    for v in variants:  # warm-up (and compilation)
        t0 = time.perf_counter()
        for _ in range(2):
            v.step(batch)
        _sync(device)
        v.warmup_s = time.perf_counter() - t0
    for _ in range(rounds):  # alternate A B A B so machine noise hits all alike
        for v in variants:
            v.timed(batch, steps)

    med = {v.name: statistics.median(v.times) for v in variants}
    ours = min((v for v in variants if v.name.startswith("ours")), key=lambda v: med[v.name])
    base = next((v for v in variants if not v.name.startswith("ours")), None)
    rows = []
    for v in variants:
        ratio = f"{med[base.name] / med[v.name]:.2f}" if base else "-"
        rows.append([v.name, f"{med[v.name] * 1e3:.1f}", f"{bs / med[v.name]:.1f}", ratio])
    _table(f"Training step, {name}, batch {bs}, {device_name}, median of {rounds} rounds x {steps} steps",
           ["variant", "ms/step", "images/s", "speed-up vs baseline"], rows)
    result.update({
        "device_name": device_name, "batch_size": bs, "steps": steps, "rounds": rounds,
        "ours_variant": ours.name, "ours_step_s": med[ours.name], "images_per_s": bs / med[ours.name],
        "variants_step_s": med, "allocator": allocator,
    })
    if base is not None:
        result["baseline"] = base.name
        result["baseline_step_s"] = med[base.name]
        result["ratio"] = med[base.name] / med[ours.name]
    if on_gpu:
        peak = measure_peak_bf16(device)
        achieved = flops["total_step"] * bs / med[ours.name]
        result.update({"peak_bf16_tflops": peak / 1e12, "achieved_tflops": achieved / 1e12, "mfu": achieved / peak})
        print(f"MFU {achieved / peak:.1%}: {achieved / 1e12:.1f} TFLOP/s of a measured bf16 matmul peak "
              f"of {peak / 1e12:.1f} TFLOP/s ({device_name})")
    if args.json:
        print(json.dumps({**result, "machine": describe_machine(str(device))}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
