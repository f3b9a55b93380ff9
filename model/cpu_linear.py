"""fp32 linear layers on the CPU through oneDNN instead of the default BLAS (MKL).

On the CPU, `F.linear` in float32 runs MKL's sgemm. On a 2-core AMD EPYC (Zen 4, AVX-512) oneDNN's
fp32 inner product (`torch.ops.mkldnn._linear_pointwise`, the kernel behind Inductor's CPU linear)
does the same GEMMs 15-25% faster (no bf16/tf32: fp32 inputs, fp32 accumulation; its error against a
float64 product is that of MKL's, about 2e-7 relative). GEMMs are two thirds of a training step
there, so `CpuLinear` routes a layer's forward product and the input gradient of its backward through
oneDNN; the weight gradient g^T x stays on MKL (oneDNN's inner product has no cheap way to take the
transposed activations as its input, and was slower).

The fast path applies only where it is exactly an fp32 linear layer: CPU tensors, float32 input and
weight, no autocast, not under torch.compile (which brings its own kernels) and oneDNN built in.
Everywhere else (GPUs, bf16 autocast) `CpuLinear` is `nn.Linear`; `LMIM_ONEDNN_LINEAR=0` in the
environment turns the oneDNN path off (measured faster only on the AMD EPYC above; an Intel CPU,
where MKL is at home, may differ). Parameters, state dicts and
initialisation are nn.Linear's (the class is a subclass that only overrides `forward`).

Without autograd (the EMA target encoder's forward), `CpuMlp` also runs timm's Mlp first layer
and its exact (erf) GELU as one oneDNN call (GELU as the inner product's post-op, bit-identical to
`F.gelu` of the product in a check on [7424, 192] x [192, 768]); the separate GELU pass over the
[tokens, 4 x width] hidden activations cost 5 ms a layer in a `ref_small` step.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import Mlp

__all__ = ["CpuLinear", "CpuMlp", "use_cpu_linear", "use_plain_linear", "cpu_linear"]


def _available() -> bool:
    if os.environ.get("LMIM_ONEDNN_LINEAR", "1") == "0":  # opt out (e.g. a CPU where MKL is faster)
        return False
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


_AVAILABLE = _available()


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 names it per device
        return torch.is_autocast_cpu_enabled()


def _fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
        and x.numel() > 0
        and not _cpu_autocast_enabled()
        and not torch.compiler.is_compiling()
    )


def _onednn_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2d [M, K] @ weight [N, K]^T + bias through oneDNN's fp32 inner product."""
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x2d, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_linear(grad, weight.t(), None)                # grad @ W (a strided view: no copy)
        if ctx.needs_input_grad[1]:
            gw = grad.t().mm(x2d)                                       # grad^T @ x (MKL)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN where that is an exact fp32 CPU linear (module docstring)."""
    if not _fast_path(x, weight):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        y = _OneDNNLinearFn.apply(x2d, weight, bias)
    else:
        y = _onednn_linear(x2d, weight, bias)
    return y.view(*lead, weight.shape[0])


class CpuLinear(nn.Linear):
    """nn.Linear whose fp32 CPU forward/backward run through oneDNN (`cpu_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear(x, self.weight, self.bias)


class CpuMlp(Mlp):
    """timm's Mlp; without autograd on the fp32 CPU path, fc1 + exact GELU are one oneDNN call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and (x.requires_grad or self.fc1.weight.requires_grad)) \
                or not self._fusable or not _fast_path(x, self.fc1.weight):
            return super().forward(x)
        x2d = x.reshape(-1, x.shape[-1])
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        h = torch.ops.mkldnn._linear_pointwise(x2d, self.fc1.weight, self.fc1.bias, "gelu", [], "none")
        h = self.norm(h)  # drop1 is the identity here (p == 0, checked by _fusable)
        return self.drop2(self.fc2(h.view(*x.shape[:-1], h.shape[-1])))

    @property
    def _fusable(self) -> bool:
        return (type(self.fc1) in (nn.Linear, CpuLinear) and type(self.act) is nn.GELU
                and self.act.approximate == "none" and self.drop1.p == 0.0)


def use_cpu_linear(module: nn.Module) -> nn.Module:
    """Make every plain nn.Linear in `module` a CpuLinear and every timm Mlp a CpuMlp, in place
    (same parameters and state dict keys); returns `module`."""
    if _AVAILABLE:
        for m in module.modules():
            if type(m) is nn.Linear:
                m.__class__ = CpuLinear
            elif type(m) is Mlp:
                m.__class__ = CpuMlp
    return module


def use_plain_linear(module: nn.Module) -> nn.Module:
    """Undo `use_cpu_linear` in place: every CpuLinear back to nn.Linear, every CpuMlp to timm's Mlp
    (a benchmark's plain-PyTorch baseline); returns `module`."""
    for m in module.modules():
        if type(m) is CpuLinear:
            m.__class__ = nn.Linear
        elif type(m) is CpuMlp:
            m.__class__ = Mlp
    return module
