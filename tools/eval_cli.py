"""`lmim eval knn | linear | collapse`: evaluate a checkpoint or an exported encoder.

    lmim eval knn --encoder runs/x/checkpoints/step_001000 --train-url data/train --eval-url data/val
    lmim eval linear --encoder encoder.safetensors --train-url data/train --eval-url data/val
    lmim eval collapse --encoder runs/x/checkpoints/step_001000 --url data/val --plot collapse.png

Several processes (each reads a disjoint part of every split; features are gathered):
    torchrun --nproc-per-node 4 -m lmim.tools.eval_cli knn --encoder ... --train-url ... --eval-url ...
    accelerate launch -m lmim.tools.eval_cli knn ...

Every number is printed with the protocol it was measured with. With `--json` the last line is
one JSON object of the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lmim.tools.argtypes import non_negative_float, positive_float, positive_int
from lmim.tools.shard.options import add_storage_arguments, parse_storage_cli
from lmim.train.evaluate.collapse import collapse_stats, plot_collapse
from lmim.train.evaluate.features import eval_loader, extract
from lmim.train.evaluate.knn import PROTOCOL_LOO1, knn_loo1, knn_weighted, knn_weighted_protocol
from lmim.train.evaluate.linear import fit_linear_probe, linear_protocol


class EvalError(ValueError):
    """Bad input to `lmim eval`, phrased as one sentence for the user."""


# ----------------------------------------------------------------------------- processes
def _init_distributed() -> torch.device:
    """Join the process group when launched by torchrun/accelerate (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _say(*args, **kw) -> None:
    if _is_main():
        print(*args, **kw, flush=True)


# ----------------------------------------------------------------------------- inputs
def load_encoder_and_data_cfg(path: str):
    """(timm ViT in eval mode, DataConfig) for a checkpoint directory, an exported .safetensors or an
    export folder.

    The images are normalised as the encoder's were in training, so a checkpoint and its export score
    the same: a checkpoint's `config.yaml` gives the data settings, an export its recorded mean/std
    (a file exported by an older lmim records none, and gets the trainer's default, ImageNet's, with a note).
    """
    from omegaconf import OmegaConf

    from lmim.pipeline.config import DataConfig
    from lmim.tools.export import ExportError, load_encoder, read_export_normalisation

    p = Path(path)
    if not p.exists():
        raise EvalError(f"encoder {path} does not exist: pass a checkpoint directory (config.yaml + "
                        "model.safetensors), an export folder or a file written by `lmim export`.")
    try:
        encoder = load_encoder(p)
        if p.is_dir() and (p / "config.yaml").is_file():   # a checkpoint (load_encoder has read it already)
            raw = OmegaConf.load(p / "config.yaml")
            if "data" not in raw:
                return encoder, DataConfig()
            return encoder, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), raw.data))
        normalisation = read_export_normalisation(p)
    except ExportError as exc:
        raise EvalError(str(exc)) from exc
    if normalisation is None:
        _say(f"  note: {p} records no input mean/std (exported by an older lmim); using ImageNet's, the trainer's "
             "default: export the checkpoint again if it was trained with others")
        return encoder, DataConfig()
    return encoder, DataConfig(mean=tuple(normalisation["mean"]), std=tuple(normalisation["std"]))


def _features(encoder, url: str, data_cfg, args, device, *, token_sim: bool = False) -> dict:
    if not url:
        raise EvalError("a dataset URL is missing; see `lmim eval <command> --help`.")
    loader = eval_loader(encoder, url, data_cfg, batch_size=args.batch_size, loader=args.loader,
                         device=device if args.loader == "dali" else "cpu")
    t0 = time.perf_counter()
    out = extract(encoder, loader, device, pools=(args.pool,), token_sim=token_sim, progress=args.progress)
    _say(f"  features of {url}: {out[args.pool].shape[0]} images x {out[args.pool].shape[1]} "
         f"({args.pool}) in {time.perf_counter() - t0:.1f} s")
    return out


def _check_splits(eval_url: str, train_url: str | None, data_cfg, *, eval_least: int = 1, train_least: int = 1,
                  needs: str = "k-NN") -> None:
    """Refuse, before any feature is extracted, a split without class labels, with one class only or
    fewer images than the protocol needs, or a memory bank / probe training split (`train_url`) whose
    classes are not the eval split's (their manifests say so)."""
    from lmim.train.evaluate.splits import SplitError, check_same_classes, knn_split_classes

    options = dict(getattr(data_cfg, "storage_options", None) or {})
    try:
        ev = knn_split_classes(eval_url, eval_url, storage_options=options, least=eval_least, needs=needs)
        if train_url:
            check_same_classes(train_url, knn_split_classes(train_url, train_url, storage_options=options,
                                                            least=train_least, needs=needs),
                               eval_url, ev)
    except SplitError as err:
        raise EvalError(f"{err}.") from None


