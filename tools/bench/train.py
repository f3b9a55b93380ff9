"""`lmim bench train`: what the trainer costs on top of the model, and how long it waits for data.

    lmim bench train                       # CPU: trainer vs bare step, quickstart + a small photo config
    lmim bench train --json                # the same; the last line is one JSON object
    lmim bench train --device cuda         # GPU: ViT-B/16 steps/s, full trainer vs the bare model step

CPU (the machines everything must run on): the full trainer (`lmim.train.pretrain.run`) with the real
DALI loader, against the bare model step (`train_step` alone: the config's optimizer, schedules,
clipping and precision, one device-resident batch, no loader, logging or diagnostics) and, between
the two, the same trainer fed ideal device-resident batches (`data.loader=synthetic`: no decoding,
never waits). For each config the three alternate for `--repeats` rounds and medians are quoted:
`ratio` = the median over rounds of trainer-with-DALI images/s / bare-step images/s, each round's
runs taken together (1.0 = the trainer and its data cost nothing on top of the step; pairing
neighbouring runs keeps a slow minute of the machine from landing on one side only); the table
shows the rounds' lowest and highest ratio beside it. `loader_ratio` = DALI / ideal trainer (the
data's share of the gap), and the data-wait columns are the share of wall time blocked on the
loader. The JSON's top-level `ratio` is the lowest of the configs' (each config's is in `configs`,
with its `round_ratios`).
- "quickstart": the quickstart preset on Fashion-MNIST (28 px PNGs; digits without the package).
- "small photos": a small ViT (8 x 8 grid of 8 px patches, 2 px gap: 80 px crops) on 500 x 375
  real-photo JPEGs, closer to ImageNet's decode cost per pixel.

GPU (`--device cuda`): ViT-B/16 (the reference config, bf16) on device-resident batches, the full
trainer (config, Accelerate, schedules, EMA, metrics, logging) against a bare loop of the same
model step (the trainer's `train_step` without Accelerate: autocast bf16 forward + backward +
fused AdamW + EMA, the same config's schedules and clipping). `ratio` = trainer steps/s /
bare steps/s; 1 - ratio is the trainer's overhead (target: under 5%).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lmim.tools.argtypes import HelpFormatter, positive_int
from lmim.train.hardware import describe_machine

__all__ = ["main"]


def _train(preset: str, overrides: list[str]) -> dict[str, Any]:
    from lmim.train.config import load_config
    from lmim.train.pretrain import reset_accelerate_state, run

    reset_accelerate_state()
    cfg = load_config(preset, [
        "log_with=[]", "progress=false", "plots=false", "checkpoint.every_steps=0", "eval.knn_every_epochs=0",
        "data.eval_url=null", "checkpoint.keep=1", *overrides,
    ])
    summary = run(cfg)
    if summary["timing"] is None:
        raise RuntimeError("the run was too short to time; raise --steps.")
    return summary["timing"]


# ---------------------------------------------------------------------------------------------- CPU
def _quickstart_data(root: Path, dataset: str) -> tuple[str, list[str]]:
    from lmim.tools.quickstart import prepare_data

    data = prepare_data(root / "qs", dataset)
    m, s = data["mean"], data["std"]
    return data["dataset"], [f"data.url={data['train']}", f"data.mean=[{m},{m},{m}]", f"data.std=[{s},{s},{s}]"]


def _photo_data(root: Path, n: int) -> str:
    from lmim.tools.sample_images import write_photo_jpegs
    from lmim.tools.shard import build_dataset

    src, dst = root / "photos-src", root / "photos"
    write_photo_jpegs(src, n, num_classes=10, seed=0)
    build_dataset(str(src), str(dst), shard_max_samples=200, workers=2, seed=0, progress=False)
    return str(dst)


_PHOTO_BATCH = 64
_SMALL = [
    "model.arch=vit_tiny_patch16_224", "model.embed_dim=128", "model.depth=4", "model.num_heads=4",
    "model.patch_size=8", "model.grid_size=8", "model.patch_gap=2", "model.projector_hidden_dim=512",
    "model.decoder_dim=128", "model.decoder_depth=2", "model.decoder_num_heads=4", "data.num_visible=12",
    f"data.batch_size={_PHOTO_BATCH}", "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]",
    "data.num_threads=2",  # the default preset's loader threads (the quickstart preset's 1 is for 28 px PNGs)
]


def _cpu(args) -> dict[str, Any]:
    from lmim.train.config import load_config
    from lmim.train.meter import WARMUP_STEPS

    results: dict[str, Any] = {"device": "cpu", "threads": torch.get_num_threads(), "configs": {}}
    with tempfile.TemporaryDirectory(prefix="lmim-bench-train-") as tmp:
        root = Path(tmp)
        dataset, qs_data = _quickstart_data(root, args.dataset)
        photos = _photo_data(root, args.photos)
        configs = {
            f"quickstart ({dataset})": ("quickstart", qs_data),
            "small photos (80 px crops)": ("quickstart", [*_SMALL, f"data.url={photos}"]),
        }
        ideal = ["data.loader=synthetic", "synthetic_batches=1000"]
        for name, (preset, data_overrides) in configs.items():
            runs: dict[str, list[float]] = {"dali": [], "ideal": [], "bare": []}
            waits: dict[str, list[float]] = {"dali": [], "ideal": []}
            cfg = load_config(preset, [*data_overrides, *ideal])
            for r in range(args.repeats):
                for kind in ("dali", "ideal"):  # A B C A B C: the machine's noise hits all alike
                    extra = ideal if kind == "ideal" else ["data.loader=dali"]
                    t = _train(preset, [*data_overrides, *extra, f"max_steps={args.steps}",
                                        f"run_dir={root / 'runs' / f'{name}-{kind}-{r}'}".replace(" ", "_")])
                    runs[kind].append(t["images_per_s"])
                    waits[kind].append(t["data_wait_share"])
                # after the trainer's runs, so with the threads and allocator settings the trainer chose
                timed = max(1, args.steps - WARMUP_STEPS)
                runs["bare"].append(_bare_steps_per_s(cfg, timed, WARMUP_STEPS, "cpu") * cfg.data.batch_size)
            round_ratios = [d / b for d, b in zip(runs["dali"], runs["bare"])]
            results["configs"][name] = {
                "dali_images_per_s": statistics.median(runs["dali"]),
                "dali_data_wait_share": statistics.median(waits["dali"]),
                "ideal_images_per_s": statistics.median(runs["ideal"]),
                "ideal_data_wait_share": statistics.median(waits["ideal"]),
                "bare_images_per_s": statistics.median(runs["bare"]),
                "loader_ratio": statistics.median(d / i for d, i in zip(runs["dali"], runs["ideal"])),
                "ratio": statistics.median(round_ratios),
                "round_ratios": round_ratios,
            }
    results["ratio"] = min(c["ratio"] for c in results["configs"].values())
    return results


# ---------------------------------------------------------------------------------------------- GPU
def _bare_steps_per_s(cfg, steps: int, warmup: int, device: str = "cuda") -> float:
    """The model step alone (`train_step` without Accelerate, with `cfg`'s optimizer, schedules,
    clipping and precision): no loader, no logging, no diagnostics; the same device-resident batch
    every step. On the CPU it runs in the trainer's process after the trainer's runs, so with the
    threads and allocator settings the trainer chose."""
    from omegaconf import OmegaConf

    from lmim.model import LatentMIM
    from lmim.model.masks import make_masks
    from lmim.pipeline.batch import Batch
    from lmim.train.hardware import resolve_precision
    from lmim.train.step import local_stepper, train_step

    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    precision = resolve_precision(str(cfg.precision), on_cuda=on_cuda).precision
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    m, d = cfg.model, cfg.data
    torch.manual_seed(0)
    net = LatentMIM(OmegaConf.to_object(m)).to(dev).train()
    # The trainer's run over the synthetic loader has these steps per epoch: the same schedules.
    stepper = local_stepper(cfg, net, steps_per_epoch=cfg.synthetic_batches // cfg.grad_accum, autocast=autocast)
    size = m.grid_size * (m.patch_size + m.patch_gap)
    images = torch.randn(d.batch_size, 3, size, size, device=dev)
    visible, target = make_masks(d.mask, d.batch_size, m.grid_size, d.num_visible, device=dev)
    batches = itertools.repeat(Batch(images, visible, target))

    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    for step in range(warmup):
        train_step(stepper, batches, step)
    sync()
    t0 = time.perf_counter()
    for step in range(warmup, warmup + steps):
        train_step(stepper, batches, step)
    sync()
    return steps / (time.perf_counter() - t0)


def _gpu(args) -> dict[str, Any]:
    from lmim.train.config import load_config

    if not torch.cuda.is_available():
        print("lmim bench train: --device cuda needs a CUDA device; none is visible.", file=sys.stderr)
        raise SystemExit(2)
    overrides = [f"data.batch_size={args.batch_size}", "precision=bf16", "device=cuda", "data.loader=synthetic",
                 "synthetic_batches=100000"]
    cfg = load_config("vit_b16_in1k", overrides)
    trainer, bare = [], []
    with tempfile.TemporaryDirectory(prefix="lmim-bench-train-") as tmp:
        for r in range(args.repeats):
            bare.append(_bare_steps_per_s(cfg, args.steps, warmup=5))
            torch.cuda.empty_cache()
            t = _train("vit_b16_in1k", [*overrides, f"max_steps={args.steps + 3}", "log_every=20",
                                        f"run_dir={tmp}/run{r}"])
            trainer.append(t["steps_per_s"])
            torch.cuda.empty_cache()
    t_med, b_med = statistics.median(trainer), statistics.median(bare)
    return {
        "device": torch.cuda.get_device_name(),
        "config": f"vit_b16_in1k, batch {args.batch_size}/GPU, bf16, device-resident batches",
        "trainer_steps_per_s": t_med,
        "bare_steps_per_s": b_med,
        "trainer_images_per_s": t_med * args.batch_size,
        "overhead": 1.0 - t_med / b_med,
        "ratio": t_med / b_med,
        "date": time.strftime("%Y-%m-%d"),
    }


# ---------------------------------------------------------------------------------------------- main
def _print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    if "configs" in res:
        t = Table(title=f"lmim bench train (CPU, {res['threads']} threads): the trainer with DALI vs the bare model step")
        for col in ("config", "DALI img/s", "DALI data-wait", "ideal img/s", "ideal data-wait", "bare step img/s",
                    "DALI / ideal", "ratio = DALI / bare (rounds)"):
            t.add_column(col, justify="right" if col != "config" else "left")
        for name, c in res["configs"].items():
            spread = c["round_ratios"]
            ratio = f"{c['ratio']:.2f}" + (f" ({min(spread):.2f}-{max(spread):.2f})" if len(spread) > 1 else "")
            t.add_row(name, f"{c['dali_images_per_s']:.0f}", f"{c['dali_data_wait_share']:.1%}",
                      f"{c['ideal_images_per_s']:.0f}", f"{c['ideal_data_wait_share']:.1%}",
                      f"{c['bare_images_per_s']:.0f}", f"{c['loader_ratio']:.2f}", ratio)
    else:
        t = Table(title=f"lmim bench train ({res['device']}): {res['config']}")
        for col in ("trainer steps/s", "bare model steps/s", "trainer img/s", "trainer overhead", "ratio"):
            t.add_column(col, justify="right")
        t.add_row(f"{res['trainer_steps_per_s']:.2f}", f"{res['bare_steps_per_s']:.2f}",
                  f"{res['trainer_images_per_s']:.0f}", f"{res['overhead']:.1%}", f"{res['ratio']:.3f}")
    console = Console()
    if not console.is_terminal:  # a log or a pipe: no terminal to fit, so no column cut to "data-w…"
        console = Console(width=150)
    console.print(t)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmim bench train", description=__doc__,
                                 formatter_class=HelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=positive_int, default=None, help="timed optimizer steps per run (CPU 25, GPU 50)")
    p.add_argument("--repeats", type=positive_int, default=3, help="alternating rounds; medians are quoted")
    p.add_argument("--photos", type=positive_int, default=1200, help="CPU: JPEGs in the small-photo dataset")
    p.add_argument("--dataset", choices=["auto", "fashion_mnist", "digits"], default="auto",
                   help="CPU: the quickstart's dataset (auto = Fashion-MNIST when installed)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="GPU: images per step")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = p.parse_args(argv)
    if args.photos < _PHOTO_BATCH:   # checked before minutes of data building, not by the trainer after them
        p.error(f"--photos must be at least {_PHOTO_BATCH}, one batch of the photo config")
    if args.steps is None:
        args.steps = 50 if args.device == "cuda" else 25
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    res = _gpu(args) if args.device == "cuda" else _cpu(args)
    res["machine"] = describe_machine(args.device)
    _print_table(res)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
