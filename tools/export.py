"""`lmim export CHECKPOINT OUT.safetensors` or `lmim export CHECKPOINT OUT_DIR`: the trained encoder as a plain timm ViT.

A folder export (any OUT not ending in .safetensors) has the layout timm and the Hugging Face Hub
use: `config.json` (architecture, model_args, pretrained_cfg, written by timm's own
`save_config_for_hf`), `model.safetensors` and a `README.md` model card, so that

    timm.create_model("local-dir:OUT_DIR", pretrained=True)

loads it, and `hf upload USER/NAME OUT_DIR` (huggingface_hub's CLI) publishes it unchanged. The rest of this
note is about the single-file export.

A checkpoint directory (written by the trainer) holds `model.safetensors` (the LatentMIM
`state_dict()`) and `config.yaml` (the full resolved training config; its `model:` section is a
`ModelConfig`). The export holds the online encoder's state dict with timm's own keys, plus
safetensors metadata `lmim.arch` (the timm model name) and `lmim.timm_kwargs` (JSON), so that

    timm.create_model(ARCH, pretrained=True,
                      pretrained_cfg_overlay=dict(file=OUT, num_classes=0, custom_load=False), **KWARGS)

loads it with strict keys (`num_classes=0` in the overlay keeps timm's loader strict: it only
relaxes strictness when the model's class count differs from the weights') and gives the
trained encoder's features, at img_size = grid * patch with no patch gap. `custom_load=False`
because several ViTs' default pretrained_cfg says their published weights are a big_vision .npz,
and timm before 1.0.31 keeps that flag for a file the overlay names (it then reads our
safetensors as an .npz).
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmim.model.config import ModelConfig
from lmim.model.encoder import encoder_kwargs
from lmim.pipeline.storage import as_os_error, file_mode_for_new_files, has_scheme

META_ARCH = "lmim.arch"
META_KWARGS = "lmim.timm_kwargs"
META_NORMALISATION = "lmim.normalisation"   # {"mean": [3], "std": [3]}: what the encoder's inputs were normalised with
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile / DDP wrappers, should a trainer save through them


class ExportError(ValueError):
    """Bad input to export/load, with a message saying what is wrong and what to do."""


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _load_yaml(path: Path):
    """A checkpoint's config.yaml as a mapping; ExportError when it is not YAML or not a mapping."""
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml's parser and scanner errors, bad bytes
        raise ExportError(f"{path} is not a readable YAML file ({type(exc).__name__}); the checkpoint is damaged "
                          "or was not written by `lmim pretrain`.") from None
    if not OmegaConf.is_dict(raw):
        raise ExportError(f"{path} is not a YAML mapping; it is not a training config written by `lmim pretrain`.")
    return raw


def _refuse_non_checkpoint(path: Path) -> None:
    """A path that does not exist, is a file, or is a run folder (which holds checkpoints): said as such."""
    from lmim.train.checkpoint import checkpoints_dir, latest_checkpoint

    if not path.exists():
        raise ExportError(f"{path} does not exist: pass a checkpoint directory (run_dir/checkpoints/step_N).")
    if not path.is_dir():
        raise ExportError(f"{path} is a file: pass a checkpoint directory (run_dir/checkpoints/step_N).")
    def newest_of(run_dir: Path) -> str:
        newest = latest_checkpoint(run_dir)
        return f"the newest is {newest}" if newest is not None else "it has no complete checkpoint yet"

    if checkpoints_dir(path).is_dir():
        raise ExportError(f"{path} is a run folder, not a checkpoint: pass one of its checkpoints ({newest_of(path)}).")
    whole = path.resolve()   # `.` from inside the folder has no name
    if whole.name == checkpoints_dir(whole.parent).name and not (path / "config.yaml").exists():
        raise ExportError(f"{path} is a run's checkpoints folder, not a checkpoint: pass one of the checkpoints "
                          f"in it ({newest_of(whole.parent)}).")


