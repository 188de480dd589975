"""Exact top-k search by inner product, block by block (FAISS on the CPU or GPU, or torch),
and the weighted (DINO) or majority vote over the neighbours found."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numba
import numpy as np

from probekit.defaults import DEFAULT_MEMORY_MB, DEFAULT_TEMPERATURE
from probekit.errors import ProbekitError

__all__ = ["Backend", "Vote", "l2_normalize", "resolve_backend", "search", "vote"]

Backend = Literal["auto", "faiss", "faiss-gpu", "torch"]
Vote = Literal["weighted", "majority"]


def resolve_backend(backend: str = "auto", device: str = "auto") -> str:
    """auto: GPU FAISS on CUDA when installed, else torch on CUDA, else FAISS on the CPU."""
    import faiss

    cuda = device != "cpu" and _cuda_available()
    gpu_faiss = cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if backend == "auto":
        return "faiss-gpu" if gpu_faiss else "torch" if cuda else "faiss"
    if backend not in ("faiss", "faiss-gpu", "torch"):
        raise ProbekitError(
            f"unknown kNN backend {backend!r}; use auto, faiss, faiss-gpu or torch."
        )
    if backend == "faiss-gpu" and not gpu_faiss:
        raise ProbekitError("backend faiss-gpu needs CUDA and GPU FAISS; use faiss or torch.")
    return backend


def _cuda_available() -> bool:
    """CUDA through torch, without importing torch (hundreds of MB) on machines with no driver."""
    if "torch" not in sys.modules and not os.path.exists("/proc/driver/nvidia/version"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as a new float32 array (zero rows stay zero)."""
    out = np.array(x, dtype=np.float32)  # the one copy; the rest is in place
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    out /= norms
    return out


