"""`lmim bench pipeline [DATA_URL]`: images/s of the DALI pipeline against the plain PyTorch loader.

    lmim bench pipeline                          # builds ~1500 ImageNet-like 500x375 JPEGs in a temp dir
    lmim bench pipeline /data/imagenet-shards    # your dataset (local path or s3://..., any fsspec URL)
    lmim bench pipeline --s3-loopback            # also stream the shards from a loopback S3 (moto)
    lmim bench pipeline DATA_URL --device cuda   # the GPU path: DALI decodes with nvJPEG ("mixed")

Both loaders run the same plan: same shards, samples, RandomResizedCrop windows (bicubic),
flips, normalisation and masks, at the reference geometry (grid 14, patch 16, gap 4 -> 280 px),
with the same number of threads (DALI) / worker processes (DataLoader). Each round times one
epoch (or --max-batches) of each loader, alternating DALI / baseline, from its first batch to its
last (the start-up is excluded and reported apart); medians over rounds are quoted.
`ratio` = DALI images/s / baseline images/s. With --s3-loopback (or an s3:// URL) the streaming
reader's requests and bytes per sample are reported too; with --s3-loopback also the requests per
sample when there are more ranks than shards (the "shared shards" mode of pipeline/order.py).
The cost of mixing (`data.sources`, pipeline/mix.py): DALI on a two-source weighted mix (the
dataset twice, weights 0.7 / 0.3, an epoch as long as the dataset) timed in the same rounds,
`mix_ratio` = its images/s / one source's; with --s3-loopback also the mix's requests per sample.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from lmim.pipeline import build_loader
from lmim.pipeline.config import DATA_CHOICES, DataConfig
from lmim.pipeline.format.manifest import read_manifest
from lmim.pipeline.storage import Store, is_remote
from lmim.tools.argtypes import HelpFormatter, device_name, non_negative_int, positive_int
from lmim.train.hardware import describe_machine


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmim bench pipeline", description=__doc__,
                                 formatter_class=HelpFormatter)
    p.add_argument("url", nargs="?", help="dataset root (local path or fsspec URL); default: build a synthetic one")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    p.add_argument("--images", type=positive_int, default=1500, help="synthetic dataset size (no URL)")
    p.add_argument("--image-size", type=positive_int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--shard-samples", type=positive_int, default=250, help="samples per synthetic shard")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--threads", type=positive_int, default=2, help="DALI threads = DataLoader worker processes")
    p.add_argument("--rounds", type=positive_int, default=3, help="timed rounds per loader (alternating)")
    p.add_argument("--max-batches", type=non_negative_int, default=0, help="batches per round (0 = one epoch)")
    p.add_argument("--grid", type=positive_int, default=14)
    p.add_argument("--patch", type=positive_int, default=16)
    p.add_argument("--gap", type=non_negative_int, default=4)
    p.add_argument("--mask", choices=DATA_CHOICES["mask"], default="random")
    p.add_argument("--num-visible", type=positive_int, default=20)
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, or cuda[:N] to measure the GPU decode path")
    p.add_argument("--s3-loopback", action="store_true", help="also stream from a loopback S3 server (moto)")
    p.add_argument("--workdir", help="where to build the synthetic dataset (default: a temp dir, removed)")
    args = p.parse_args(argv)
    if args.num_visible >= args.grid * args.grid:
        p.error(f"argument --num-visible: must be below the {args.grid * args.grid} patches of --grid {args.grid}, "
                f"got {args.num_visible}")
    # The first batch of each pass is start-up, not timed: a pass must have at least one more.
    if args.max_batches == 1:
        p.error("argument --max-batches: must be 0 (a whole epoch) or at least 2 (the first batch is not timed)")
    if args.url is None and args.images < 2 * args.batch_size:
        p.error(f"argument --images: {args.images} images make fewer than 2 batches of --batch-size {args.batch_size} "
                "(the first batch of a pass is not timed); raise --images or lower --batch-size")
    if args.workdir is not None and not os.path.isdir(args.workdir):
        p.error(f"argument --workdir: {args.workdir!r} is not an existing folder; create it or leave --workdir out "
                "(the system temp folder)")
    if args.s3_loopback and args.url is not None and is_remote(args.url):
        p.error("argument --s3-loopback: it uploads a local dataset to a loopback S3 server; give a local path "
                "or no URL")
    return args


def _synthetic(root: str, n: int, size: tuple[int, int], per_shard: int) -> str:
    from lmim.tools.sample_images import write_photo_jpegs
    from lmim.tools.shard import build_dataset

    src, dst = os.path.join(root, "jpegs"), os.path.join(root, "shards")
    print(f"building {n} {size[0]}x{size[1]} JPEGs and shards in {root} ...", file=sys.stderr)
    write_photo_jpegs(src, n, size=size, num_classes=10, seed=0)
    build_dataset(src, dst, shard_max_bytes=1 << 34, shard_max_samples=per_shard, workers=2, seed=0,
                  storage_options={}, progress=False)
    return dst


def _round(loader, max_batches: int, device: torch.device) -> tuple[float, float, int]:
    """(start-up seconds, steady images/s, batches) for one pass from the loader's next batch."""
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    n_img, n_batches = 0, 1
    for batch in it:
        n_img += len(batch)
        n_batches += 1
        if max_batches and n_batches >= max_batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    del it, first
    return t1 - t0, (n_img / (t2 - t1) if n_img else float("nan")), n_batches


