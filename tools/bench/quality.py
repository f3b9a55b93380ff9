"""`lmim bench quality`: does Latent MIM learn semantics, and does it beat pixel MAE?

The same small ViT (the `quickstart` preset), the same training data and the same budget per
method, on one of two data sets:

    fashion_mnist  Fashion-MNIST (the Debian package `dataset-fashion-mnist`): 60k train / 10k
                   test grey silhouettes. Here the pixels *are* the semantics (raw-pixel k-NN is
                   about 85%), so a pixel target aims straight at what the evaluation measures.
    shapes         `lmim.tools.shapes`: 10 shape classes cut out of real photo textures on other photo
                   textures, random position, scale, rotation and colour (20k train / 5k test,
                   32 px, generated from the seed). Colour and texture are nuisance; only the
                   shape is the class. This is the kind of data the paper's claim is about.

Rows (each evaluated by the same tools on the same splits):

    random      the initial weights every method starts from (no training)
    lmim        Latent MIM: patch InfoNCE against an EMA target (model.objective=infonce)
    mae         pixel-reconstruction MAE in the same framework (model.objective=mae)
    naive       latent MSE with joint online/target training, no EMA (model.objective=naive_mse)
    supervised  the same ViT trained with the labels for the same budget: the ceiling
    pixels      the raw (normalised) pixels, no encoder

Budgets: `--equal images` (the default; the fair comparison of objectives whose step costs
differ) gives every trained method the same number of training images; `--equal time` gives each
the same wall-clock minutes, from its step time measured first in this process (the methods
interleaved so that load changes hit all alike). The table lists the images each method saw.

Evaluation: the full test split as queries and the full training split as the k-NN memory bank
and linear-probe training set (Fashion-MNIST: 60k/10k, comparable with published raw-pixel
baselines): weighted 20-NN (T = 0.07), the paper's leave-one-out 1-NN on the test split, a
linear probe, and the collapse diagnostics. Self-supervised methods train on the training
split's images (no labels) through `lmim pretrain`; the supervised ceiling trains in-process.
With both lmim and mae among the methods, the JSON's `ratio` = Latent MIM's linear-probe top-1 /
pixel MAE's (higher is better; `ratio_is` says so too).

    lmim bench quality --dataset shapes                  # equal images, ~25 min on 2 CPU cores
    lmim bench quality --dataset fashion_mnist --equal time --budget-minutes 4
    lmim bench quality --large                           # GPU: more images, bf16
    lmim bench quality --json                            # last line: one JSON object keyed by method
    lmim bench quality --set data.num_visible=8 --methods lmim,mae   # an ablation: any config key
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmim.tools.argtypes import HelpFormatter, positive_float, positive_int
from lmim.train.hardware import describe_machine

DATASETS = ("fashion_mnist", "shapes")
METHODS = ("random", "lmim", "mae", "naive", "supervised", "pixels")
OBJECTIVES = {"lmim": "infonce", "mae": "mae", "naive": "naive_mse"}
TRAINED = ("lmim", "mae", "naive", "supervised")
PRESET = "quickstart"
INSTALL_HINT = "install it with `apt-get install -y dataset-fashion-mnist` (it puts the IDX files in /usr/share/datasets/fashion-mnist/)"
# Images per split (per class); None = the whole split. Shapes are generated, so their size is a choice.
SPLITS: dict[str, tuple[int | None, int | None]] = {"fashion_mnist": (None, None), "shapes": (2000, 500)}
SHAPES_SIZE = 32   # px: the quickstart geometry (8 x 8 grid of 4 px patches) with no resize


class BenchError(RuntimeError):
    """Something the user must fix, in one sentence."""


@dataclass
class Setting:
    """One benchmark size."""

    name: str
    equal: str                      # "images" | "time"
    images: int                     # per trained method, --equal images
    budget_minutes: float           # per trained method, --equal time
    train_per_class: int | None = None
    test_per_class: int | None = None
    overrides: list[str] = field(default_factory=list)
    eval_device: str = "cpu"
    calib_rounds: int = 3


def small_setting(equal: str, images: int | None, budget_minutes: float | None) -> Setting:
    # 128k images: about 5 min of Latent MIM training on 2 CPU cores at the quickstart size.
    return Setting("cpu", equal, images or 128_000, budget_minutes or 5.0, overrides=["device=cpu", "precision=no"])


def large_setting(equal: str, images: int | None, budget_minutes: float | None) -> Setting:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return Setting("large", equal, images or 3_000_000, budget_minutes or 10.0,
                   overrides=["device=auto", "precision=bf16" if dev == "cuda" else "precision=no",
                              "data.batch_size=256", "data.num_threads=8"],
                   eval_device=dev, calib_rounds=5)


def _say(msg: str) -> None:
    print(f"[bench quality] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
def _export(dataset: str, raw: Path, split: str, per_class: int | None, seed: int) -> None:
    if dataset == "fashion_mnist":
        from lmim.tools import datasets

        datasets.export_fashion_mnist(raw, split, per_class=per_class, seed=seed, overwrite=True)
    else:
        from lmim.tools import shapes

        shapes.export_shapes(raw, split, per_class=per_class, seed=seed, size=SHAPES_SIZE, overwrite=True)


def _channel_stats(dataset: str, per_class: int | None, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images (the normalisation every method uses)."""
    import numpy as np

    if dataset == "fashion_mnist":
        from lmim.tools import datasets

        x = datasets.load_fashion_mnist("train")[0].astype(np.float64) / 255.0
        return [float(x.mean())] * 3, [float(x.std())] * 3
    from lmim.tools import shapes

    x = shapes.render_shapes(per_class, "train", seed=seed, size=SHAPES_SIZE)[0].astype(np.float64) / 255.0
    return x.mean((0, 1, 2)).tolist(), x.std((0, 1, 2)).tolist()


