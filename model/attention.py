"""Which attention kernel runs where.

Latent MIM attends over few tokens (the visible patches, the targets: tens, not thousands). On the
CPU under bf16 autocast, PyTorch's flash-attention kernel is then much slower than two matmuls and
a softmax (SDPA's math backend): its backward took 43% of a bf16 training step of the `ref_small`
model on a 2-core AVX-512 EPYC, and the math path makes that whole step 19% faster (774 against
954 ms, alternating, same process). In fp32 the flash kernel is the faster one there (1,145 against
1,235 ms), and on GPUs SDPA's own choice is kept.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["attention_kernels"]


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