def _measure(cfgs: dict[str, DataConfig], args, device: torch.device, url_of: dict[str, str]) -> dict[str, Any]:
    loaders = {name: build_loader(c, grid_size=args.grid, patch_size=args.patch, patch_gap=args.gap, device=device,
                                  url=url_of.get(name))
               for name, c in cfgs.items()}
    rates: dict[str, list[float]] = {n: [] for n in loaders}
    startup: dict[str, list[float]] = {n: [] for n in loaders}
    samples = {n: 0 for n in loaders}
    for r in range(args.rounds):
        for name, loader in loaders.items():  # alternating A B A B
            s, rate, nb = _round(loader, args.max_batches, device)
            rates[name].append(rate)
            startup[name].append(s)
            samples[name] += nb * args.batch_size
            print(f"  round {r + 1}: {name:<8} {rate:8.1f} images/s  ({nb} batches, start-up {s:.2f} s)",
                  file=sys.stderr)
    return {"rates": rates, "startup": startup, "loaders": loaders, "samples": samples}


def _shared_shard_requests(cfg: DataConfig, args, device: torch.device, s3, num_shards: int) -> dict[str, Any]:
    """GETs per sample when there are more ranks than shards ("shared shards", pipeline/order.py):
    every rank of a world of `num_shards + 2` streams one epoch in turn, counted by the server."""
    world = num_shards + 2
    s3.clear()
    samples = 0
    for rank in range(world):
        loader = build_loader(cfg, grid_size=args.grid, patch_size=args.patch, patch_gap=args.gap, device=device,
                              rank=rank, world_size=world)
        samples += sum(len(batch) for batch in loader)
        loader.close()
    return {"shared_shards_world_size": world,
            "shared_shards_requests_per_sample": round(len(s3.gets("/bench/ds/")) / samples, 5)}


def _mix_config(url: str, storage_options: dict, samples_per_epoch: int, common: dict[str, Any]) -> DataConfig:
    """DALI on the dataset mixed with itself as two weighted sources (0.7 / 0.3), one dataset's worth an epoch."""
    sources = [{"url": url, "weight": 0.7, "name": "first"}, {"url": url, "weight": 0.3, "name": "second"}]
    return DataConfig(loader="dali", sources=sources, samples_per_epoch=samples_per_epoch,
                      storage_options=storage_options, **common)


def _mix_requests(cfg: DataConfig, args, device: torch.device, s3) -> dict[str, Any]:
    """GETs per sample of one epoch of the two-source mix streamed from the loopback S3, counted by the server."""
    s3.clear()
    loader = build_loader(cfg, grid_size=args.grid, patch_size=args.patch, patch_gap=args.gap, device=device)
    samples = sum(len(batch) for batch in loader)
    loader.close()
    return {"mix_stream_requests_per_sample": round(len(s3.gets("/bench/ds/")) / samples, 5)}


