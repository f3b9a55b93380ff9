"""`lmim bench quality`: does Latent MIM learn semantics, and does it beat pixel MAE?

On Fashion-MNIST (the Debian package `dataset-fashion-mnist`), the same small ViT (the
`quickstart` preset: 4 px patches, 8 x 8 grid, 1 px patch gap, 16 of 64 patches visible), the
same training subset and the same wall-clock training budget per method on the CPU:

    random   the initial weights every method starts from (no pretraining)
    lmim     Latent MIM: patch InfoNCE against an EMA target (model.objective=infonce)
    mae      pixel-reconstruction MAE in the same framework (model.objective=mae)
    naive    latent MSE with joint online/target training, no EMA (model.objective=naive_mse)
    pixels   the raw (resized, normalised) pixels, no encoder

Each is evaluated on the same splits with the same tools (`train.evaluate`): k-NN by the paper's
protocol (leave-one-out 1-NN, cosine, test split) and the common weighted 20-NN (train split as
memory bank), a linear probe (train -> test), and the collapse diagnostic (mean cosine between the
mean-pooled latents of different test images; about 1.0 = collapsed).

Equal wall-clock budgets: the trainer has a step limit, not a time limit, so the step time of
each objective is measured first (in this process, the methods interleaved so that load changes
on a shared machine hit all alike) and sets its `max_steps` (and `epochs`, so the lr/EMA
schedules end with the budget). Objectives differ in cost
per step (MAE has no target encoder), so they get different numbers of steps: that is the point
of an equal-time comparison. The table lists the steps each one got.

    lmim bench quality                       # 10k train / 2k test, 5 min of training per method (CPU)
    lmim bench quality --budget-minutes 2    # quicker, noisier
    lmim bench quality --large               # GPU: full 60k / 10k, 10 min per method, bf16
    lmim bench quality --json                # last line: one JSON object keyed by method
    lmim bench quality --set data.num_visible=8 --methods lmim,mae   # an ablation: any config key
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import model  # noqa: F401  (torchvision shim before timm)

METHODS = ("random", "lmim", "mae", "naive", "pixels")
OBJECTIVES = {"lmim": "infonce", "mae": "mae", "naive": "naive_mse"}
PRESET = "quickstart"
INSTALL_HINT = "install it with `apt-get install -y dataset-fashion-mnist` (it puts the IDX files in /usr/share/datasets/fashion-mnist/)"


class BenchError(RuntimeError):
    """Something the user must fix, in one sentence."""


@dataclass
class Setting:
    """One benchmark size."""

    name: str
    train_per_class: int
    test_per_class: int
    budget_minutes: float
    overrides: list[str] = field(default_factory=list)
    eval_device: str = "cpu"
    calib_rounds: int = 3


def small_setting(budget_minutes: float) -> Setting:
    return Setting("cpu", train_per_class=1000, test_per_class=200, budget_minutes=budget_minutes,
                   overrides=["device=cpu", "precision=no"])


def large_setting(budget_minutes: float) -> Setting:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return Setting("large", train_per_class=6000, test_per_class=1000, budget_minutes=budget_minutes,
                   overrides=["device=auto", "precision=bf16" if dev == "cuda" else "precision=no",
                              "data.batch_size=256", "data.num_threads=8", "data.shuffle_buffer=4096"],
                   eval_device=dev, calib_rounds=5)


def _say(msg: str) -> None:
    print(f"[bench quality] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
def prepare_data(work: Path, setting: Setting, seed: int = 0) -> dict[str, str]:
    """Fashion-MNIST subsets as class-folder PNGs, then lmim shards; reused when already built."""
    from tools import datasets

    if not datasets.fashion_mnist_available():
        raise BenchError(f"Fashion-MNIST is not installed: {INSTALL_HINT}.")
    from tools.shard import build_dataset

    urls: dict[str, str] = {}
    for split, per_class in (("train", setting.train_per_class), ("test", setting.test_per_class)):
        name = f"fmnist-{split}-{per_class}pc-s{seed}"
        shards = work / "data" / name
        urls[split] = str(shards)
        if (shards / "manifest.json").is_file():
            _say(f"reusing {shards}")
            continue
        raw = work / "data" / f"{name}-png"
        _say(f"writing {per_class * 10} Fashion-MNIST {split} images to {raw}")
        datasets.export_fashion_mnist(raw, split, per_class=per_class, seed=seed, overwrite=True)
        if shards.exists():
            shutil.rmtree(shards)  # no manifest: an unfinished build
        _say(f"sharding -> {shards}")
        build_dataset(str(raw), str(shards), shard_max_samples=2000, workers=1, seed=seed, progress=False)
        shutil.rmtree(raw)
    return urls


# ----------------------------------------------------------------------------- training
def _pretrain(run_dir: Path, overrides: list[str], log: Path) -> float:
    """`python -m train.pretrain --config quickstart ...` in a subprocess; returns its wall time."""
    cmd = [sys.executable, "-m", "train.pretrain", "--config", PRESET, *overrides, f"run_dir={run_dir}"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise BenchError(f"pretraining failed (exit {proc.returncode}); see {log}: {' | '.join(tail)}")
    return time.perf_counter() - t0


def calibrate(objectives: dict[str, str], cfg, rounds: int = 3, steps: int = 3,
              device: torch.device | str = "cpu") -> dict[str, float]:
    """Seconds per optimizer step of each objective, measured in this process, interleaved.

    The methods take turns (A B C A B C ...) and the median per method is kept, so a load change
    on a shared machine hits all of them alike; the trainer's own step (forward, backward, AdamW,
    EMA update) is reproduced on a batch of the training shape. Data loading is left out: the
    trainer overlaps it with compute (its logged `data_wait_share` is a few %).
    """
    from omegaconf import OmegaConf

    from model import LatentMIM

    mcfg = OmegaConf.to_object(cfg.model)
    b, g = int(cfg.data.batch_size), mcfg.grid_size
    size = g * (mcfg.patch_size + mcfg.patch_gap)
    k = int(cfg.data.num_visible)
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    images = torch.randn(b, mcfg.in_chans, size, size, generator=gen).to(dev)
    order = torch.rand(b, g * g, generator=gen).argsort(1)
    visible, target = order[:, :k].contiguous().to(dev), order[:, k:].contiguous().to(dev)
    amp = dev.type == "cuda" and cfg.precision == "bf16"
    nets, opts = {}, {}
    for name, objective in objectives.items():
        nets[name] = LatentMIM(dataclasses.replace(mcfg, objective=objective)).to(dev).train()
        opts[name] = torch.optim.AdamW(nets[name].param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))

    def step(name: str) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = nets[name](images, visible, target, metrics=False)
        out["loss"].backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        nets[name].update_target(0.99)

    times: dict[str, list[float]] = {n: [] for n in objectives}
    for name in objectives:
        step(name)  # warm-up: allocator, lazy init
    for _ in range(rounds):
        for name in objectives:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / steps)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def train_method(method: str, base: list[str], work: Path, setting: Setting, steps_per_epoch: int,
                 step_s: float) -> dict[str, Any]:
    """Train `method` for the budget (steps = budget / calibrated step time); checkpoint and what it got."""
    budget_s = setting.budget_minutes * 60
    max_steps = max(1, int(budget_s / step_s))
    epochs = max(1, math.ceil(max_steps / steps_per_epoch))
    _say(f"{method}: {step_s:.2f} s/step calibrated -> {max_steps} steps ({max_steps / steps_per_epoch:.1f} epochs) "
         f"in {setting.budget_minutes:g} min")
    run_dir = work / "runs" / method
    shutil.rmtree(run_dir, ignore_errors=True)
    wall = _pretrain(run_dir, base + [f"epochs={epochs}", f"max_steps={max_steps}", "checkpoint.every_steps=0",
                                      "checkpoint.keep=1", "progress=false", "log_every=20"],
                     work / "logs" / f"train-{method}.log")
    from train.checkpoint import latest_checkpoint
    from train.observe import read_metrics

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise BenchError(f"{method} left no checkpoint in {run_dir}; see {work / 'logs'}.")
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
    last = recs[-1] if recs else {}
    return {"checkpoint": str(ckpt), "steps": max_steps, "epochs": round(max_steps / steps_per_epoch, 2),
            "calib_s_per_step": round(step_s, 3), "train_wall_s": round(wall, 1),
            "train_collapse_cos": last.get("collapse_cos"), "final_loss": last.get("loss")}


# ----------------------------------------------------------------------------- evaluation
def _features(encoder, url: str, data_cfg, device, token_sim: bool = False) -> dict:
    from train.evaluate.features import eval_loader, extract

    loader = eval_loader(encoder, url, data_cfg, batch_size=256, device="cpu")
    try:
        return extract(encoder, loader, device, token_sim=token_sim)
    finally:
        close = getattr(loader, "close", None)
        if close:
            close()


@torch.no_grad()
def _pixels(encoder, url: str, data_cfg) -> dict:
    """The eval images themselves (one grey channel, flattened), sorted by key like `extract`."""
    from train.evaluate.features import eval_loader

    feats, labels, keys = [], [], []
    loader = eval_loader(encoder, url, data_cfg, batch_size=256, device="cpu")
    try:
        for b in loader:
            feats.append(b.images[:, 0].flatten(1).float().cpu())
            labels.append(b.labels.cpu())
            keys += list(b.keys)
    finally:
        close = getattr(loader, "close", None)
        if close:
            close()
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return {"mean_patch": torch.cat(feats)[order], "labels": torch.cat(labels)[order]}


def evaluate(tr: dict, te: dict, device, *, collapse: bool = True) -> dict[str, Any]:
    """The benchmark's figures for one feature set (train and test splits)."""
    from train.evaluate.collapse import collapse_stats
    from train.evaluate.knn import knn_loo1, knn_weighted
    from train.evaluate.linear import linear_probe

    f_tr, y_tr, f_te, y_te = tr["mean_patch"], tr["labels"], te["mean_patch"], te["labels"]
    out: dict[str, Any] = {
        "knn_loo1": round(knn_loo1(f_te, y_te, device=device), 2),
        "knn20": round(knn_weighted(f_tr, y_tr, f_te, y_te, k=20, T=0.07, device=device), 2),
        "linear": round(linear_probe(f_tr, y_tr, f_te, y_te, device=device), 2),
    }
    if collapse:
        stats = collapse_stats(f_te, te.get("token_sim"))
        out["collapse_cos"] = round(stats["collapse_cos"], 4)
        out["token_sim"] = round(stats.get("token_sim", float("nan")), 4)
        out["effective_rank"] = round(stats["effective_rank"], 1)
    return out


