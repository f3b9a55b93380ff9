"""Make `import timm` work where torchvision's C++ ops cannot load.

timm imports torchvision unconditionally. A torchvision wheel built against CUDA torch, next to a
CPU-only torch (as on this project's CPU machines, where only that pairing is installable
offline), fails to load its `_C` extension; torchvision then skips its ops but still registers
fake kernels for `torchvision::nms` / `qnms`, which raises "operator torchvision::nms does not
exist" and breaks `import timm`. Declaring those two schemas (no kernels: detection ops are never
called here) lets torchvision finish importing. Does nothing when torchvision imports cleanly.
"""
from __future__ import annotations

import sys

import torch

_LIB = None  # keep the Library object alive: dropping it would unregister the schemas


def ensure_torchvision_importable() -> None:
    global _LIB
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "transforms"):
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            if not torch._C._dispatch_has_kernel(f"torchvision::{op}") and not hasattr(torch.ops.torchvision, op):
                _LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


ensure_torchvision_importable()
