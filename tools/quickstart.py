"""`lmim quickstart`: from a fresh clone to a trained, evaluated and exported encoder on the CPU.

    lmim quickstart                      # or: make quickstart
    lmim quickstart epochs=4             # any `key=value` training override

Steps (a few minutes on 2 CPU cores):
1. Write a small real dataset as class folders of PNGs: Fashion-MNIST (600 per class for
   training, 100 per class for testing) when the Debian package `dataset-fashion-mnist` is
   installed, else scikit-learn's hand-written digits, which ship inside its wheel.
2. Shard both splits with `lmim.tools.shard.build_dataset` (the same code as `lmim shard`).
3. Pretrain a tiny ViT (train/configs/quickstart.yaml: 32 px, 4 px patches, 8 x 8 grid, no
   patch gap) with the real trainer and pipeline.
4. k-NN accuracy (weighted 20-NN, train split as memory, test split as queries) of the trained
   encoder against the same ViT at its random initialisation (and raw pixels, for scale).
5. Export the online encoder as a timm-loadable safetensors file and print where everything is.

Nothing is downloaded. Re-running reuses the shards and starts a fresh run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmim.train.failures import EXIT_DATA, Rerun, sigterm_interrupts
from lmim.train.run_lock import LOCK_NAME

__all__ = ["main", "prepare_data", "evaluate_encoders"]

_TRAIN_PER_CLASS = {"fashion_mnist": 600, "digits": None}   # digits: the whole train split (1,437)
_TEST_PER_CLASS = {"fashion_mnist": 100, "digits": None}    # digits: the whole test split (360)
_WHAT = {"fashion_mnist": "grey silhouettes", "digits": "digits"}
# Optimizer steps are what matters on a CPU budget: about 450 for either dataset at batch 128.
_EPOCHS = {"fashion_mnist": 10, "digits": 40}


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def _grey_stats(images: np.ndarray) -> tuple[float, float]:
    x = images.astype(np.float64) / 255.0
    return float(x.mean()), float(x.std())


def prepare_data(data_dir: str | Path, dataset: str = "auto", *, seed: int = 0, workers: int = 2) -> dict[str, Any]:
    """Class-folder PNGs and shards of a small real dataset under `data_dir` (reused when present).

    Returns:
        {"dataset", "train": shard folder, "test": shard folder, "mean", "std"}.
    """
    from lmim.tools import datasets

    data_dir = Path(data_dir)
    if dataset == "auto":
        dataset = "fashion_mnist" if datasets.fashion_mnist_available() else "digits"
    if dataset == "fashion_mnist":
        images, _ = datasets.load_fashion_mnist("train")
        export = datasets.export_fashion_mnist
        kw: dict[str, Any] = {}
    elif dataset == "digits":
        images, _ = datasets.load_digits_split("train")
        export = datasets.export_digits
        kw = {"size": 32}
        images = images.repeat(4, 1).repeat(4, 2)  # stats of the upscaled images, near enough
    else:
        raise ValueError(f"dataset must be auto, fashion_mnist or digits, got {dataset!r}.")
    mean, std = _grey_stats(images)
    out: dict[str, Any] = {"dataset": dataset, "mean": mean, "std": std}
    for split, per_class in (("train", _TRAIN_PER_CLASS[dataset]), ("test", _TEST_PER_CLASS[dataset])):
        shards = data_dir / dataset / split
        out[split] = str(shards)
        if (shards / "manifest.json").is_file():
            _say(f"reusing {split} shards in {shards}")
            continue
        raw = data_dir / dataset / f"{split}-png"
        if raw.exists():
            shutil.rmtree(raw)
        _say(f"writing {dataset} {split} images to {raw}")
        export(raw, split, per_class=per_class, seed=seed, **kw)
        _say(f"sharding {raw} -> {shards}")
        from lmim.tools.shard import build_dataset

        if shards.exists():
            shutil.rmtree(shards)  # a build without a manifest never finished
        build_dataset(str(raw), str(shards), shard_max_samples=1000, workers=workers, seed=seed, progress=False)
    return out


@torch.no_grad()
def _pixels(loader) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for batch in loader:
        feats.append(batch.images.flatten(1).float().cpu())
        labels.append(batch.labels.cpu())
    return torch.cat(feats), torch.cat(labels)


def evaluate_encoders(encoders: dict[str, torch.nn.Module], train_url: str, test_url: str, data_cfg) -> dict[str, float]:
    """Weighted 20-NN top-1 (%) of each encoder, plus raw pixels; train split = memory bank."""
    from lmim.train.evaluate.features import eval_loader, extract_features
    from lmim.train.evaluate.knn import knn_weighted

    results: dict[str, float] = {}
    any_encoder = next(iter(encoders.values()))
    for name, enc in encoders.items():
        enc.eval()
        feats = {}
        for split, url in (("train", train_url), ("test", test_url)):
            loader = eval_loader(enc, url, data_cfg, batch_size=256)
            try:
                feats[split] = extract_features(enc, loader, device="cpu")
            finally:
                loader.close()
        results[name] = knn_weighted(*feats["train"], *feats["test"], k=20, T=0.07)
    pix = {}
    for split, url in (("train", train_url), ("test", test_url)):
        loader = eval_loader(any_encoder, url, data_cfg, batch_size=256)
        try:
            pix[split] = _pixels(loader)
        finally:
            loader.close()
    results["raw pixels"] = knn_weighted(*pix["train"], *pix["test"], k=20, T=0.07)
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmim quickstart",
        description="Shard a small real dataset, pretrain a tiny ViT on the CPU, evaluate k-NN against a "
        "random-initialised encoder, export the encoder.",
    )
    p.add_argument("--data-dir", default="data/quickstart", help="where images and shards go (reused)")
    p.add_argument("--run-dir", default="runs/quickstart", help="the training run folder (replaced)")
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion_mnist", "digits"],
                   help="auto = Fashion-MNIST when installed (apt-get install dataset-fashion-mnist), else digits")
    p.add_argument("overrides", nargs="*", help="key=value training overrides (see train/configs/quickstart.yaml)")
    return p


# What a quickstart run folder holds; a folder with anything else in it is not replaced.
_RUN_FOLDER_ENTRIES = {"config.yaml", "status.json", "metrics.jsonl", "logs", "checkpoints", "plots", "debug",
                       "encoder.safetensors", "quickstart.json", LOCK_NAME}


_MARKER = "quickstart.json"   # written first: a folder without it is not the quickstart's (an `lmim pretrain` run)

# How the user goes on after a quickstart that stopped (status.json says it too): it starts over.
_RERUN = Rerun("run the same `lmim quickstart` command again (it starts over)", "the run folder",
               "data.storage_options", EXIT_DATA)


def _is_previous_run(run_dir: Path) -> bool:
    """`run_dir` is an earlier quickstart's folder (its marker, and nothing a run does not write),
    which the quickstart may delete and start again in. An `lmim pretrain` run has no marker: its
    checkpoints are never deleted here."""
    names = {p.name for p in run_dir.iterdir()}
    return _MARKER in names and names <= _RUN_FOLDER_ENTRIES


def main(argv: list[str] | None = None) -> int:
    with sigterm_interrupts():   # a SIGTERM unwinds like Ctrl-C: status.json says interrupted, one sentence
        return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from lmim.train.config import ConfigError, load_config
    from lmim.train.pretrain import TrainingError, run

    args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    run_dir = Path(args.run_dir)
    try:
        # Validate the overrides before spending any time on data.
        load_config("quickstart", list(args.overrides))
        if any(o.split("=", 1)[0].strip() == "run_dir" for o in args.overrides):
            raise ConfigError("give the run folder as --run-dir DIR, not as a run_dir= override (the quickstart writes "
                              "its encoder and summary there too).")
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--run-dir {str(run_dir)!r} is a file; give a folder (it is created if missing).")
        if run_dir.exists() and any(run_dir.iterdir()) and not _is_previous_run(run_dir):
            raise ConfigError(f"--run-dir {str(run_dir)!r} exists and is not a previous quickstart's run folder (it "
                              f"has no {_MARKER}, or holds files a run does not write); choose another.")
        data = prepare_data(args.data_dir, args.dataset)
        mean, std = data["mean"], data["std"]
        overrides = [
            f"data.url={data['train']}",
            f"data.eval_url={data['test']}",
            f"run_dir={run_dir}",
            f"epochs={_EPOCHS[data['dataset']]}",
            f"data.mean=[{mean},{mean},{mean}]",
            f"data.std=[{std},{std},{std}]",
            *args.overrides,  # the user's overrides win
        ]
        cfg = load_config("quickstart", overrides)
    except ConfigError as err:
        print(f"lmim quickstart: {err}", file=sys.stderr)
        return 2
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a previous quickstart run: start fresh
    run_dir.mkdir(parents=True)
    (run_dir / _MARKER).write_text(json.dumps({"status": "training"}) + "\n")   # replaced by the results at the end

    _say(f"pretraining a tiny ViT on {data['dataset']} ({cfg.epochs} epochs on {cfg.device}); "
         f"TensorBoard: tensorboard --logdir {run_dir / 'logs'}")
    t_train = time.perf_counter()
    try:
        summary = run(cfg, _RERUN)
    except TrainingError as err:
        print(f"lmim quickstart: {err}", file=sys.stderr)
        return 1
    train_s = time.perf_counter() - t_train

    _say("evaluating k-NN: trained encoder vs the same ViT at random initialisation")
    from accelerate.utils import set_seed

    from lmim.model import LatentMIM
    from lmim.tools.export import export_encoder, load_latent_mim, timm_line

    ckpt = Path(summary["checkpoint"])
    trained = load_latent_mim(ckpt).encoder
    set_seed(cfg.seed)  # the very initialisation the run started from
    random_init = LatentMIM(OmegaConf.to_object(cfg.model)).encoder
    data_cfg = OmegaConf.to_object(cfg.data)
    scores = evaluate_encoders({"Latent MIM (trained)": trained, "random init": random_init},
                               data["train"], data["test"], data_cfg)

    encoder_path = run_dir / "encoder.safetensors"
    export_encoder(ckpt, encoder_path)
    result = {
        "dataset": data["dataset"],
        "knn_top1": scores,
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - t0,
        "steps": summary["step"],
        "checkpoint": str(ckpt),
        "encoder": str(encoder_path),
    }
    (run_dir / _MARKER).write_text(json.dumps(result, indent=2) + "\n")

    width = max(len(k) for k in scores)
    gain = scores["Latent MIM (trained)"] - scores["random init"]
    print()
    print(f"k-NN top-1 on the {data['dataset']} test split (weighted 20-NN, train split as memory):")
    for name, acc in scores.items():
        print(f"  {name:<{width}}  {acc:6.2f} %")
    print(f"Pretraining added {gain:+.1f} points over the same ViT at random init ({summary['step']} steps, "
          f"{train_s:.0f} s on {cfg.device}).")
    print(f"Raw pixels are the yardstick, not the target: on small centred {_WHAT[data['dataset']]} the pixels "
          "almost are the class; `lmim bench quality --dataset shapes` measures where they are not.")
    print()
    print(f"time: {result['total_seconds']:.0f} s in all, {train_s:.0f} s training ({summary['step']} steps)")
    print(f"shards:       {data['train']}  {data['test']}")
    print(f"run folder:   {run_dir}  (config.yaml, metrics.jsonl, logs/ for TensorBoard)")
    print(f"plots:        {run_dir / 'plots' / 'curves.png'}  {run_dir / 'plots' / 'masks.png'}")
    print(f"checkpoint:   {ckpt}")
    print(f"encoder:      {encoder_path}")
    print(f"load it:      {timm_line(encoder_path)}")
    print(f"summary:      {run_dir / 'quickstart.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
