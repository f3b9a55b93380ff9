"""lmim: streaming pretraining of Latent Masked Image Modeling vision transformers.

One installed package; its sub-packages live in the repository's top-level folders:

- `lmim.pipeline` (pipeline/): shards on local disk or object storage -> masked batches.
- `lmim.model` (model/): Latent MIM on timm, the MAE and naive baselines.
- `lmim.train` (train/): the Accelerate trainer, checkpoints, evaluation.
- `lmim.tools` (tools/): the `lmim` command line, shard building, export, benchmarks.

docs/ARCHITECTURE.md describes the layers and which may import which.
"""
from __future__ import annotations

from lmim._torchvision_compat import prepare_timm_import

__version__ = "0.1.0"

# Runs once, here, for every entry point (CLI, `python -m lmim...`, `import lmim` in a notebook):
# it makes sure timm's import of torchvision succeeds on a CPU-only torch when timm is first imported.
prepare_timm_import()
