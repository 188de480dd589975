"""A training-free localisation score beside the box probe: each image's most salient region
from one layer's stored tokens, by LOST's rule (Siméoni et al., BMVC 2021), scored as CorLoc.

LOST on one image's tokens x (T, D), L2-normalized, on a gh x gw grid:

    A = x x^T                  patch similarities
    degree_i = #{j: A_ij > 0}  the seed is the patch of the lowest degree (an object covers
                               less of the image than the background does)
    S = the seed and those of the k lowest-degree patches with A_seed,j > 0 (k: a tenth of T)
    mask_j = sum over s in S of A_sj > 0
    box = the extent of the mask's 4-connected component that holds the seed, in input pixels

LOST reads the last layer's keys of a DINO ViT; probekit reads the stored tokens of each layer
(the layer with the best validation CorLoc is the one tested). CorLoc is the fraction of images
whose box has IoU >= 0.5 with some ground-truth box (its class ignored).
"""

from __future__ import annotations

import numpy as np

__all__ = ["lost_box"]


def lost_box(tokens: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The (4,) xyxy box LOST finds in one image's tokens (T, D) on `grid` (gh, gw), in the
    pixels of an input of `size` (H, W)."""
    from scipy import ndimage

    gh, gw = grid
    x = np.asarray(tokens, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    a = x @ x.T
    degree = (a > 0).sum(1)
    seed = int(np.argmin(degree))
    k = max(1, round(0.1 * len(x)))
    low = np.argsort(degree, kind="stable")[:k]
    chosen = np.union1d([seed], low[a[seed, low] > 0])
    mask = (a[chosen].sum(0) > 0).reshape(gh, gw)
    labels, _ = ndimage.label(mask)
    part = labels == labels.flat[seed]
    rows, cols = np.nonzero(part)
    h, w = size
    sy, sx = h / gh, w / gw
    return np.array(
        [cols.min() * sx, rows.min() * sy, (cols.max() + 1) * sx, (rows.max() + 1) * sy]
    )
