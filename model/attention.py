"""Which attention kernel runs where.

Latent MIM attends over few tokens (the visible patches, the targets: tens, not thousands), and on
the CPU PyTorch's fused kernels are then often slower than two matmuls around an explicit softmax
(timm's non-fused attention, the same arithmetic). Measured on a 2-core AVX-512 EPYC (Zen 4,
avx512_bf16), forward + backward a layer at batch 128 of the `ref_small` model:

- fp32: the flash kernel is the faster one for the encoders' 64-channel heads, but with narrow heads
  (the decoder's 16 heads of 8 channels) its per-block overhead dominates: the explicit form is
  about a fifth faster for 58 queries (34 against 43 ms).
- bf16 autocast: the explicit form wins everywhere. The decoder's self-attention took 20 ms against
  47 for SDPA's math backend and 145 for the flash kernel (whose bf16 backward is very slow there);
  the EMA target encoder's 58-token heads 4.0 against 12.1 (math) and 6.1 ms (flash), forward only.
  The math backend's safe-softmax check (`all`/`where` over the scores) alone was 6% of a step.
- With few keys (cross-attention to the 8 visible tokens) the explicit path computes the transposed
  scores k q^T and normalises over dim -2: torch's softmax over a last dim of 8 is slow (9 ms against
  1.2 ms for [128, 16, 58, 8] in fp32; 4.9 against 10.5 ms forward + backward in bf16).

So `attend` takes the explicit form on the CPU in fp32 for heads of at most 16 channels and under
bf16 autocast always, SDPA otherwise (and always on GPUs, where SDPA's own choice is kept).
`use_cpu_attention` gives timm's encoder `Attention` blocks the same bf16 rule (they are timm's
modules, so they use timm's own non-fused path), and `attention_kernels` keeps any other SDPA call
under CPU bf16 autocast on the math backend rather than the flash kernel.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from timm.models.vision_transformer import Attention

__all__ = ["attention_kernels", "attend", "CpuAttention", "use_cpu_attention"]

# Widest head for which `attend` takes the explicit path on the CPU in fp32.
EXPLICIT_MAX_HEAD_DIM = 16
# Below this many keys the explicit path computes k q^T (keys first) and normalises over dim -2.
EXPLICIT_TRANSPOSED_MAX_KEYS = 16


def _cpu_autocast_dtype() -> torch.dtype | None:
    try:
        enabled, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except (TypeError, AttributeError):  # torch < 2.4 names them per device
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return dtype if enabled else None


def _cpu_bf16_autocast() -> bool:
    return _cpu_autocast_dtype() == torch.bfloat16


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to run a forward pass on `device` in (its backward follows the same path)."""
    if device.type == "cpu" and _cpu_bf16_autocast():
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def _explicit_on_cpu(q: torch.Tensor) -> bool:
    if q.device.type != "cpu":
        return False
    autocast = _cpu_autocast_dtype()
    if autocast is not None:
        return autocast == torch.bfloat16
    return q.dtype == torch.float32 and q.shape[-1] <= EXPLICIT_MAX_HEAD_DIM


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, H, N, d] tensors: SDPA, except on the CPU for narrow heads
    in fp32 and for every head under bf16 autocast (module docstring), which take timm's explicit
    form (q scaled, matmul, softmax, matmul)."""
    if not _explicit_on_cpu(q):
        return F.scaled_dot_product_attention(q, k, v)
    q = q * q.shape[-1] ** -0.5
    if k.shape[-2] < EXPLICIT_TRANSPOSED_MAX_KEYS:
        # Few keys (the decoder's cross-attention to 8 visible tokens): a softmax over a short
        # last dim is slow; the same softmax over dim -2 of the transposed scores is much faster.
        return (k @ q.transpose(-2, -1)).softmax(dim=-2, dtype=torch.float32).transpose(-2, -1) @ v
    # In fp32 dtype= changes nothing; under bf16 autocast the scores are normalised in fp32 and the
    # product rounds the probabilities to bf16 once. Measured as fast as the bf16 softmax in a whole
    # step (its own kernel is twice as fast, the cast and the fp32 backward give that back).
    return (q @ k.transpose(-2, -1)).softmax(dim=-1, dtype=torch.float32) @ v


class CpuAttention(Attention):
    """timm's `Attention` that takes timm's own non-fused (explicit softmax) path on the CPU under
    bf16 autocast, where it is the faster kernel (module docstring), and SDPA wherever timm would.

    timm reads `self.fused_attn` on every forward; here it is a property over the value timm set at
    construction, so parameters, state dicts and every other path are timm's."""

    @property
    def fused_attn(self) -> bool:  # type: ignore[override]
        fused = self.__dict__.get("_timm_fused_attn", True)
        return fused and not (self.qkv.weight.device.type == "cpu" and _cpu_bf16_autocast())

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        self.__dict__["_timm_fused_attn"] = bool(value)


def use_cpu_attention(module: nn.Module) -> nn.Module:
    """Make every timm `Attention` in `module` a `CpuAttention`, in place (same parameters and state
    dict keys); returns `module`."""
    for m in module.modules():
        if type(m) is Attention:
            fused = m.__dict__.pop("fused_attn", True)
            m.__class__ = CpuAttention
            m.fused_attn = fused
    return module