def prepare_data(work: Path, dataset: str, setting: Setting, seed: int = 0) -> dict[str, Any]:
    """Both splits as class-folder images, then lmim shards; reused when already built.

    Returns {"train": url, "test": url, "mean": [3], "std": [3]}.
    """
    if dataset == "fashion_mnist":
        from lmim.tools import datasets

        if not datasets.fashion_mnist_available():
            raise BenchError(f"Fashion-MNIST is not installed: {INSTALL_HINT}.")
    from lmim.tools.shard import build_dataset

    default_tr, default_te = SPLITS[dataset]
    per = {"train": setting.train_per_class or default_tr, "test": setting.test_per_class or default_te}
    out: dict[str, Any] = {}
    for split in ("train", "test"):
        name = f"{dataset}-{split}-{per[split] or 'all'}pc-s{seed}"
        shards = work / "data" / name
        out[split] = str(shards)
        if (shards / "manifest.json").is_file():
            _say(f"reusing {shards}")
            continue
        raw = work / "data" / f"{name}-png"
        _say(f"writing the {dataset} {split} split to {raw}")
        _export(dataset, raw, split, per[split], seed)
        if shards.exists():
            shutil.rmtree(shards)  # no manifest: an unfinished build
        _say(f"sharding -> {shards}")
        build_dataset(str(raw), str(shards), shard_max_samples=5000, workers=1, seed=seed, progress=False)
        shutil.rmtree(raw)
    stats = work / "data" / f"{dataset}-{per['train'] or 'all'}pc-s{seed}-stats.json"
    if not stats.is_file():
        mean, std = _channel_stats(dataset, per["train"], seed)
        stats.write_text(json.dumps({"mean": mean, "std": std}))
    out |= json.loads(stats.read_text())
    return out


def load_split(url: str, data_cfg, grid: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split at evaluation geometry (resize + centre crop, normalised) and its label,
    in sample-key order: decoded once and shared by every method's evaluation."""
    from lmim.pipeline import build_loader

    loader = build_loader(dataclasses.replace(data_cfg, url=url, batch_size=512), grid_size=grid, patch_size=patch,
                          patch_gap=0, train=False, device="cpu", seed=0, url=url)
    images, labels, keys = [], [], []
    try:
        for b in loader:
            images.append(b.images.float().cpu())
            labels.append(b.labels.cpu())
            keys += list(b.keys)
    finally:
        loader.close()
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__))
    return torch.cat(images)[order], torch.cat(labels)[order]