def _need_labels(out: dict, url: str) -> None:
    if out["labels"].numel() == 0:
        raise EvalError(f"{url} yielded no images.")
    if int(out["labels"].min()) < 0:
        raise EvalError(f"{url} has no class labels (build it from a folder tree with class sub-folders).")


# ----------------------------------------------------------------------------- commands
def cmd_knn(args, encoder, data_cfg, device) -> dict:
    protocol = args.protocol or ("both" if args.train_url else "loo1")
    protocols = ("loo1", "knn20") if protocol == "both" else (protocol,)
    if "knn20" in protocols and not args.train_url:
        raise EvalError("--protocol knn20/both needs --train-url (the labelled memory bank).")
    _check_splits(args.eval_url, args.train_url if "knn20" in protocols else None, data_cfg,
                  eval_least=2 if "loo1" in protocols else 1,
                  needs="leave-one-out 1-NN" if "loo1" in protocols else "k-NN")
    ev = _features(encoder, args.eval_url, data_cfg, args, device)
    _need_labels(ev, args.eval_url)
    result: dict = {"n_eval": int(ev["labels"].numel()), "pool": args.pool}
    if "loo1" in protocols:
        result["knn_loo1"] = knn_loo1(ev[args.pool], ev["labels"], device=device)
        _say(f"{PROTOCOL_LOO1}: {result['knn_loo1']:.2f} % top-1 ({result['n_eval']} images)")
    if "knn20" in protocols:
        tr = _features(encoder, args.train_url, data_cfg, args, device)
        _need_labels(tr, args.train_url)
        result["n_train"] = int(tr["labels"].numel())
        k = min(args.k, result["n_train"])   # what knn_weighted uses: a bank smaller than k votes whole
        # The key stays "knn20" (the protocol's name, as --protocol says it); k and T say what was run.
        result.update(k=k, temperature=args.temperature)
        result["knn20"] = knn_weighted(tr[args.pool], tr["labels"], ev[args.pool], ev["labels"],
                                       k=k, T=args.temperature, device=device)
        clamped = f"; --k {args.k} is more than the memory bank holds" if k < args.k else ""
        _say(f"{knn_weighted_protocol(k, args.temperature)}: {result['knn20']:.2f} % top-1 "
             f"({result['n_train']} train, {result['n_eval']} eval{clamped})")
    return result


