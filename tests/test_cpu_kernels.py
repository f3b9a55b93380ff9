"""The CPU fp32 kernels the model picks (model/cpu_linear.py, model/attention.py) compute what the
plain torch ops compute: same values and gradients (to fp32 rounding, checked against float64),
same parameters, and the plain ops wherever the fast path does not apply."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmim.model.attention import attend
from lmim.model.cpu_linear import _AVAILABLE, CpuLinear, CpuMlp, cpu_linear, use_cpu_linear, use_plain_linear

pytestmark = pytest.mark.skipif(not _AVAILABLE, reason="this torch has no oneDNN linear kernel")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_linear_values_and_gradients_match_a_float64_product():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 37, 96, generator=g, requires_grad=True)
    w = torch.randn(160, 96, generator=g, requires_grad=True)
    b = torch.randn(160, generator=g, requires_grad=True)
    up = torch.randn(4, 37, 160, generator=g)
    y = cpu_linear(x, w, b)
    (y * up).sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.linear(x64, w64, b64)
    (y64 * up.double()).sum().backward()
    assert y.dtype == torch.float32 and y.shape == (4, 37, 160)
    # fp32 arithmetic (not bf16/tf32, which would be ~1e-3 off): as close to float64 as torch's own fp32 linear
    plain = F.linear(x.detach(), w.detach(), b.detach())
    assert _rel(y, y64) < 1e-6 and _rel(y, y64) < 10 * max(_rel(plain, y64), 1e-8)
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert _rel(got, want) < 1e-6


def test_linear_on_a_non_contiguous_input_and_without_grad():
    x = torch.randn(8, 50, 64).transpose(0, 1)            # strided
    w, b = torch.randn(32, 64), torch.randn(32)
    with torch.no_grad():
        assert torch.allclose(cpu_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_the_plain_op_runs_where_the_fast_path_does_not_apply():
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_linear(x, w).dtype == torch.bfloat16   # autocast's own linear
    assert cpu_linear(x.double(), w.double()).dtype == torch.float64


def test_modules_keep_nn_linear_and_timm_mlp_parameters_and_state_dicts():
    from timm.layers import Mlp

    net = nn.Sequential(nn.Linear(16, 32), Mlp(32, 64, 16))
    keys = list(net.state_dict())
    use_cpu_linear(net)
    assert type(net[0]) is CpuLinear and isinstance(net[0], nn.Linear) and type(net[1]) is CpuMlp
    assert list(net.state_dict()) == keys
    use_plain_linear(net)  # the benchmark baseline's way back to torch's own modules
    assert type(net[0]) is nn.Linear and type(net[1]) is Mlp and list(net.state_dict()) == keys


def test_the_fused_mlp_without_grad_equals_timm_mlp():
    from timm.layers import Mlp

    torch.manual_seed(0)
    ref = Mlp(48, 192, 48)
    fused = Mlp(48, 192, 48)
    fused.load_state_dict(ref.state_dict())
    use_cpu_linear(fused)
    x = torch.randn(3, 29, 48)
    with torch.no_grad():
        assert torch.allclose(fused(x), ref(x), rtol=1e-5, atol=1e-6)
    # with autograd it is timm's Mlp over the oneDNN linear layers: the same gradients
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused(xa).square().sum().backward()
    ref(xb).square().sum().backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keys", [8, 58])                # the transposed-softmax path (few keys) and the plain one
@pytest.mark.parametrize("head_dim", [8, 64])             # the explicit path (narrow heads) and SDPA
def test_attend_equals_sdpa(keys, head_dim):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 58, head_dim, generator=g, requires_grad=True)
    k = torch.randn(3, 4, keys, head_dim, generator=g, requires_grad=True)
    v = torch.randn(3, 4, keys, head_dim, generator=g, requires_grad=True)
    out = attend(q, k, v)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v)
    ref.square().sum().backward()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    for got, t in zip(grads, (q, k, v)):
        assert torch.allclose(got, t.grad, rtol=1e-4, atol=1e-5)