def _checksum_cost(url: str, manifest) -> dict[str, float]:
    """What the integrity check adds per local shard: read time vs hash time (data.verify_local).

    Each shard is read twice (the second read, from the page cache, is timed: the cheapest a
    read gets, so the share is an upper bound) and hashed with its manifest's algorithm.
    """
    from lmim.pipeline.format.checksum import algorithm_of, checksum_of

    store = Store(url)
    read_s, hash_s, total = 0.0, 0.0, 0
    for info in manifest.shards:
        store.read_bytes(info.name)
        t0 = time.perf_counter()
        data = store.read_bytes(info.name)
        t1 = time.perf_counter()
        ok = checksum_of(data, algorithm_of(info.checksum)) == info.checksum
        t2 = time.perf_counter()
        if not ok:
            raise ValueError(f"shard {info.name} does not match its checksum; run `lmim verify {url}`")
        read_s, hash_s, total = read_s + (t1 - t0), hash_s + (t2 - t1), total + len(data)
    n = len(manifest.shards)
    return {"checksum_algorithm": algorithm_of(manifest.shards[0].checksum),
            "checksum_ms_per_shard": round(hash_s / n * 1e3, 2), "read_ms_per_shard": round(read_s / n * 1e3, 2),
            "checksum_share_of_read": round(hash_s / max(read_s, 1e-9), 3),
            "checksum_gb_per_s": round(total / max(hash_s, 1e-9) / 1e9, 2)}


def main(argv: list[str]) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("lmim bench pipeline: --device cuda but this machine has no CUDA device; use --device cpu.",
              file=sys.stderr)
        return 2
    tmp = None
    try:
        if args.url:
            url = args.url
            try:
                read_manifest(url)
            except (FileNotFoundError, ValueError) as e:
                print(f"lmim bench pipeline: {e}", file=sys.stderr)
                return 2
        else:
            tmp = tempfile.TemporaryDirectory(prefix="lmim-bench-pipe-", dir=args.workdir)
            url = _synthetic(tmp.name, args.images, tuple(args.image_size), args.shard_samples)
        manifest = read_manifest(url)
        if 2 * args.batch_size > manifest.total_samples:  # the loader's own sentence names data.batch_size
            print(f"lmim bench pipeline: --batch-size {args.batch_size} makes fewer than 2 batches of the dataset "
                  f"({manifest.total_samples} samples at {url}; the first batch of a pass is not timed); lower "
                  "--batch-size.", file=sys.stderr)
            return 2
        common = dict(url=url, batch_size=args.batch_size, num_threads=args.threads, mask=args.mask,
                      num_visible=args.num_visible)
        cfgs = {"dali": DataConfig(loader="dali", **common), "baseline": DataConfig(loader="torch", **common),
                "dali_mix": _mix_config(url, {}, manifest.total_samples, common)}
        s3 = None
        url_of: dict[str, str] = {}
        if args.s3_loopback:
            from lmim.pipeline.testing_s3 import start_loopback_s3

            s3 = start_loopback_s3()
            copy = Store("s3://bench/ds", s3.storage_options)
            copy.create()
            source = Store(url)
            for name in source.list():
                copy.upload(os.path.join(source.path, name), name)
            url_of["dali_s3"] = "s3://bench/ds"
            cfgs["dali_s3"] = DataConfig(loader="dali", storage_options=s3.storage_options,
                                         **{**common, "url": "s3://bench/ds"})
            s3.clear()
        checksum = _checksum_cost(url, manifest) if not is_remote(url) else {}
        res = _measure(cfgs, args, device, url_of)
        med = {n: statistics.median(v) for n, v in res["rates"].items()}
        out: dict[str, Any] = {
            "benchmark": "pipeline", "url": args.url or "synthetic", "device": str(device),
            "samples": manifest.total_samples, "shards": len(manifest.shards),
            "image_px": args.grid * (args.patch + args.gap), "batch_size": args.batch_size,
            "threads": args.threads, "rounds": args.rounds,
            "dali_images_per_s": round(med["dali"], 1), "baseline_images_per_s": round(med["baseline"], 1),
            "ratio": round(med["dali"] / med["baseline"], 3),
            "ratio_paired_median": round(statistics.median(
                d / b for d, b in zip(res["rates"]["dali"], res["rates"]["baseline"])), 3),
            "dali_rounds": [round(x, 1) for x in res["rates"]["dali"]],
            "baseline_rounds": [round(x, 1) for x in res["rates"]["baseline"]],
            "dali_startup_s": round(statistics.median(res["startup"]["dali"]), 2),
            "mix_images_per_s": round(med["dali_mix"], 1), "mix_ratio": round(med["dali_mix"] / med["dali"], 3),
            "mix_rounds": [round(x, 1) for x in res["rates"]["dali_mix"]],
            "baseline_startup_s": round(statistics.median(res["startup"]["baseline"]), 2),
            **checksum,
        }
        streamed = "dali_s3" if s3 is not None else ("dali" if is_remote(url) else None)
        if streamed is not None:
            ld = res["loaders"][streamed]
            st = ld.stats
            n_samples = res["samples"][streamed]
            requests = (len(s3.gets("/bench/ds/")) if s3 is not None else st["shards_fetched"] + st["retries"])
            out.update({"stream_images_per_s": round(med[streamed], 1),
                        "stream_requests_per_sample": round(requests / n_samples, 5),
                        "stream_bytes_per_sample": round(st["bytes_fetched"] / n_samples, 1),
                        "stream_bytes_per_sample_stored": round(manifest.total_bytes / manifest.total_samples, 1),
                        "stream_requests_counted_by": "server log" if s3 is not None else "loader stats"})
        if s3 is not None:
            out.update(_shared_shard_requests(cfgs["dali_s3"], args, device, s3, len(manifest.shards)))
            out.update(_mix_requests(_mix_config("s3://bench/ds", s3.storage_options, manifest.total_samples, common),
                                     args, device, s3))
        _table(out)
        if args.json:
            print(json.dumps({**out, "machine": describe_machine(str(out["device"]))}))
        if s3 is not None:
            s3.stop()
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