def cmd_linear(args, encoder, data_cfg, device) -> dict:
    _check_splits(args.eval_url, args.train_url, data_cfg, train_least=2, needs="the linear probe")
    tr = _features(encoder, args.train_url, data_cfg, args, device)
    ev = _features(encoder, args.eval_url, data_cfg, args, device)
    _need_labels(tr, args.train_url)
    _need_labels(ev, args.eval_url)
    result: dict = {"n_train": int(tr["labels"].numel()), "n_eval": int(ev["labels"].numel()), "pool": args.pool,
                    "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed}
    # Every rank has the gathered features; the probe is cheap, so rank 0 fits it and the rest wait.
    acc = torch.zeros(2, device=device)
    if _is_main():
        acc[:] = torch.tensor(fit_linear_probe(tr[args.pool], tr["labels"], ev[args.pool], ev["labels"],
                                               epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                                               batch_size=args.probe_batch_size, device=device, seed=args.seed))
    if dist.is_initialized():
        dist.broadcast(acc, 0)
    result["linear_train"], result["linear"] = float(acc[0]), float(acc[1])
    _say(f"{linear_protocol(args.epochs)}: {result['linear']:.2f} % top-1 "
         f"({result['n_train']} train, {result['n_eval']} eval; {result['linear_train']:.2f} % on the train split)")
    return result


def cmd_collapse(args, encoder, data_cfg, device) -> dict:
    out = _features(encoder, args.url, data_cfg, args, device, token_sim=True)
    if out[args.pool].shape[0] < 2:
        raise EvalError(f"{args.url} has fewer than 2 images; the cross-image cosine needs at least 2.")
    stats = {**collapse_stats(out[args.pool], out["token_sim"]), "pool": args.pool}
    pooled = "mean-pooled patch latents" if args.pool == "mean_patch" else "CLS tokens"
    _say(f"collapse (mean cross-image cosine of {pooled}): {stats['collapse_cos']:.4f}  (about 1.0 = collapsed)")
    _say(f"within-image patch-token cosine: {stats['token_sim']:.4f}")
    _say(f"effective rank of pooled features: {stats['effective_rank']:.1f} of {stats['dim']}")
    if args.plot and _is_main():
        path = plot_collapse(out[args.pool], args.plot, title=f"{args.encoder} on {args.url}", stats=stats)
        _say(f"wrote {path}")
    return stats


# ----------------------------------------------------------------------------- parsing
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lmim eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--encoder", required=True, help="checkpoint directory or exported .safetensors")
        p.add_argument("--pool", choices=("mean_patch", "cls"), default="mean_patch",
                       help="feature: mean of patch tokens, CLS excluded (default, the paper's) or CLS")
        p.add_argument("--batch-size", type=positive_int, default=128, help="images per process per batch")
        p.add_argument("--loader", choices=("dali", "torch"), default="dali",
                       help="pipeline backend (torch = PIL baseline, no DALI)")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        p.add_argument("--json", action="store_true", help="print the figures as one JSON object, last line")
        p.add_argument("--progress", action="store_true", help="progress bar while extracting features")
        add_storage_arguments(p)   # for s3:// splits: overrides the AWS environment and the checkpoint's data.storage_options

    knn = sub.add_parser("knn", help="k-NN: leave-one-out 1-NN on the eval split and/or weighted 20-NN")
    common(knn)
    knn.add_argument("--eval-url", required=True, help="labelled evaluation split (the paper's protocol uses only this)")
    knn.add_argument("--train-url", help="labelled training split: the memory bank of weighted k-NN")
    knn.add_argument("--protocol", choices=("loo1", "knn20", "both"), default=None,
                     help="loo1: the paper's leave-one-out 1-NN within --eval-url; knn20: weighted 20-NN against "
                          "--train-url; default: both with --train-url, loo1 without")
    knn.add_argument("--k", type=positive_int, default=20)
    knn.add_argument("--temperature", type=positive_float, default=0.07)

    lin = sub.add_parser("linear", help="linear probe on frozen features")
    common(lin)
    lin.add_argument("--train-url", required=True)
    lin.add_argument("--eval-url", required=True)
    lin.add_argument("--epochs", type=positive_int, default=100)
    lin.add_argument("--lr", type=positive_float, default=1e-2)
    lin.add_argument("--weight-decay", type=non_negative_float, default=5e-4)
    lin.add_argument("--probe-batch-size", type=positive_int, default=256)
    lin.add_argument("--seed", type=int, default=0)

    col = sub.add_parser("collapse", help="collapse diagnostics (+ a PNG with --plot)")
    common(col)
    col.add_argument("--url", required=True, help="dataset to compute the diagnostics on (labels not needed)")
    col.add_argument("--plot", help="write a PNG: histogram of cross-image cosines, singular value spectrum")
    return ap


COMMANDS = {"knn": cmd_knn, "linear": cmd_linear, "collapse": cmd_collapse}


def _plot_path_problem(plot: str) -> tuple[str, int] | None:
    """(sentence, exit code) when --plot cannot be written: 2 for a name that is not a PNG file's,
    6 for a place that cannot be written (README's codes); None when it can. Judged by the nearest
    existing folder on the way (`folder_obstacle`, as a shard DST is), so nothing is created before
    the command has run: `save_figure` makes the missing folders."""
    from lmim.pipeline.storage import folder_obstacle

    path = Path(plot)
    if path.suffix.lower() != ".png":
        return f"--plot {plot} must end in .png.", 2
    if path.is_dir():
        return f"--plot {plot} is a folder; give a file name ending in .png.", 2
    obstacle = folder_obstacle(str(path.parent))
    if obstacle is not None:
        kind, where = obstacle
        why = f"{where} is a file, not a folder" if kind == "file" else f"no write permission on {where}"
        return f"cannot write --plot {plot} ({why}); choose a writable path.", 6
    return None


def main(argv: list[str]) -> int:
    parser = _parser()
    parsed = parse_storage_cli(parser, argv)
    if parsed is None:
        return 2
    args, storage_options = parsed
    if args.command == "collapse" and args.plot:
        problem = _plot_path_problem(args.plot)   # now, not after a pass over the whole dataset
        if problem is not None:
            message, code = problem
            print(f"lmim eval collapse: {message}", file=sys.stderr)
            return code
    from lmim.pipeline.errors import DataError, StoreUnreachable

    try:
        device = _init_distributed()
        if args.device == "cpu" or (args.device == "auto" and device.type == "cpu"):
            device = torch.device("cpu")
        elif args.device == "cuda" and device.type != "cuda":
            raise EvalError("--device cuda was asked for, but no CUDA device is available.")
        encoder, data_cfg = load_encoder_and_data_cfg(args.encoder)
        if storage_options is not None:
            data_cfg = dataclasses.replace(data_cfg, storage_options=storage_options)
        encoder.to(device)
        _say(f"lmim eval {args.command}: encoder {args.encoder} ({sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M "
             f"params), {dist.get_world_size() if dist.is_initialized() else 1} process(es), {device}")
        result = COMMANDS[args.command](args, encoder, data_cfg, device)
        if args.json:
            _say(json.dumps({"command": args.command, "encoder": args.encoder, **result}))
    except StoreUnreachable:
        raise  # not the user's input: the `lmim` command says so, with exit code 5
    except (EvalError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"lmim eval {args.command}: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
