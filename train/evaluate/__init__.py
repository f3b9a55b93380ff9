"""Evaluation of a (frozen) encoder: feature extraction, k-NN, linear probe, collapse diagnostics.

Modules, each usable on its own:
- `features`: pooled features + labels of a dataset through a timm ViT (multi-process aware).
- `knn`: leave-one-out 1-NN (the paper's "NN" number) and DINO-style weighted k-NN.
- `linear`: a linear probe on frozen, standardised features.
- `collapse`: the paper's collapse diagnostic and friends, plus a PNG plot.
- `figures`: PNG figures written atomically.

`lmim eval knn|linear|collapse` (lmim/tools/eval_cli.py) is the command line over these.
"""
