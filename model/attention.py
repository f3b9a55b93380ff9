"""Which attention kernel runs where.

Latent MIM attends over few tokens (the visible patches, the targets: tens, not thousands). On the
CPU under bf16 autocast, PyTorch's flash-attention kernel is then much slower than two matmuls and
a softmax (SDPA's math backend): its backward took 43% of a bf16 training step of the `ref_small`
model on a 2-core AVX-512 EPYC, and the math path makes that whole step 19% faster (774 against
954 ms, alternating, same process). In fp32 the flash kernel is the faster one there (1,145 against
1,235 ms), and on GPUs SDPA's own choice is kept.

`attend` is the one exception to SDPA in fp32 on the CPU: with narrow heads (the `ref_small`
decoder's 16 heads of 8 channels) the flash kernel's per-block overhead dominates, and two batched
matmuls around an explicit softmax (timm's non-fused attention, the same arithmetic) are about a
fifth faster forward + backward for 58 queries (34 against 43 ms a layer, batch 128, 2-core EPYC).
With few keys (cross-attention to 8 visible tokens) it normalises the transposed scores k q^T over
dim -2: torch's softmax over a last dim of 8 is slow (9 ms against 1.2 ms for [128, 16, 58, 8]),
so that layer's attention takes 9 instead of 21-24 ms (flash) forward + backward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["attention_kernels", "attend"]

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


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to run a forward pass on `device` in (its backward follows the same path)."""
    if device.type == "cpu" and _cpu_autocast_dtype() == torch.bfloat16:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, H, N, d] tensors: SDPA, except narrow heads in fp32 on
    the CPU (module docstring), which take timm's explicit form (q scaled, matmul, softmax, matmul)."""
    if (q.device.type == "cpu" and q.shape[-1] <= EXPLICIT_MAX_HEAD_DIM and q.dtype == torch.float32
            and _cpu_autocast_dtype() is None):
        q = q * q.shape[-1] ** -0.5
        if k.shape[-2] < EXPLICIT_TRANSPOSED_MAX_KEYS:
            # Few keys (the decoder's cross-attention to 8 visible tokens): a softmax over a short
            # last dim is slow; the same softmax over dim -2 of the transposed scores is 8x faster.
            return (k @ q.transpose(-2, -1)).softmax(dim=-2).transpose(-2, -1) @ v
        return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)