# ----------------------------------------------------------------------------- training
def _pretrain(run_dir: Path, overrides: list[str], log: Path) -> float:
    """`python -m lmim.train.pretrain --config quickstart ...` in a subprocess; returns its wall time."""
    cmd = [sys.executable, "-m", "lmim.train.pretrain", "--config", PRESET, *overrides, f"run_dir={run_dir}"]
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
              device: torch.device | str = "cpu", steps_per_epoch: int = 1) -> dict[str, float]:
    """Seconds per optimizer step of each objective, measured in this process, interleaved.

    The methods take turns (A B C A B C ...) and the median per method is kept, so a load change
    on a shared machine hits all of them alike; each steps through the trainer's own `train_step`
    (forward, backward, clipping, AdamW, EMA update, with `cfg`'s schedules over
    `steps_per_epoch`) on a batch of the training shape. Data loading is left out: the trainer
    overlaps it with compute (its logged `data_wait_share` is a few %).
    """
    from omegaconf import OmegaConf

    from lmim.model import LatentMIM
    from lmim.pipeline.batch import Batch
    from lmim.train.step import local_stepper, train_step

    mcfg = OmegaConf.to_object(cfg.model)
    b, g = int(cfg.data.batch_size), mcfg.grid_size
    size = g * (mcfg.patch_size + mcfg.patch_gap)
    k = int(cfg.data.num_visible)
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    images = torch.randn(b, mcfg.in_chans, size, size, generator=gen).to(dev)
    order = torch.rand(b, g * g, generator=gen).argsort(1)
    batches = itertools.repeat(Batch(images, order[:, :k].contiguous().to(dev), order[:, k:].contiguous().to(dev)))
    amp = dev.type == "cuda" and cfg.precision == "bf16"
    steppers = {}
    for name, objective in objectives.items():
        net = LatentMIM(dataclasses.replace(mcfg, objective=objective)).to(dev).train()
        steppers[name] = local_stepper(cfg, net, steps_per_epoch=steps_per_epoch,
                                       autocast=torch.bfloat16 if amp else None)
    done = {n: 0 for n in objectives}   # each method's optimizer steps so far (its schedules' step)

    def step(name: str) -> None:
        train_step(steppers[name], batches, done[name])
        done[name] += 1

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


def calibrate_supervised(encoder: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg,
                         steps: int = 3, device: torch.device | str = "cpu") -> float:
    """Seconds per step of the supervised ceiling (a few steps after one of warm-up), on a copy."""
    from lmim.train.evaluate.supervised import train_supervised

    b = int(cfg.data.batch_size)
    n = int(labels.max()) + 1
    train_supervised(copy.deepcopy(encoder), images[:b], labels[:b], num_classes=n, images_seen=b, batch_size=b,
                     device=device)
    info = train_supervised(copy.deepcopy(encoder), images[: b * steps], labels[: b * steps], num_classes=n,
                            images_seen=b * steps, batch_size=b, device=device)
    return info["train_s"] / max(1, info["steps"])


def train_method(method: str, base: list[str], work: Path, max_steps: int, steps_per_epoch: int,
                 step_s: float | None) -> dict[str, Any]:
    """Train `method` with `lmim pretrain` for `max_steps` optimizer steps; its checkpoint and what it got."""
    epochs = max(1, math.ceil(max_steps / steps_per_epoch))
    calib = f"{step_s:.2f} s/step calibrated -> " if step_s else ""
    _say(f"{method}: {calib}{max_steps} steps ({max_steps / steps_per_epoch:.1f} epochs)")
    run_dir = work / "runs" / method
    shutil.rmtree(run_dir, ignore_errors=True)
    wall = _pretrain(run_dir, base + [f"epochs={epochs}", f"max_steps={max_steps}", "checkpoint.every_steps=0",
                                      "checkpoint.keep=1", "progress=false", "log_every=20"],
                     work / "logs" / f"train-{method}.log")
    from lmim.train.checkpoint import latest_checkpoint
    from lmim.train.observe import read_metrics

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise BenchError(f"{method} left no checkpoint in {run_dir}; see {work / 'logs'}.")
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
    last = recs[-1] if recs else {}
    return {"checkpoint": str(ckpt), "steps": max_steps, "epochs": round(max_steps / steps_per_epoch, 2),
            "train_wall_s": round(wall, 1), "train_collapse_cos": last.get("collapse_cos"),
            "final_loss": last.get("loss")}


# ----------------------------------------------------------------------------- evaluation
def _features(encoder: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device,
              token_sim: bool = False, chunk: int = 512) -> dict:
    from lmim.train.evaluate.features import extract

    batches = ((images[i:i + chunk], labels[i:i + chunk]) for i in range(0, len(labels), chunk))
    return extract(encoder, batches, device, token_sim=token_sim)


