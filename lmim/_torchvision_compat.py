"""Make `import timm` work with a CPU-only torch and PyPI's CUDA-built torchvision.

timm imports torchvision at import time (timm/layers/create_norm.py). PyPI has no CPU build of
torchvision for x86-64: its compiled ops link against libtorch_cuda and fail to load under a
CPU torch wheel. torchvision tolerates that for every op except `nms`/`qnms`, whose fake
(meta) kernels it registers unconditionally, so the import dies with
"operator torchvision::nms does not exist". We never call torchvision's compiled ops, so the
fix is to declare those two schemas (no kernels) and import again. On a normal install (CUDA
torch + matching torchvision, or a CPU torchvision) the first import succeeds and this does nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_LIBRARY = None  # keeps the schema definitions alive for the life of the process


def ensure_torchvision_importable() -> None:
    global _LIBRARY
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    # Drop the half-imported package before trying again.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch.library

    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            _LIBRARY.define(schema)
        except RuntimeError:
            pass  # already defined by someone else
    import torchvision  # noqa: F401,F811


class _BeforeTimm(importlib.abc.MetaPathFinder):
    """Runs `ensure_torchvision_importable` the first time anything imports timm, then leaves.

    Installed by `import lmim`, so timm works after it without every timm-using module importing
    a shim for its side effect, and without paying for torchvision's import (about a second) in
    commands that never touch timm (shard building, verification).
    """

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001  (importlib's protocol)
        # Only timm: hooking torchvision itself would re-enter its own import half-way.
        if fullname == "timm":
            _remove_hook()
            ensure_torchvision_importable()
        return None  # the normal finders import the module itself


_HOOK = _BeforeTimm()


def _remove_hook() -> None:
    try:
        sys.meta_path.remove(_HOOK)
    except ValueError:
        pass


def prepare_timm_import() -> None:
    """Arrange for the fix to run before timm's first import; idempotent."""
    if "timm" in sys.modules or _HOOK in sys.meta_path:
        return
    sys.meta_path.insert(0, _HOOK)