def _table(out: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        for k, v in out.items():
            print(f"{k:>32}: {v}")
        return
    t = Table(title=f"lmim bench pipeline ({out['device']}, {out['samples']} samples, {out['image_px']} px, "
                    f"batch {out['batch_size']}, {out['threads']} threads/workers, median of {out['rounds']})")
    t.add_column("loader")
    t.add_column("images/s", justify="right")
    t.add_column("rounds", justify="right")
    t.add_column("start-up s", justify="right")
    t.add_row("DALI", f"{out['dali_images_per_s']:.1f}", str(out["dali_rounds"]), str(out["dali_startup_s"]))
    t.add_row("PyTorch baseline (PIL + torchvision, DataLoader)", f"{out['baseline_images_per_s']:.1f}",
              str(out["baseline_rounds"]), str(out["baseline_startup_s"]))
    t.add_row("ratio DALI / baseline", f"{out['ratio']:.2f}x", "", "")
    t.add_row("DALI, two-source weighted mix (0.7 / 0.3)", f"{out['mix_images_per_s']:.1f}", str(out["mix_rounds"]), "")
    t.add_row("  ratio mix / one source", f"{out['mix_ratio']:.2f}x", "", "")
    if "checksum_ms_per_shard" in out:
        t.add_row(f"integrity check per shard ({out['checksum_algorithm']}, ms)", f"{out['checksum_ms_per_shard']:.2f}",
                  f"{out['checksum_share_of_read']:.0%} of a cached read ({out['read_ms_per_shard']:.2f} ms)", "")
    if "stream_images_per_s" in out:
        t.add_row("DALI streaming s3://", f"{out['stream_images_per_s']:.1f}", "", "")
        t.add_row("  requests / sample", str(out["stream_requests_per_sample"]), "", "")
    if "shared_shards_requests_per_sample" in out:
        t.add_row(f"  shared shards ({out['shared_shards_world_size']} ranks): requests / sample",
                  str(out["shared_shards_requests_per_sample"]), "", "")
        t.add_row("  bytes read / sample", f"{out['stream_bytes_per_sample']:.0f} "
                                           f"(stored: {out['stream_bytes_per_sample_stored']:.0f})", "", "")
    if "mix_stream_requests_per_sample" in out:
        t.add_row("  two-source mix: requests / sample", str(out["mix_stream_requests_per_sample"]), "", "")
    Console().print(t)