BlockSearch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def _block_searcher(queries: np.ndarray, backend: str) -> BlockSearch:
    """Exact inner-product top-k of the queries against one database block at a time.

    What every block shares (queries on the device, GPU resources) is set up once here.
    """
    import faiss

    if backend == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        q = torch.from_numpy(queries).to(device)

        def torch_topk(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            sims, idx = (q @ torch.from_numpy(block).to(device).T).topk(min(k, len(block)), 1)
            return sims.cpu().numpy(), idx.cpu().numpy()

        return torch_topk
    if backend == "faiss-gpu":
        res = faiss.StandardGpuResources()
        return lambda block, k: faiss.knn_gpu(
            res, queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT
        )
    return lambda block, k: faiss.knn(
        queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT
    )


def search(
    queries: np.ndarray,
    database: np.ndarray | Iterable[tuple[int, np.ndarray]],
    k: int,
    *,
    backend: str = "auto",
    memory_mb: int = DEFAULT_MEMORY_MB,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (similarities, database indices), each (Q, k), best first.

    `database` is an array or an iterable of (first_row, block) that streams from a store, so
    only one block is in memory at a time. Inputs are used as given (normalize them first for
    cosine). `exclude[i]` is a database index to drop from query i's neighbours (itself), or -1.
    """
    extra = 0 if exclude is None else 1
    sims, idx, total = _topk(queries, database, k + extra, backend, memory_mb)
    _check_k(k, extra, total)
    if exclude is None:
        return sims, idx
    return _drop_self(sims, idx, exclude, k)


def _check_k(k: int, extra: int, total: int) -> None:
    if k + extra > total:
        raise ProbekitError(
            f"k={k} is larger than the database ({total - extra} items"
            + (" besides the query itself" if extra else "")
            + f"); use k <= {total - extra}."
        )


def _topk(
    queries: np.ndarray,
    database: np.ndarray | Iterable[tuple[int, np.ndarray]],
    kk: int,
    backend: str,
    memory_mb: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The kk best (similarities, indices) over all blocks (-inf/-1 pads), and the row count."""
    import faiss

    backend = resolve_backend(backend)
    heap = faiss.ResultHeap(len(queries), kk, keep_max=True)
    blocks: Iterable[tuple[int, np.ndarray]]
    if isinstance(database, np.ndarray):
        rows = max(1, memory_mb * 2**20 // max(1, 4 * database.shape[1] + 4 * len(queries)))
        blocks = ((s, database[s : s + rows]) for s in range(0, len(database), rows))
    else:
        blocks = database
    total = 0
    q = np.ascontiguousarray(queries, dtype=np.float32)
    topk = _block_searcher(q, backend)
    for start, block in blocks:
        b = np.ascontiguousarray(block, dtype=np.float32)
        total += len(b)
        if len(b) == 0:
            continue
        d, i = topk(b, kk)
        if d.shape[1] < kk:  # a block smaller than k: pad with empty slots
            pad = kk - d.shape[1]
            d = np.concatenate([d, np.full((len(q), pad), -np.inf, np.float32)], axis=1)
            i = np.concatenate([i, np.full((len(q), pad), -1, np.int64)], axis=1)
        heap.add_result(
            np.ascontiguousarray(d, dtype=np.float32),
            np.ascontiguousarray(np.where(i >= 0, i + start, -1), dtype=np.int64),
        )
    heap.finalize()
    return heap.D, heap.I, total


def _merge(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], kk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-kk lists (global indices) into the overall top-kk, in shard order."""
    import faiss

    heap = faiss.ResultHeap(len(parts[0][0]), kk, keep_max=True)
    for d, i in parts:
        heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(i, np.int64))
    heap.finalize()
    return heap.D, heap.I


def _drop_self(
    sims: np.ndarray, idx: np.ndarray, exclude: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own index from its k+1 neighbours (or the last one if absent)."""
    is_self = idx == exclude[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(len(idx)), drop] = False
    return sims[keep].reshape(len(idx), k), idx[keep].reshape(len(idx), k)


# --------------------------------------------------------------------------- voting


@numba.njit(cache=True, parallel=True)
def _vote_ranked(
    labels: np.ndarray, weights: np.ndarray, ks: np.ndarray, n_classes: int, top: int
) -> np.ndarray:
    """For every k: the `top` best classes of each query by summed neighbour weight.

    Ties go to the lower class id. Returns (len(ks), Q, top) int64 (-1 where fewer classes).
    """
    q, kmax = labels.shape
    out = np.full((len(ks), q, top), -1, dtype=np.int64)
    for i in numba.prange(q):
        scores = np.zeros(n_classes, dtype=np.float64)
        t = 0
        for j in range(kmax):
            scores[labels[i, j]] += weights[i, j]
            while t < len(ks) and ks[t] == j + 1:
                taken = np.zeros(n_classes, dtype=np.bool_)
                for r in range(min(top, n_classes)):
                    best, best_c = -1.0, -1
                    for c in range(n_classes):
                        if not taken[c] and scores[c] > best:
                            best, best_c = scores[c], c
                    taken[best_c] = True
                    out[t, i, r] = best_c
                t += 1
    return out


def vote(
    neighbour_labels: np.ndarray,
    sims: np.ndarray,
    ks: Sequence[int],
    n_classes: int,
    temperature: float = DEFAULT_TEMPERATURE,
    method: Vote = "weighted",
) -> dict[int, np.ndarray]:
    """{k: (Q, 5) classes ranked by vote over the first k neighbours}.

    weighted (DINO): class score = sum of exp(s / T) over its neighbours; majority: counts.
    """
    if method == "weighted":
        weights = np.exp(sims.astype(np.float64) / temperature)
    elif method == "majority":
        weights = np.ones(sims.shape, dtype=np.float64)
    else:
        raise ProbekitError(f"unknown vote {method!r}; use weighted or majority.")
    order = sorted(set(int(k) for k in ks))
    ranked = _vote_ranked(
        neighbour_labels.astype(np.int64), weights, np.array(order, dtype=np.int64), n_classes, 5
    )
    return {k: ranked[t] for t, k in enumerate(order)}
