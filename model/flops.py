"""FLOPs per image of each part of a Latent MIM step, counted with `torch.utils.flop_counter`.

Each part is run on its own inputs under `FlopCounterMode` (matmuls, convolutions and attention;
element-wise ops are not counted, as is usual for MFU). By default everything runs on the meta
device, so counting even ViT-L costs no compute and no memory.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from lmim.model.config import ModelConfig
from lmim.model.encoder import encode_patches
from lmim.model.latent_mim import LatentMIM
from lmim.model.masks import random_masks


def default_num_visible(cfg: ModelConfig) -> int:
    """The paper's ratio, 20 of 196 visible, scaled to the grid (at least 1)."""
    n = cfg.grid_size**2
    return max(1, min(n - 1, round(n * 20 / 196)))


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_per_image(cfg: ModelConfig, num_visible: int | None = None, batch_size: int = 2,
                    device: str | torch.device = "meta") -> dict[str, float]:
    """FLOPs per image of one training step, by part.

    Returns:
        dict with `online_encoder_fwd_bwd`, `target_encoder_fwd`, `projectors` (online fwd+bwd +
        target fwd), `decoder_fwd_bwd` and `total_step` (the whole forward + backward, measured in
        one pass; it also holds the loss, so it is a little above the sum of the parts).
    """
    k = num_visible if num_visible is not None else default_num_visible(cfg)
    n = cfg.grid_size**2
    with torch.device(device):
        net = LatentMIM(cfg)
    side = cfg.grid_size * (cfg.patch_size + cfg.patch_gap)
    images = torch.randn(batch_size, cfg.in_chans, side, side, device=device)
    visible, target = random_masks(batch_size, n, k, device="cpu")
    visible, target = visible.to(device), target.to(device)
    patches = net.patchify(images)
    dim = net.encoder.embed_dim

    def online():
        encode_patches(net.encoder, patches, visible).sum().backward()

    parts: dict[str, int] = {"online_encoder_fwd_bwd": _count(online)}
    if net.target_encoder is not None:
        def target_fwd():
            with torch.no_grad():
                net._targets(patches, target)
        # The target's own projector is counted under "projectors"; take it out here.
        with torch.no_grad():
            t_tok = torch.randn(batch_size, target.shape[1], dim, device=device)
        t_proj = _count(lambda: net.target_projector(t_tok))
        parts["target_encoder_fwd"] = _count(target_fwd) - t_proj
    elif cfg.objective == "naive_mse":
        parts["target_encoder_fwd_bwd"] = _count(
            lambda: encode_patches(net.encoder, patches, target).sum().backward())
        t_proj = 0
    else:
        t_proj = 0
    if net.projector is not None:
        x = torch.randn(batch_size, 1 + k, dim, device=device, requires_grad=True)
        online_proj = _count(lambda: net.projector(x).sum().backward())
        if cfg.objective == "naive_mse":
            xt = torch.randn(batch_size, target.shape[1], dim, device=device, requires_grad=True)
            t_proj = _count(lambda: net.projector(xt).sum().backward())
        parts["projectors"] = online_proj + t_proj
    mem = torch.randn(batch_size, 1 + k, dim, device=device, requires_grad=True)
    parts["decoder_fwd_bwd"] = _count(lambda: net.decoder(mem, visible, target).sum().backward())

    def step():
        out = net(images, visible, target, sim_target=0.5)
        out["loss"].backward()

    try:
        parts["total_step"] = _count(step)
    except (NotImplementedError, RuntimeError):
        # The metrics (SVD) have no meta kernel on some builds; fall back to the sum of the parts.
        parts["total_step"] = sum(parts.values())
    return {name: v / batch_size for name, v in parts.items()}