def evaluate(tr: dict, te: dict, device, *, collapse: bool = True) -> dict[str, Any]:
    """The benchmark's figures for one feature set (train split = memory bank / probe data, test = queries)."""
    from lmim.train.evaluate.collapse import collapse_stats
    from lmim.train.evaluate.knn import knn_loo1, knn_weighted
    from lmim.train.evaluate.linear import linear_probe

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
    from lmim.train.evaluate.knn import PROTOCOL_LOO1, knn_weighted_protocol
    from lmim.train.evaluate.linear import linear_protocol

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"{'method':<10} {'images':>9} {'steps':>6} {'epochs':>6} {'kNN-LOO1':>9} {'kNN-20':>7} {'linear':>7} "
            f"{'collapse':>9} {'tok-sim':>8} {'eff-rank':>8}")
    lines = [head, "-" * len(head)]
    for m in METHODS:
        r = results.get(m)
        if r is None:
            continue
        lines.append(f"{m:<10} {f(r.get('images_seen'), 'd'):>9} {f(r.get('steps'), 'd'):>6} "
                     f"{f(r.get('epochs'), '.1f'):>6} {r['knn_loo1']:>9.2f} {r['knn20']:>7.2f} {r['linear']:>7.2f} "
                     f"{f(r.get('collapse_cos'), '.4f'):>9} {f(r.get('token_sim'), '.4f'):>8} "
                     f"{f(r.get('effective_rank'), '.1f'):>8}")
    budget = (f"{meta['images']} training images per method" if meta["equal"] == "images"
              else f"{meta['budget_minutes']:g} min of training per method")
    lines += [
        "",
        f"kNN-LOO1 = {PROTOCOL_LOO1}; kNN-20 = {knn_weighted_protocol(20, 0.07)};",
        f"linear = {linear_protocol(100)}; all top-1 % on {meta['n_test']} {meta['dataset']} test images, "
        f"{meta['n_train']} train (memory bank and probe data).",
        "collapse = mean cosine between mean-pooled patch latents of different test images (~1.0: collapsed);",
        "tok-sim = mean cosine between patch tokens of the same image; eff-rank = effective rank of pooled features.",
        f"equal {meta['equal']}: {budget} ({meta['setting']}), {meta['machine']}, {meta['date']}.",
    ]
    if meta.get("overrides"):
        lines.append(f"config: the {meta['preset']} preset with {' '.join(meta['overrides'])}.")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmim bench quality", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dataset", choices=DATASETS, default="fashion_mnist", help="which data set (default fashion_mnist)")
    p.add_argument("--equal", choices=("images", "time"), default="images",
                   help="what every trained method gets the same amount of (default images)")
    p.add_argument("--images", type=positive_int, default=None,
                   help="training images per method with --equal images (default 128000; 3000000 with --large)")
    p.add_argument("--budget-minutes", type=positive_float, default=None,
                   help="training minutes per method with --equal time (default 5; 10 with --large)")
    p.add_argument("--large", action="store_true", help="the GPU setting: more images, larger batches, bf16")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    p.add_argument("--work-dir", default="runs/bench-quality", help="data (reused), runs and logs go here")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--train-per-class", type=positive_int, default=None,
                   help="training-split images per class (default: all of Fashion-MNIST's 6000; 2000 shapes)")
    p.add_argument("--test-per-class", type=positive_int, default=None,
                   help="test-split images per class (default: all of Fashion-MNIST's 1000; 500 shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training config override for every trained method (repeatable), e.g. data.num_visible=8 "
                   "for an ablation; recorded in the JSON's meta")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        what = f"unknown method(s) {', '.join(unknown)}" if unknown else "--methods names no method"
        print(f"lmim bench quality: {what}; choose from {', '.join(METHODS)}.", file=sys.stderr)
        return 2
    if args.large and args.equal == "images" and args.images is None:
        import torch

        if not torch.cuda.is_available():   # 3 million images per method on a CPU is days, not a benchmark
            print("lmim bench quality: --large is the GPU setting (3,000,000 images per method, bf16) and this "
                  "machine has no CUDA device; leave --large out, or add --images N to run it with N images.",
                  file=sys.stderr)
            return 2
    make = large_setting if args.large else small_setting
    setting = make(args.equal, args.images, args.budget_minutes)
    setting.train_per_class, setting.test_per_class = args.train_per_class, args.test_per_class
    work = Path(args.work_dir)
    from lmim.train.config import ConfigError

    try:
        return _run(args, setting, methods, work)
    except (BenchError, ConfigError) as exc:
        print(f"lmim bench quality: {exc}", file=sys.stderr)
        return 2


