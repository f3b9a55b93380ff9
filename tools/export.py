"""`lmim export CHECKPOINT OUT.safetensors`: the trained encoder as a plain timm ViT.

A checkpoint directory (written by the trainer) holds `model.safetensors` (the LatentMIM
`state_dict()`) and `config.yaml` (the full resolved training config; its `model:` section is a
`ModelConfig`). The export holds the online encoder's state dict with timm's own keys, plus
safetensors metadata `lmim.arch` (the timm model name) and `lmim.timm_kwargs` (JSON), so that

    timm.create_model(ARCH, pretrained=True,
                      pretrained_cfg_overlay=dict(file=OUT, num_classes=0), **KWARGS)

loads it with strict keys (`num_classes=0` in the overlay keeps timm's loader strict: it only
relaxes strictness when the model's class count differs from the weights') and gives the
trained encoder's features, at img_size = grid * patch with no patch gap.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmim.model.config import ModelConfig
from lmim.model.encoder import encoder_kwargs

META_ARCH = "lmim.arch"
META_KWARGS = "lmim.timm_kwargs"
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


def load_model_config(checkpoint_dir: str | os.PathLike) -> ModelConfig:
    """The checkpoint's `model:` config section as a validated ModelConfig."""
    path = Path(checkpoint_dir) / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{path} not found: pass a checkpoint directory written by `lmim pretrain`.")
    raw = OmegaConf.load(path)
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
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{weights} does not match the model described by its config.yaml "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...); was it written by another version?"
        )
    return net.eval()


def _verify_weights(checkpoint_dir: Path) -> None:
    """Check model.safetensors against the size and checksum its checkpoint recorded (when it did)."""
    from lmim.train.checkpoint import COMPLETE_MARKER, CheckpointError, verify_checkpoint

    if (checkpoint_dir / COMPLETE_MARKER).is_file():
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


def export_encoder(checkpoint_dir: str | os.PathLike, out: str | os.PathLike, which: str = "online") -> dict:
    """Write the encoder of `checkpoint_dir` to `out` (atomically); returns the timm kwargs."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"output {out} must end in .safetensors (timm picks the loader by extension).")
    net = load_latent_mim(checkpoint_dir)
    kwargs = encoder_kwargs(net.cfg)
    meta = {META_ARCH: net.cfg.arch, META_KWARGS: json.dumps(kwargs, sort_keys=True), "format": "pt"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(encoder_state_dict(net, which), str(tmp), metadata=meta)
        _canonical_header(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return kwargs


def read_export_metadata(path: str | os.PathLike) -> tuple[str, dict]:
    """(timm model name, timm kwargs) stored in an exported file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_ARCH not in meta or META_KWARGS not in meta:
        raise ExportError(f"{path} has no lmim metadata; it was not written by `lmim export`.")
    return meta[META_ARCH], json.loads(meta[META_KWARGS])


# `lmim` before timm: importing it makes timm importable where a CPU-only torch meets PyPI's
# CUDA-built torchvision (lmim/_torchvision_compat.py); on other installs it costs nothing.
TIMM_IMPORT = "import lmim, timm"


def timm_line(path: str | os.PathLike, var: str = "vit") -> str:
    """One line a user can paste into Python to load an exported file with timm."""
    return f"{TIMM_IMPORT}; {var} = {timm_command(path)}"


def timm_command(path: str | os.PathLike) -> str:
    """The exact Python line that loads an exported file with timm."""
    arch, kwargs = read_export_metadata(path)
    kw = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (
        f"timm.create_model({arch!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes=0){kw})"
    )


def load_encoder(path: str | os.PathLike):
    """A timm VisionTransformer (eval mode) from an exported .safetensors or a checkpoint directory."""
    import timm

    p = Path(path)
    if p.is_dir():
        net = load_latent_mim(p)
        return net.encoder.eval()
    if not p.is_file():
        raise ExportError(f"{p} does not exist: pass an exported .safetensors file or a checkpoint directory.")
    arch, kwargs = read_export_metadata(p)
    return timm.create_model(
        arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(p), num_classes=0), **kwargs
    ).eval()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lmim export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="checkpoint directory (config.yaml + model.safetensors)")
    ap.add_argument("out", help="output file, *.safetensors")
    ap.add_argument("--encoder", choices=("online", "target"), default="online",
                    help="which encoder to export (default: online, as in the paper)")
    args = ap.parse_args(argv)
    try:
        kwargs = export_encoder(args.checkpoint, args.out, args.encoder)
    except ExportError as exc:
        print(f"lmim export: {exc}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in load_file(args.out).values())
    print(f"wrote {args.out}: {args.encoder} encoder, {n / 1e6:.2f} M parameters, timm kwargs {kwargs}")
    print("load it with:")
    print(f"  {timm_line(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