# ----------------------------------------------------------------------------- report
def _table(results: dict[str, dict], meta: dict) -> str:
    from train.evaluate.knn import PROTOCOL_LOO1, knn_weighted_protocol
    from train.evaluate.linear import linear_protocol

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = f"{'method':<8} {'steps':>6} {'epochs':>6} {'kNN-LOO1':>9} {'kNN-20':>7} {'linear':>7} {'collapse':>9} {'tok-sim':>8} {'eff-rank':>8}"
    lines = [head, "-" * len(head)]
    for m in METHODS:
        r = results.get(m)
        if r is None:
            continue
        lines.append(f"{m:<8} {f(r.get('steps'), 'd'):>6} {f(r.get('epochs'), '.1f'):>6} {r['knn_loo1']:>9.2f} "
                     f"{r['knn20']:>7.2f} {r['linear']:>7.2f} {f(r.get('collapse_cos'), '.4f'):>9} "
                     f"{f(r.get('token_sim'), '.4f'):>8} {f(r.get('effective_rank'), '.1f'):>8}")
    lines += [
        "",
        f"kNN-LOO1 = {PROTOCOL_LOO1}; kNN-20 = {knn_weighted_protocol(20, 0.07)};",
        f"linear = {linear_protocol(100)}; all top-1 % on {meta['n_test']} test images, {meta['n_train']} train.",
        "collapse = mean cosine between mean-pooled patch latents of different test images (~1.0: collapsed);",
        "tok-sim = mean cosine between patch tokens of the same image; eff-rank = effective rank of pooled features.",
        f"budget {meta['budget_minutes']:g} min of training per method ({meta['setting']}), {meta['machine']}, {meta['date']}.",
    ]
    if meta.get("overrides"):
        lines.append(f"config: the {meta['preset']} preset with {' '.join(meta['overrides'])}.")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmim bench quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="training minutes per method (default 5 on the CPU, 10 with --large)")
    p.add_argument("--large", action="store_true", help="the GPU setting: full 60k/10k splits, larger batches, bf16")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    p.add_argument("--work-dir", default="runs/bench-quality", help="data (reused), runs and logs go here")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--train-per-class", type=int, default=None, help="training images per class (default 1000; 6000 with --large)")
    p.add_argument("--test-per-class", type=int, default=None, help="test images per class (default 200; 1000 with --large)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training config override for every trained method (repeatable), e.g. data.num_visible=8 "
                   "for an ablation; recorded in the JSON's meta")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"lmim bench quality: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.",
              file=sys.stderr)
        return 2
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        print("lmim bench quality: --budget-minutes must be positive.", file=sys.stderr)
        return 2
    setting = (large_setting(args.budget_minutes or 10.0) if args.large
               else small_setting(args.budget_minutes or 5.0))
    for name in ("train_per_class", "test_per_class"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                print(f"lmim bench quality: --{name.replace('_', '-')} must be at least 1.", file=sys.stderr)
                return 2
            setattr(setting, name, value)
    work = Path(args.work_dir)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    from train.config import ConfigError

    try:
        return _run(args, setting, methods, work)
    except (BenchError, ConfigError) as exc:
        print(f"lmim bench quality: {exc}", file=sys.stderr)
        return 2


def _run(args, setting: Setting, methods: list[str], work: Path) -> int:
    from accelerate.utils import set_seed
    from omegaconf import OmegaConf

    from model import LatentMIM
    from pipeline.manifest import read_manifest
    from train.config import effective_batch_size, load_config

    t_start = time.perf_counter()
    load_config(PRESET, [*setting.overrides, *args.overrides])  # a bad --set fails before any work
    urls = prepare_data(work, setting, args.seed)
    base = [*setting.overrides, f"data.url={urls['train']}", f"seed={args.seed}", "eval.knn_every_epochs=0",
            *args.overrides]
    cfg = load_config(PRESET, base)
    batch = effective_batch_size(cfg, 1)
    n_train = read_manifest(urls["train"]).total_samples
    n_test = read_manifest(urls["test"]).total_samples
    steps_per_epoch = n_train // batch
    data_cfg = OmegaConf.to_object(cfg.data)
    device = torch.device(setting.eval_device)

    # The initial weights every method starts from: the trainer seeds with cfg.seed, then builds the model.
    set_seed(args.seed)
    init_encoder = LatentMIM(OmegaConf.to_object(cfg.model)).encoder.eval()

    trained = {m: OBJECTIVES[m] for m in methods if m in OBJECTIVES}
    step_s: dict[str, float] = {}
    if trained:
        _say(f"calibrating the step time of {', '.join(trained)} (interleaved, in this process)")
        step_s = calibrate(trained, cfg, rounds=setting.calib_rounds, device=setting.eval_device)

    results: dict[str, dict] = {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "pixels":
            tr, te = _pixels(init_encoder, urls["train"], data_cfg), _pixels(init_encoder, urls["test"], data_cfg)
            results[method] = evaluate(tr, te, device, collapse=False)
            _say(f"pixels: {results[method]} ({time.perf_counter() - t0:.0f} s)")
            continue
        info: dict[str, Any] = {}
        if method == "random":
            encoder = init_encoder
            info = {"steps": 0, "epochs": 0.0}
        else:
            info = train_method(method, base + [f"model.objective={OBJECTIVES[method]}"], work, setting,
                                steps_per_epoch, step_s[method])
            from tools.export import load_encoder

            encoder = load_encoder(info["checkpoint"])
        encoder.to(device)
        tr = _features(encoder, urls["train"], data_cfg, device)
        te = _features(encoder, urls["test"], data_cfg, device, token_sim=True)
        results[method] = {**evaluate(tr, te, device), **info}
        _say(f"{method}: { {k: results[method][k] for k in ('knn_loo1', 'knn20', 'linear', 'collapse_cos')} } "
             f"({time.perf_counter() - t0:.0f} s)")

    meta = {
        "setting": setting.name, "budget_minutes": setting.budget_minutes, "n_train": n_train, "n_test": n_test,
        "preset": PRESET, "overrides": list(args.overrides), "batch": batch, "seed": args.seed,
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s)"
                   + (f", {torch.cuda.get_device_name()}" if setting.eval_device == "cuda" else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    print(_table(results, meta))
    if args.json:
        out: dict[str, Any] = {m: results[m] for m in methods}
        if "lmim" in results and "mae" in results and results["mae"]["linear"] > 0:
            out["ratio"] = round(results["lmim"]["linear"] / results["mae"]["linear"], 4)
            out["ratio_is"] = "lmim linear probe / mae linear probe"
        out["meta"] = meta
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