def _run(args, setting: Setting, methods: list[str], work: Path) -> int:
    from accelerate.utils import set_seed
    from omegaconf import OmegaConf

    from lmim.model import LatentMIM
    from lmim.pipeline.format.manifest import read_manifest
    from lmim.train.config import effective_batch_size, load_config

    t_start = time.perf_counter()
    load_config(PRESET, [*setting.overrides, *args.overrides])  # a bad --set fails before any work
    (work / "logs").mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, args.dataset, setting, args.seed)
    vec = lambda v: "[" + ",".join(f"{x:.6f}" for x in v) + "]"  # noqa: E731
    base = [*setting.overrides, f"data.url={data['train']}", f"seed={args.seed}", "eval.knn_every_epochs=0",
            f"data.mean={vec(data['mean'])}", f"data.std={vec(data['std'])}", *args.overrides]
    cfg = load_config(PRESET, base)
    batch = effective_batch_size(cfg, 1)
    n_train = read_manifest(data["train"]).total_samples
    steps_per_epoch = max(1, n_train // batch)
    data_cfg = OmegaConf.to_object(cfg.data)
    mcfg = OmegaConf.to_object(cfg.model)
    device = torch.device(setting.eval_device)

    _say("decoding both splits once for evaluation")
    train_x, train_y = load_split(data["train"], data_cfg, mcfg.grid_size, mcfg.patch_size)
    test_x, test_y = load_split(data["test"], data_cfg, mcfg.grid_size, mcfg.patch_size)

    # The initial weights every method starts from: the trainer seeds with cfg.seed, then builds the model.
    set_seed(args.seed)
    init_encoder = LatentMIM(mcfg).encoder.eval()

    trained = {m: OBJECTIVES[m] for m in methods if m in OBJECTIVES}
    step_s: dict[str, float] = {}
    if setting.equal == "time" and (trained or "supervised" in methods):
        _say(f"calibrating the step time of {', '.join([*trained, *(['supervised'] if 'supervised' in methods else [])])}")
        if trained:
            step_s = calibrate(trained, cfg, rounds=setting.calib_rounds, device=setting.eval_device,
                               steps_per_epoch=steps_per_epoch)
        if "supervised" in methods:
            step_s["supervised"] = calibrate_supervised(init_encoder, train_x, train_y, cfg, device=device)

    def steps_for(method: str) -> int:
        if setting.equal == "images":
            return max(1, math.ceil(setting.images / batch))
        return max(1, int(setting.budget_minutes * 60 / step_s[method]))

    results: dict[str, dict] = {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "pixels":
            # Grey data sets carry one channel three times: keep one (same k-NN, a 3x smaller probe).
            pick = (lambda x: x[:, :1]) if args.dataset == "fashion_mnist" else (lambda x: x)  # noqa: E731
            tr = {"mean_patch": pick(train_x).flatten(1), "labels": train_y}
            te = {"mean_patch": pick(test_x).flatten(1), "labels": test_y}
            results[method] = {**evaluate(tr, te, device, collapse=False), "images_seen": 0}
            _say(f"pixels: {results[method]} ({time.perf_counter() - t0:.0f} s)")
            continue
        info: dict[str, Any] = {}
        if method == "random":
            encoder = init_encoder
            info = {"steps": 0, "epochs": 0.0, "images_seen": 0}
        elif method == "supervised":
            from lmim.train.evaluate.supervised import train_supervised

            encoder = copy.deepcopy(init_encoder)
            steps = steps_for(method)
            _say(f"supervised: {steps} steps ({steps * batch / n_train:.1f} epochs)")
            got = train_supervised(encoder, train_x, train_y, num_classes=int(train_y.max()) + 1,
                                   images_seen=steps * batch, batch_size=batch,
                                   crop_scale=tuple(cfg.data.crop_scale), seed=args.seed, device=device)
            info = {"steps": got["steps"], "epochs": round(got["steps"] / steps_per_epoch, 2),
                    "images_seen": got["images_seen"], "train_wall_s": round(got["train_s"], 1),
                    "final_loss": got["final_loss"]}
        else:
            steps = steps_for(method)
            info = train_method(method, base + [f"model.objective={OBJECTIVES[method]}"], work, steps,
                                steps_per_epoch, step_s.get(method))
            info["images_seen"] = steps * batch
            from lmim.tools.export import load_encoder

            encoder = load_encoder(info["checkpoint"])
        if method in step_s:
            info["calib_s_per_step"] = round(step_s[method], 3)
        encoder.to(device)
        tr = _features(encoder, train_x, train_y, device)
        te = _features(encoder, test_x, test_y, device, token_sim=True)
        results[method] = {**evaluate(tr, te, device), **info}
        _say(f"{method}: { {k: results[method][k] for k in ('knn_loo1', 'knn20', 'linear', 'collapse_cos')} } "
             f"({time.perf_counter() - t0:.0f} s)")

    meta = {
        "dataset": args.dataset, "setting": setting.name, "equal": setting.equal, "images": setting.images,
        "budget_minutes": setting.budget_minutes, "n_train": len(train_y), "n_test": len(test_y),
        "preset": PRESET, "overrides": list(args.overrides), "batch": batch, "seed": args.seed,
        "machine": describe_machine(setting.eval_device),
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
