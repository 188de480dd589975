"""Dense kNN (Hummingbird, Balazevic et al. 2023): each test patch takes the label distribution
of its nearest train patches.

A memory bank holds the fit part's patch tokens (L2-normalized) with each patch's label
distribution: the share of each class among the scored pixels of the mask cell the patch
covers (cells with no scored pixel are left out). A query patch's distribution is the mean of
its k nearest patches' (cosine similarity), weighted by softmax(similarity / temperature); the
(gh, gw) map of distributions is bilinearly upsampled to the mask and its argmax is the
prediction. One search at the largest k serves every k of the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from probekit.defaults import DEFAULT_DENSE_KS
from probekit.errors import ProbekitError
from probekit.probes.options import MethodOptions, option
from probekit.segmentation import IGNORE

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from probekit.dense import DenseData, DenseSelection
else:
    from probekit._lazy import LazyAttributes, lazy_module

    torch = lazy_module("torch")
    F = LazyAttributes("torch.nn.functional")

__all__ = [
    "TEMPERATURE",
    "Options",
    "knn_distributions",
    "patch_labels",
    "predict_masks",
    "select",
]


@dataclass(frozen=True)
class Options(MethodOptions):
    """Dense kNN: the neighbours a test patch takes (one search at the largest)."""

    shown = ("k",)
    ks: tuple[int, ...] = option(
        DEFAULT_DENSE_KS,
        "Dense kNN: neighbours a test patch takes (comma list).",
        "ints>0",
        flat="dense_ks",
    )


TEMPERATURE = 0.02  # Hummingbird's softmax temperature over cosine similarities


def patch_labels(masks: torch.Tensor, grid: tuple[int, int], n_classes: int) -> torch.Tensor:
    """(n, T, C) float32 class shares of the scored pixels in each patch's cell of masks
    (n, H, W) uint8 (cells as `adaptive_avg_pool2d` cuts them); a cell with no scored pixel
    is all zeros."""
    m = masks.long()
    scored = m != IGNORE
    onehot = F.one_hot(m.clamp_max(n_classes - 1), n_classes) * scored[..., None]
    counts = F.adaptive_avg_pool2d(onehot.permute(0, 3, 1, 2).float(), grid)  # (n, C, gh, gw)
    total = counts.sum(1, keepdim=True)
    shares = torch.where(total > 0, counts / total.clamp_min(1e-12), torch.zeros_like(counts))
    return shares.flatten(2).transpose(1, 2).contiguous()


def knn_distributions(
    sims: np.ndarray, idx: np.ndarray, bank_labels: torch.Tensor, ks: Sequence[int]
) -> dict[int, torch.Tensor]:
    """{k: (Q, C) label distributions} from the top-max(ks) neighbours of Q queries (sims and
    bank indices (Q, K), best first)."""
    s = torch.from_numpy(np.ascontiguousarray(sims)).float()
    i = torch.from_numpy(np.ascontiguousarray(idx)).long()
    out = {}
    for k in ks:
        w = torch.softmax(s[:, :k] / TEMPERATURE, dim=1)  # (Q, k)
        out[k] = torch.einsum("qk,qkc->qc", w, bank_labels[i[:, :k]])
    return out


def predict_masks(
    distributions: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """(n, H, W) int64 predictions of (n, T, C) patch distributions, bilinearly upsampled."""
    n, _, c = distributions.shape
    maps = distributions.transpose(1, 2).reshape(n, c, *grid)
    return F.interpolate(maps, size=size, mode="bilinear").argmax(1)


def _bank(data: DenseData, name: str, grid: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor]:
    """(M, D) float32 L2-normalized fit patches with labelled cells, and their (M, C) label
    distributions; a seeded sample beyond DENSE_BANK_PATCHES patches or half the budget."""
    from probekit.dense import DENSE_BANK_PATCHES, row_blocks
    from probekit.neighbors.search import l2_normalize

    t, d = data.store.token_shape(name)
    labels = patch_labels(data.fit_masks, grid, data.n_classes).reshape(-1, data.n_classes)
    keep = np.flatnonzero(labels.sum(1).numpy() > 0)
    cap = min(DENSE_BANK_PATCHES, max(1024, data.budget // (8 * d)))  # half the budget
    if len(keep) > cap:
        rng = np.random.default_rng(data.options.seed)
        keep = np.sort(rng.choice(keep, cap, replace=False))
    feats = np.empty((len(keep), d), np.float32)
    at = 0
    for block in row_blocks(np.arange(len(data.fit_rows)), 4 * t * d):
        tok = data.store.read_rows("train", name, data.fit_rows[block]).reshape(-1, d)
        lo, hi = block[0] * t, (block[-1] + 1) * t
        mine = keep[(keep >= lo) & (keep < hi)] - lo
        feats[at : at + len(mine)] = l2_normalize(tok[mine])
        at += len(mine)
    return feats, labels[torch.from_numpy(keep)]


def _confusions(
    data: DenseData,
    split: str,
    rows: np.ndarray,
    name: str,
    bank: tuple[np.ndarray, torch.Tensor],
    ks: Sequence[int],
) -> dict[int, np.ndarray]:
    """{k: (n, C, C) per-image confusions} of dense kNN with each k (at most the bank's
    size) on `rows` of `split`."""
    from probekit.dense import row_blocks
    from probekit.neighbors.search import l2_normalize, search
    from probekit.segmentation import image_confusions

    store = data.store
    t, d = store.token_shape(name)
    grid = store.token_grid(name)
    feats, labels = bank
    kmax = max(ks)
    out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    memory_mb = max(16, data.budget // 2**21)
    # a block of query images: its patches' neighbours and upsampled maps stay small
    per_image = t * (d + kmax * (2 + data.n_classes)) * 4 + 4 * data.n_classes * np.prod(data.size)
    for block in row_blocks(rows, int(per_image)):
        q = l2_normalize(store.read_rows(split, name, block).reshape(-1, d))
        sims, idx = search(q, feats, kmax, memory_mb=memory_mb)
        truth = store.masks(split, block)
        for k, dist in knn_distributions(sims, idx, labels, ks).items():
            pred = predict_masks(dist.reshape(len(block), t, -1), grid, data.size).numpy()
            out[k].append(image_confusions(pred, truth, data.n_classes))
    return {k: np.concatenate(v) for k, v in out.items()}


def select(data: DenseData, options: Options) -> DenseSelection:
    """Every (layer, k) scored on validation images against a bank of fit patches; the best
    mIoU (then pixel accuracy) is chosen."""
    from probekit.dense import DenseSelection
    from probekit.segmentation import mean_iou, pixel_accuracy

    curve: list[tuple[str, dict[str, Any], float]] = []
    best: tuple[float, float, int, str, int] | None = None
    best_bank: tuple[np.ndarray, torch.Tensor] | None = None
    for i, name in enumerate(data.names):
        bank = _bank(data, name, data.store.token_grid(name))
        if not len(bank[0]):
            raise ProbekitError("no train patch covers a labelled pixel: the masks are empty.")
        ks = sorted({min(k, len(bank[0])) for k in options.ks})  # a small bank: fewer
        per_k = _confusions(data, data.val_split, data.val_rows, name, bank, ks)
        scored = [(mean_iou(per_k[k].sum(0)), pixel_accuracy(per_k[k].sum(0)), -k, k) for k in ks]
        miou, acc, _, k = max(scored)
        curve.append((name, {"k": k, "temperature": TEMPERATURE}, miou))
        if best is None or (miou, acc, -i) > best[:3]:
            best, best_bank = (miou, acc, -i, name, k), bank  # only the best layer's bank kept
    assert best is not None and best_bank is not None
    miou, acc, _, name, k = best
    bank = best_bank
    config = {
        "k": k,
        "temperature": TEMPERATURE,
        "bank_patches": len(bank[0]),
        "val_miou": float(miou),
        "val_pixel_acc": float(acc),
    }

    def confusions(split: str, rows: np.ndarray) -> np.ndarray:
        return _confusions(data, split, rows, name, bank, [k])[k]

    return DenseSelection("dense-knn", name, config, curve, confusions)