def load_model_config(checkpoint_dir: str | os.PathLike) -> ModelConfig:
    """The checkpoint's `model:` config section as a validated ModelConfig."""
    _refuse_non_checkpoint(Path(checkpoint_dir))
    path = Path(checkpoint_dir) / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{path} not found: pass a checkpoint directory written by `lmim pretrain`.")
    raw = _load_yaml(path)
    section = raw.get("model") if "model" in raw else None
    if section is None:
        raise ExportError(f"{path} has no `model:` section; it is not a training config written by `lmim pretrain`.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), section)
    except Exception as exc:  # OmegaConf raises several types; one message for the user
        raise ExportError(f"the `model:` section of {path} does not match ModelConfig: {exc}") from exc
    return OmegaConf.to_object(merged)


def load_latent_mim(checkpoint_dir: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild the LatentMIM of a checkpoint directory (config.yaml + model.safetensors), in eval mode."""
    from lmim.model.latent_mim import LatentMIM

    cfg = load_model_config(checkpoint_dir)
    weights = Path(checkpoint_dir) / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights} not found: the checkpoint directory is incomplete.")
    _verify_weights(Path(checkpoint_dir))
    try:
        state = {_strip(k): v for k, v in load_file(str(weights), device=str(map_location)).items()}
    except Exception as exc:  # safetensors raises its own error types for a corrupt header or body
        raise ExportError(f"{weights} cannot be read ({type(exc).__name__}: {exc}); the checkpoint is damaged.") from None
    net = LatentMIM(cfg)
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor whose shape is not the config's
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise ExportError(f"{weights} does not match the model described by its config.yaml ({first}); "
                          "was it written by another version or another config?") from None
    if missing or unexpected:
        raise ExportError(
            f"{weights} does not match the model described by its config.yaml "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...); was it written by another version?"
        )
    return net.eval()


def _verify_weights(checkpoint_dir: Path) -> None:
    """Check model.safetensors against the size and checksum its checkpoint recorded.

    The trainer writes `complete.json` last, into a `.tmp-step_N` folder it then renames: a trainer's
    checkpoint without it (or still named .tmp-/.trash-) is one whose write was stopped, or a partial
    copy, and is refused. A folder made by hand (model.safetensors + config.yaml, not under a run's
    checkpoints/) has no record to check against and is read as it is."""
    from lmim.train.checkpoint import COMPLETE_MARKER, CheckpointError, verify_checkpoint

    name = checkpoint_dir.resolve().name
    if name.startswith((".tmp-", ".trash-")):
        raise ExportError(f"{checkpoint_dir} is a checkpoint the trainer was still writing (or removing), not a "
                          "complete one; export one of the run's step_N checkpoints.")
    if not (checkpoint_dir / COMPLETE_MARKER).is_file():
        if checkpoint_dir.resolve().parent.name == "checkpoints":
            raise ExportError(f"{checkpoint_dir} has no {COMPLETE_MARKER}: its write was stopped or it is a partial "
                              "copy; export another checkpoint of the run, or copy this one again whole.")
        return
    try:
        verify_checkpoint(checkpoint_dir, only=("model.safetensors", "config.yaml"))
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, so equal tensors give equal bytes.

    safetensors keeps `__metadata__` in a hash map whose order changes from one process to the
    next; the tensor offsets are relative to the end of the header, so only the header moves.
    """
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def encoder_state_dict(net, which: str = "online") -> dict[str, torch.Tensor]:
    """The encoder's timm state dict (contiguous CPU tensors)."""
    enc = net.encoder if which == "online" else net.target_encoder
    if enc is None:
        raise ExportError(f"this model (objective {net.cfg.objective!r}) has no EMA target encoder; export the online one.")
    return {k: v.detach().to("cpu").contiguous() for k, v in enc.state_dict().items()}


def _normalisation(checkpoint_dir: Path) -> dict[str, list[float]]:
    """The mean and std the run normalised its images with (its config.yaml; the trainer's defaults)."""
    data = _load_yaml(checkpoint_dir / "config.yaml").get("data") or {}
    return {"mean": [float(v) for v in data.get("mean", (0.485, 0.456, 0.406))],
            "std": [float(v) for v in data.get("std", (0.229, 0.224, 0.225))]}


def _write_weights(net, which: str, out: Path, normalisation: dict[str, list[float]]) -> dict:
    """Write the encoder's timm state dict to `out` (canonical header, lmim metadata); returns its kwargs."""
    kwargs = encoder_kwargs(net.cfg)
    meta = {META_ARCH: net.cfg.arch, META_KWARGS: json.dumps(kwargs, sort_keys=True),
            META_NORMALISATION: json.dumps(normalisation, sort_keys=True), "format": "pt"}
    try:
        save_file(encoder_state_dict(net, which), str(out), metadata=meta)
    except Exception as exc:  # safetensors reports a failed write as its own error type
        raise as_os_error(exc, out) from None
    _canonical_header(out)
    return kwargs


def _refuse_url(out: str | os.PathLike) -> None:
    """`Path("s3://b/x")` is the local folder `s3:/b/x`: an export "to s3://" would land on local disk."""
    if has_scheme(str(out)):
        raise ExportError(f"output {out} is a URL; lmim export writes a local file or folder: export to a local "
                          "path, then copy it up (e.g. `aws s3 cp --recursive`, `hf upload`).")


def export_encoder(checkpoint_dir: str | os.PathLike, out: str | os.PathLike, which: str = "online") -> dict:
    """Write the encoder of `checkpoint_dir` to `out` (atomically); returns the timm kwargs."""
    _refuse_url(out)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"output {out} must end in .safetensors (timm picks the loader by extension), "
                          "or be a folder name for a timm / Hugging Face folder export.")
    _refuse_inside_checkpoint(Path(checkpoint_dir), out)
    if out.is_dir():
        raise ExportError(f"{out} is an existing folder; give a new file name ending in .safetensors.")
    net = load_latent_mim(checkpoint_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        kwargs = _write_weights(net, which, tmp, _normalisation(Path(checkpoint_dir)))
        tmp.chmod(file_mode_for_new_files())   # safetensors writes 0600; an export is meant to be shared
        os.replace(tmp, out)
    except OSError as exc:  # named as the output the user gave, not the temporary file beside it
        raise OSError(exc.errno or errno.EIO, exc.strerror or str(exc), str(out)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return kwargs


def _refuse_inside_checkpoint(checkpoint_dir: Path, out: Path) -> None:
    """An export written into its own checkpoint folder would replace the checkpoint's files
    (`CK/model.safetensors` is the full model a resume needs)."""
    ckpt, target = checkpoint_dir.resolve(), out.resolve()
    if target == ckpt or ckpt in target.parents:
        raise ExportError(f"{out} is inside the checkpoint folder {checkpoint_dir}; write the export somewhere else "
                          "(the checkpoint's own files must stay as they are).")


FOLDER_FILES = ("config.json", "model.safetensors", "README.md")
# An output named like another weights format was meant as a file, not as a folder to create.
_OTHER_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".h5", ".npz")


def export_folder(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, which: str = "online",
                  figures: dict[str, float] | None = None) -> dict:
    """Write the encoder of `checkpoint_dir` as a timm / Hugging Face Hub folder (atomically).

    Args:
        checkpoint_dir: a checkpoint directory written by `lmim pretrain`.
        out_dir: the folder to write; replaced if it is an earlier export, refused if it holds anything else.
        which: "online" (the paper's) or "target" encoder.
        figures: evaluation results for the model card (name -> percent); the run's last logged
            k-NN top-1 is added when the run logged one.

    Returns:
        The timm kwargs (as `export_encoder`); the folder holds exactly FOLDER_FILES.
    """
    from timm.models._hub import save_config_for_hf  # timm's own writer, so its loader reads the file back

    _refuse_url(out_dir)
    ckpt, out = Path(checkpoint_dir), Path(out_dir)
    if out.resolve() == Path.cwd().resolve() or out.name in ("", ".", ".."):
        raise ExportError(f"output {out_dir} is the current folder (or its parent), which an export replaces whole; "
                          "name a folder for it, e.g. my-encoder/.")
    _refuse_inside_checkpoint(ckpt, out)
    if out.exists() and not _is_folder_export(out):
        extra = sorted(p.name for p in out.iterdir() if p.name not in FOLDER_FILES) if out.is_dir() else []
        held = f" (it holds {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}, which an export would delete)" \
            if extra else ""
        raise ExportError(f"{out} exists and is not an lmim export folder{held}; choose a new folder name.")
    net = load_latent_mim(ckpt)
    train_cfg = _load_yaml(ckpt / "config.yaml")
    normalisation = _normalisation(ckpt)
    size = net.cfg.grid_size * net.cfg.patch_size
    # The preprocessing the encoder was trained and evaluated with (lmim resizes the whole image).
    pretrained_cfg = {"input_size": (net.cfg.in_chans, size, size), "interpolation": "bicubic", "crop_pct": 1.0,
                      "mean": tuple(normalisation["mean"]), "std": tuple(normalisation["std"])}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kwargs = _write_weights(net, which, tmp / "model.safetensors", normalisation)
        (tmp / "model.safetensors").chmod(file_mode_for_new_files())
        encoder = net.encoder if which == "online" else net.target_encoder
        save_config_for_hf(encoder, tmp / "config.json", model_args=kwargs,  # a Path: timm < 1.0.31 calls .open() on it
                           model_config={"pretrained_cfg": pretrained_cfg})
        _drop_inherited_weight_facts(tmp / "config.json")
        (tmp / "README.md").write_text(model_card(ckpt, train_cfg, kwargs, which, out, figures))
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kwargs


def _drop_inherited_weight_facts(config_json: Path) -> None:
    """timm copies the architecture's default pretrained_cfg, whose `tag`, `license` and `custom_load`
    describe timm's published weights (e.g. augreg on ImageNet-21k, a big_vision .npz), not these:
    name ours, drop the licence (it follows from the training data, which only the user knows) and
    clear the .npz flag (timm before 1.0.31 obeys it for a local folder and misreads model.safetensors)."""
    config = json.loads(config_json.read_text())
    config["pretrained_cfg"]["tag"] = "lmim"
    config["pretrained_cfg"].pop("license", None)
    config["pretrained_cfg"]["custom_load"] = False   # as timm >= 1.0.31 writes it
    config_json.write_text(json.dumps(config, indent=2))


def _is_folder_export(path: Path) -> bool:
    """An empty folder, or one an earlier `lmim export` wrote: exactly FOLDER_FILES, with the `lmim` tag
    in config.json. Any file names alone would let a user's own README.md (or another tool's timm
    folder) be replaced."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    if not names:
        return True
    if names != set(FOLDER_FILES):
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("pretrained_cfg") or {}).get("tag") == "lmim"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the C
    library or the file system has no such call (then the caller falls back to two renames)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):   # not glibc >= 2.28 / not Linux
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, out: Path) -> None:
    """Replace `out` by the complete folder `new`: a reader sees the old export or the new one, never
    half, and never none: the two folders are exchanged in one step where Linux can (two renames
    elsewhere, with a moment in between when `out` is missing)."""
    if out.exists() and _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)   # `new` now names the old export
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _run_facts(ckpt: Path) -> dict[str, Any]:
    """Step, epoch and the last logged k-NN top-1 of the run a checkpoint belongs to (what is known)."""
    facts: dict[str, Any] = {}
    state = ckpt / "trainer_state.json"
    if state.is_file():
        saved = json.loads(state.read_text())
        facts.update({k: saved[k] for k in ("step", "updates", "epoch") if k in saved})
    metrics = ckpt.parent.parent / "metrics.jsonl"  # run_dir/checkpoints/step_N -> run_dir/metrics.jsonl
    if metrics.is_file():
        step = facts.get("step")
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if "knn_top1" in rec and (step is None or rec.get("step", 0) <= step):
                facts["knn_top1"] = rec["knn_top1"]
    return facts


def _data_said(data: dict) -> str:
    """The data a run trained on, for the model card: its sources and weights when it mixed several."""
    sources = data.get("sources") or []
    if not sources:
        return f"`{data.get('url', 'unknown')}`"
    return ", ".join(f"`{src.get('url', '?')}` (weight {src.get('weight', 1)})" for src in sources)


def model_card(ckpt: Path, train_cfg, kwargs: dict, which: str, out: Path,
               figures: dict[str, float] | None = None) -> str:
    """The README.md of a folder export: what the model is, how it was trained, how to load it."""
    facts = _run_facts(ckpt)
    model, data = train_cfg.get("model") or {}, train_cfg.get("data") or {}
    results = dict(figures or {})
    if "knn_top1" in facts:
        results.setdefault("k-NN top-1 during training (data.eval_url)", facts["knn_top1"])
    lines = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        "- image-feature-extraction",
        "- timm",
        "- lmim",
        "- latent-mim",
        "---",
        "",
        f"# {train_cfg.get('name', 'lmim')}: a Latent MIM {model.get('arch', '')} encoder",
        "",
        f"The {which} encoder of a Latent MIM run (Wei, Gupta and Morgado, ECCV 2024), pretrained with "
        f"lmim and exported as a plain timm VisionTransformer with no classifier head "
        f"(`num_classes=0`: the model returns the CLS feature). lmim's own k-NN and linear figures pool the "
        f"mean of the patch tokens instead (the paper's protocol; `lmim eval --pool cls` uses the CLS token): "
        f"`vit.forward_features(x)[:, vit.num_prefix_tokens:].mean(1)` gives those features.",
        "",
        "## Load",
        "",
        "```python",
        f"import timm; vit = timm.create_model(\"local-dir:path/to/{out.name}\", pretrained=True)  # this folder",
        "```",
        "",
        "After `hf upload USER/NAME .` of this folder (huggingface_hub's CLI): `timm.create_model(\"hf-hub:USER/NAME\", "
        "pretrained=True)`. On a machine with a CPU-only torch and PyPI's CUDA-built torchvision, "
        "`import lmim` first (it makes timm importable there).",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{model.get('arch')}` with {json.dumps(kwargs, sort_keys=True)} |",
        f"| objective | {model.get('objective')} |",
        f"| data | {_data_said(data)} |",
        f"| masking | {data.get('mask', 'random')}, {data.get('num_visible', '?')} visible patches of "
        f"{model.get('grid_size', 0) ** 2} |",
        # `updates` counts the optimizer updates taken; `step` is renumbered when a resume changes the
        # steps per epoch (another batch size or number of processes), so it can say more or fewer
        f"| optimizer steps | {facts.get('updates', facts.get('step', 'unknown'))} |",
        f"| epochs | {facts['epoch']:.2f} of {train_cfg.get('epochs')} |" if "epoch" in facts else
        f"| epochs | {train_cfg.get('epochs')} planned |",
        "",
    ]
    if results:
        lines += ["## Results", "", "| evaluation | value |", "|---|---|"]
        lines += [f"| {name} | {value:.2f} |" for name, value in results.items()]
        lines += [""]
    lines += ["## Training config", "", "```yaml", OmegaConf.to_yaml(train_cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def read_export_metadata(path: str | os.PathLike) -> tuple[str, dict]:
    """(timm model name, timm kwargs) stored in an exported file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors' own error types for a file that is not safetensors
        raise ExportError(f"{path} is not a readable safetensors file ({' '.join(str(exc).split())}); "
                          "pass a file written by `lmim export`.") from None
    if META_ARCH not in meta or META_KWARGS not in meta:
        raise ExportError(f"{path} has no lmim metadata; it was not written by `lmim export`.")
    try:
        kwargs = json.loads(meta[META_KWARGS])
    except ValueError:
        kwargs = None
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ExportError(f"{path}: its lmim metadata ({META_KWARGS}) is not a JSON object of timm arguments; "
                          "export the checkpoint again with `lmim export`.")
    return meta[META_ARCH], kwargs


def read_export_normalisation(path: str | os.PathLike) -> dict[str, list[float]] | None:
    """The mean and std an exported file or folder records for its inputs; None when it records none
    (a file exported by an older lmim)."""
    p = Path(path)
    try:
        if p.is_dir():
            cfg = json.loads((p / "config.json").read_text()).get("pretrained_cfg", {})
            found = {"mean": cfg.get("mean"), "std": cfg.get("std")}
        else:
            with safe_open(str(p), framework="pt") as f:
                found = json.loads((f.metadata() or {}).get(META_NORMALISATION, "null"))
    except Exception as exc:  # unreadable JSON or safetensors: the export is damaged
        raise ExportError(f"{p} has unreadable export metadata ({type(exc).__name__}); export the checkpoint again "
                          "with `lmim export`.") from None
    if found is None:
        return None
    ok = isinstance(found, dict) and all(
        isinstance(found.get(k), list) and len(found[k]) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in found[k])
        for k in ("mean", "std")) and all(v > 0 for v in found["std"])
    if not ok:
        raise ExportError(f"{p}: its recorded input mean/std is not three finite numbers each (std positive); "
                          "export the checkpoint again "
                          "with `lmim export`.")
    return {"mean": [float(v) for v in found["mean"]], "std": [float(v) for v in found["std"]]}


# `lmim` before timm: importing it makes timm importable where a CPU-only torch meets PyPI's
# CUDA-built torchvision (lmim/_torchvision_compat.py); on other installs it costs nothing.
TIMM_IMPORT = "import lmim, timm"


def timm_line(path: str | os.PathLike, var: str = "vit") -> str:
    """One line a user can paste into Python to load an exported file with timm."""
    return f"{TIMM_IMPORT}; {var} = {timm_command(path)}"


def timm_command(path: str | os.PathLike) -> str:
    """The exact Python line that loads an exported file (or folder) with timm; its path absolute, so the
    line works from any folder it is pasted in."""
    path = os.path.abspath(path)
    if Path(path).is_dir():
        return f"timm.create_model({'local-dir:' + str(path)!r}, pretrained=True)"
    arch, kwargs = read_export_metadata(path)
    kw = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (
        f"timm.create_model({arch!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes=0, custom_load=False){kw})"
    )


def load_encoder(path: str | os.PathLike):
    """A timm VisionTransformer (eval mode) from an exported .safetensors or a checkpoint directory."""
    import timm

    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return _built(p, lambda: timm.create_model(f"local-dir:{p}", pretrained=True))
    if p.is_dir():
        net = load_latent_mim(p)
        return net.encoder.eval()
    if not p.is_file():
        raise ExportError(f"{p} does not exist: pass an exported .safetensors file or a checkpoint directory.")
    arch, kwargs = read_export_metadata(p)
    return _built(p, lambda: timm.create_model(
        arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(p), num_classes=0, custom_load=False), **kwargs))


