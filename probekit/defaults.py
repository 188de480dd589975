"""Every default the API and the CLI share, defined once (and importable without torch)."""

from __future__ import annotations

import numpy as np

__all__ = [
    "DEFAULT_ATTN_LRS",
    "DEFAULT_ATTN_WDS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_CROP_PCT",
    "DEFAULT_CS",
    "DEFAULT_DENSE_KS",
    "DEFAULT_EPOCHS",
    "DEFAULT_HOLDOUT",
    "DEFAULT_IMG_SIZE",
    "DEFAULT_KS",
    "DEFAULT_LAYERS",
    "DEFAULT_LRS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_POOLS",
    "DEFAULT_PROBE_BATCH_SIZE",
    "DEFAULT_QUERIES",
    "DEFAULT_SEG_BATCH_SIZE",
    "DEFAULT_SEG_EPOCHS",
    "DEFAULT_SEG_LRS",
    "DEFAULT_SEG_WDS",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOL",
    "DEFAULT_WDS",
]

# extraction: DINO's linear evaluation reads the last 4 blocks; class token and mean of patches
DEFAULT_LAYERS = "last4"
DEFAULT_POOLS = "cls,mean"
DEFAULT_BATCH_SIZE = 64
DEFAULT_CHUNK_ROWS = 1024
# a triage evaluates every backbone at one resolution (BoB's and DINOv2's linear/kNN protocol:
# the short side resized to 256, the centre 224 cropped); a size given anywhere keeps that ratio
DEFAULT_IMG_SIZE = 224
DEFAULT_CROP_PCT = 0.875
# kNN: DINO's k grid and temperature; a database block of this many MiB at a time
DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
DEFAULT_MEMORY_MB = 512
# probes: DINOv2's 13 learning rates (scaled by batch_size / 256), a few weight decays, and
# DINOv2's C path of logistic regression (45 values, 1e-6 to 1e5, log-spaced)
DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DEFAULT_WDS = (0.0, 1e-4, 1e-3)
DEFAULT_CS = tuple(float(c) for c in 10 ** np.linspace(-6, 5, 45))
DEFAULT_HOLDOUT = 0.1  # the validation share of train where a store has no val split
DEFAULT_EPOCHS = 20
DEFAULT_PROBE_BATCH_SIZE = 256
# attentive probes (AIM / V-JEPA style): AdamW, cosine schedule after a linear warmup; at
# least ATTN_MIN_STEPS steps an epoch (the batch shrinks on small datasets, to 16 at least)
ATTN_MIN_STEPS = 10
DEFAULT_ATTN_LRS = (3e-4, 1e-3, 3e-3)
DEFAULT_ATTN_WDS = (0.01, 0.1)
DEFAULT_QUERIES = 1
# linear segmentation (`linseg`): AdamW lr x wd grid, epochs, images a minibatch
DEFAULT_SEG_LRS = (1e-3, 1e-2)
DEFAULT_SEG_WDS = (1e-4, 1e-2)
DEFAULT_SEG_EPOCHS = 10
DEFAULT_SEG_BATCH_SIZE = 16
# dense kNN: neighbours a test patch takes (one search at the largest serves them all)
DEFAULT_DENSE_KS = (10, 30)
DEFAULT_TOL = 1e-4  # L-BFGS: stop when no gradient entry exceeds it (scikit-learn's default)
