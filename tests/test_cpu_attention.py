"""The attention kernels the model picks on the CPU under bf16 autocast (model/attention.py): the
explicit softmax form, computing what SDPA computes to bf16 rounding, in timm's modules as well as
lmim's decoder, with parameters and state dicts unchanged and SDPA kept wherever timm would use it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import set_fused_attn
from timm.models.vision_transformer import Attention

from lmim.model.attention import CpuAttention, attend, use_cpu_attention
from lmim.model.config import ModelConfig
from lmim.model.latent_mim import LatentMIM


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, transposed: bool) -> torch.Tensor:
    q = q * q.shape[-1] ** -0.5
    if transposed:
        return (k @ q.transpose(-2, -1)).softmax(dim=-2, dtype=torch.float32).transpose(-2, -1) @ v
    return (q @ k.transpose(-2, -1)).softmax(dim=-1, dtype=torch.float32) @ v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("keys", [8, 58])         # the transposed softmax (few keys) and the plain one
@pytest.mark.parametrize("head_dim", [8, 64])      # the decoder's narrow heads and the encoders' wide ones
def test_attend_under_cpu_bf16_autocast_is_the_explicit_form_and_matches_fp32(keys, head_dim):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, n, head_dim, generator=g, requires_grad=True) for n in (58, keys, keys))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v)
        explicit = _explicit(q, k, v, transposed=keys < 16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, explicit)  # the explicit kernel, not SDPA
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v)  # fp32
    ref.square().sum().backward()
    assert _rel(out, ref) < 2e-2                   # bf16 rounding, not a different function
    for got, t in zip(grads, (q, k, v)):
        assert _rel(got, t.grad) < 5e-2


def _tiny_model() -> LatentMIM:
    return LatentMIM(ModelConfig(arch="vit_tiny_patch16_224", embed_dim=32, depth=2, num_heads=2, patch_size=4,
                                 grid_size=4, patch_gap=0, projector_hidden_dim=64, decoder_dim=32,
                                 decoder_depth=1, decoder_num_heads=4))


def test_the_model_uses_cpu_attention_with_timm_state_dict():
    net = _tiny_model()
    attns = [m for m in net.modules() if isinstance(m, Attention)]
    assert attns and all(type(m) is CpuAttention for m in attns)
    plain = _tiny_model()
    for m in plain.modules():
        if type(m) is CpuAttention:
            m.__class__ = Attention
    assert list(net.state_dict()) == list(plain.state_dict())


def test_cpu_attention_drops_the_fused_kernel_only_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    timm_attn = Attention(32, num_heads=2, qkv_bias=True).eval()
    ours = use_cpu_attention(torch.nn.Sequential(Attention(32, num_heads=2, qkv_bias=True))).eval()[0]
    ours.load_state_dict(timm_attn.state_dict())
    assert ours.fused_attn
    x = torch.randn(3, 10, 32)
    assert torch.equal(ours(x), timm_attn(x))                    # fp32: timm's own (fused) path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ours.fused_attn
        timm_attn.fused_attn = False
        expected = timm_attn(x)                                  # timm's explicit path
        timm_attn.fused_attn = True
        got = ours(x)
    assert torch.equal(got, expected)
    assert ours.fused_attn


def test_cpu_attention_keeps_timm_unfused_choice():
    set_fused_attn(False)
    try:
        attn = use_cpu_attention(torch.nn.Sequential(Attention(16, num_heads=2)))[0]
    finally:
        set_fused_attn(True)
    assert type(attn) is CpuAttention and not attn.fused_attn
