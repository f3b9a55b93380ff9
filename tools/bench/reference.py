"""The authors' Latent MIM code as a baseline for `lmim bench model --reference DIR`.

DIR is the user's own checkout of github.com/yibingwei-1/LatentMIM (lmim ships none of its code).
Its `models_lmim.LMIM` is built with the same sizes as lmim's model and stepped the way its
`main_lmim.train_one_epoch` steps it: the model draws its own masks and updates its EMA target
inside `forward`, then `zero_grad`, `backward` and torch's default AdamW (betas 0.9/0.95, the
reference's decay / no-decay groups). Precision is the one asked of lmim's step, so both sides
run in the same arithmetic (the reference's own GPU recipe is fp16 autocast with a GradScaler;
on the CPU it is fp32).
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types
from functools import partial
from pathlib import Path

import torch

from lmim.model.config import ModelConfig


def _import_reference(repo: Path):
    sys.path.insert(0, str(repo))  # its modules import each other by bare name (vits, xvits)
    try:
        return importlib.import_module("models_lmim")
    finally:
        sys.path.remove(str(repo))


def reference_problem(repo: str | Path) -> str | None:
    """Why `repo` cannot serve as the reference (one sentence), or None: its models_lmim must import
    and define LMIM. Asked before anything is built, so a broken checkout costs no minutes."""
    repo = Path(repo).expanduser()
    if not (repo / "models_lmim.py").is_file():
        return f"{repo} has no models_lmim.py: pass a checkout of github.com/yibingwei-1/LatentMIM to --reference."
    try:
        module = _import_reference(repo)
    except Exception as e:  # its own import errors (a missing dependency, an edited file) are the user's to see
        return (f"models_lmim.py in {repo} does not import ({type(e).__name__}: {e}); pass a working checkout "
                "of github.com/yibingwei-1/LatentMIM to --reference.")
    if not hasattr(module, "LMIM"):
        return f"models_lmim.py in {repo} defines no LMIM class: pass a checkout of github.com/yibingwei-1/LatentMIM."
    return None


def build_reference(repo: str | Path, cfg: ModelConfig, num_visible: int, *, embed_dim: int, depth: int,
                    num_heads: int) -> torch.nn.Module:
    """The reference LMIM with lmim's sizes (encoder sizes resolved from lmim's built encoder)."""
    module = _import_reference(Path(repo))
    projector = types.SimpleNamespace(mlp_dim=cfg.projector_hidden_dim, mlp_depth=cfg.projector_layers)
    return module.LMIM(grid_size=cfg.grid_size, patch_size=cfg.patch_size, patch_gap=cfg.patch_gap,
                       in_chans=cfg.in_chans, embed_dim=embed_dim, num_heads=num_heads, depth=depth,
                       target_depth=depth, decoder_embed_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                       decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.decoder_mlp_ratio,
                       norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), tau=cfg.tau, num_vis=num_visible,
                       avg_sim_coeff=cfg.sim_reg_coef, proj_cfg=projector)


def reference_optimizer(net: torch.nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """torch's default AdamW over the reference's groups: no decay on biases, norms, embeddings, 1-D tensors."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or "bias" in name or "norm" in name or "embed" in name
        (no_decay if skip else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def reference_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, momentum: float,
                   autocast: torch.dtype | None) -> None:
    """One optimizer step as the reference's training loop takes it (accum_iter 1)."""
    ctx = (torch.autocast(images.device.type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())
    with ctx:
        loss, _ = net(images, mom=momentum, sim_trg=0.75, update_ema=True)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