def _built(path: Path, build):
    """build() (a timm model from an export), in eval mode; ExportError naming `path` when the export's
    description (architecture, arguments) or its weights cannot make a model."""
    try:
        return build().eval()
    except Exception as exc:  # timm: unknown model, bad kwargs, missing keys, size mismatch; safetensors errors
        detail = " ".join(str(exc).split())
        raise ExportError(f"{path} cannot be loaded as a timm model ({type(exc).__name__}: {detail[:300]}); "
                          "export the checkpoint again with `lmim export`.") from None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lmim export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="checkpoint directory (config.yaml + model.safetensors)")
    ap.add_argument("out", help="output: a file ending in .safetensors, or a folder (config.json, "
                                "model.safetensors, README.md) that timm loads as local-dir:OUT and the Hub takes as is")
    ap.add_argument("--encoder", choices=("online", "target"), default="online",
                    help="which encoder to export (default: online, as in the paper)")
    args = ap.parse_args(argv)
    as_file = args.out.endswith(".safetensors")
    try:  # ENC.SAFETENSORS too was meant as a file (refused there: timm reads only .safetensors as safetensors)
        named_as_file = Path(args.out).suffix.lower() in (".safetensors", *_OTHER_WEIGHT_SUFFIXES)
        export = export_encoder if as_file or named_as_file else export_folder
        kwargs = export(args.checkpoint, args.out, args.encoder)
    except ExportError as exc:
        print(f"lmim export: {exc}", file=sys.stderr)
        return 2
    weights = args.out if as_file else str(Path(args.out) / "model.safetensors")
    n = sum(t.numel() for t in load_file(weights).values())
    what = "" if as_file else f" ({', '.join(FOLDER_FILES)})"
    print(f"wrote {args.out}{what}: {args.encoder} encoder, {n / 1e6:.2f} M parameters, timm kwargs {kwargs}")
    print("load it with:")
    print(f"  {timm_line(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
