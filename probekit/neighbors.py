"""Exact kNN classification (DINO protocol) and retrieval on cached features or arrays."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numba
import numpy as np

from probekit import distributed
from probekit.cache.store import FeatureStore, open_for_reading
from probekit.errors import ProbekitError
from probekit.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    per_class_accuracy,
    retrieval_metrics,
    topk_accuracy,
)

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TEMPERATURE",
    "KnnRecord",
    "KnnResult",
    "knn",
    "resolve_backend",
    "search",
    "vote",
]

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
DEFAULT_MEMORY_MB = 512
RETRIEVAL_KS = (1, 5, 10)
Backend = Literal["auto", "faiss", "faiss-gpu", "torch"]
Vote = Literal["weighted", "majority"]


# --------------------------------------------------------------------------- search


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


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class KnnRecord:
    """One number: a metric of one (layer/pool, k, T, vote) on one split."""

    backbone: str
    weights: str
    dataset: str
    split: str
    layer: str
    pool: str
    k: int
    temperature: float | None
    vote: str
    metric: str
    value: float
    n: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KnnResult:
    """All records of one `knn` call, and where they were written."""

    records: list[KnnRecord]
    backend: str
    path: str | None = None
    # classification: which rows of the test split were queried (one flag per row), and for
    # each (layer, pool, k, vote) which of those queries were classified right
    queried: np.ndarray | None = field(default=None, repr=False)
    right: dict[tuple[str, str, int, str], np.ndarray] = field(default_factory=dict, repr=False)

    def value(
        self,
        metric: str,
        *,
        layer: str | None = None,
        pool: str | None = None,
        k: int | None = None,
        vote: str | None = None,
    ) -> float:
        """The single record value matching the filters (a helper for tests and scripts)."""
        hits = [
            r
            for r in self.records
            if r.metric == metric
            and (layer is None or r.layer == layer)
            and (pool is None or r.pool == pool)
            and (k is None or r.k == k)
            and (vote is None or r.vote == vote)
        ]
        if len(hits) != 1:
            raise ProbekitError(f"{len(hits)} records match {metric} {layer} {pool} {k} {vote}.")
        return hits[0].value

    def table(self) -> list[list[str]]:
        """Rows (feature, vote, then one column per k) of top-1 / balanced accuracy, or the
        retrieval metrics."""
        rows: dict[tuple[str, str, str], dict[str, str]] = {}
        for r in self.records:
            if r.metric == "worst_class_accuracy":
                continue
            key = (f"{r.layer}/{r.pool}", r.vote, r.metric)
            col = f"k={r.k}" if r.k else "-"
            rows.setdefault(key, {})[col] = f"{100 * r.value:.2f}"
        cols = sorted({c for v in rows.values() for c in v}, key=lambda c: (len(c), c))
        out = [["feature", "vote", "metric", *cols]]
        for (feat, vote_, metric), vals in rows.items():
            out.append([feat, vote_, metric, *[vals.get(c, "") for c in cols]])
        return out


# --------------------------------------------------------------------------- the job


def _stream(
    store: FeatureStore,
    split: str,
    name: str,
    rows: int,
    keep: np.ndarray,
    row_range: tuple[int, int] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Normalized valid rows of a store array, block by block; indices count valid rows only.
    `row_range`: only store rows [lo, hi) (a shard), indexed as in the whole array."""
    lo, hi = row_range or (0, len(keep))
    first = int(keep[:lo].sum())
    for start, block in store.iter_features(split, name, rows=rows, start=lo, stop=hi):
        mask = keep[start : start + len(block)]
        part = l2_normalize(block if mask.all() else block[mask])
        yield first, part
        first += len(part)


def _positions(keep: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Where the rows flagged in `rows` fall among the rows flagged in `keep` (a superset)."""
    return np.searchsorted(np.flatnonzero(keep), np.flatnonzero(rows))


def knn(
    source: FeatureStore
    | str
    | os.PathLike[str]
    | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    vote_method: Literal["weighted", "majority", "both"] = "weighted",
    features: Sequence[str] | None = None,
    train_split: str = "train",
    test_split: str = "test",
    retrieval: bool = False,
    backend: str = "auto",
    memory_mb: int = DEFAULT_MEMORY_MB,
    allow_partial: bool = False,
    max_queries: int | None = None,
    seed: int = 0,
    write: bool = True,
) -> KnnResult:
    """kNN classification (DINO protocol) of `test_split` against `train_split`, every feature.

    `source`: a feature store (or its path), or arrays (train_x, train_y, test_x, test_y).
    Cosine similarity on L2-normalized features; all k from one search at max(k); the query
    itself is excluded when both splits are the same. `retrieval=True` ranks the whole gallery
    instead and reports mAP, mAP@R, MRR, precision@k and recall@k (same label = relevant); a
    store with `query` and `gallery` splits is evaluated that way by default.
    `max_queries`: query at most this many rows of `test_split`, a seeded random sample (the
    rest of the database stays whole): choosing k and the feature by leave-one-out on a large
    train split needs no more. Records are written as JSON Lines next to the store.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ProbekitError(f"k must be positive integers, got {list(ks)}.")
    if temperature <= 0:
        raise ProbekitError(f"temperature must be > 0, got {temperature}.")
    if max_queries is not None and max_queries < 1:
        raise ProbekitError(f"max_queries must be a positive number of queries, not {max_queries}.")
    votes: list[Vote] = ["weighted", "majority"] if vote_method == "both" else [vote_method]  # type: ignore[list-item]
    dist = distributed.SINGLE if isinstance(source, tuple) else distributed.init()
    backend = resolve_backend(backend)
    store: FeatureStore | None = None
    if isinstance(source, tuple):
        arrays = source
        names = ["array/given"]
        meta: dict[str, Any] = {
            "backbone": {"name": "arrays"},
            "weights": {"source": "-"},
            "dataset": {"spec": "arrays"},
        }
        n_classes = int(max(arrays[1].max(initial=0), arrays[3].max(initial=0))) + 1
    else:
        store = open_for_reading(source, allow_partial=allow_partial)
        meta = store.meta
        names = store.check_features(features) if features else store.feature_names
        n_classes = len(store.class_names)
        if {"query", "gallery"} <= set(store.splits) and (train_split, test_split) == (
            "train",
            "test",
        ):  # a retrieval dataset: rank the gallery for each query
            train_split, test_split, retrieval = "gallery", "query", True
        for s in (train_split, test_split):
            if s not in store.splits:
                raise ProbekitError(f"store has no split {s!r}; it has {', '.join(store.splits)}.")
    records: list[KnnRecord] = []
    right: dict[tuple[str, str, int, str], np.ndarray] = {}
    base = {
        "backbone": meta["backbone"]["name"],
        "weights": meta["weights"]["source"],
        "dataset": meta["dataset"]["spec"],
        "split": test_split,
    }
    same = train_split == test_split
    if store is None:
        db_y, q_y = arrays[1], arrays[3]
    else:  # labels and validity are per split: read once for every feature
        db_keep, q_keep = store.usable(train_split), store.usable(test_split)
        if max_queries is not None and q_keep.sum() > max_queries:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(np.flatnonzero(q_keep), max_queries, replace=False))
            q_keep = np.zeros_like(q_keep)
            q_keep[sample] = True
        db_y, q_y = store.labels(train_split)[db_keep], store.labels(test_split)[q_keep]
    shard = None  # under torchrun: this rank's chunk-aligned rows of the database
    if dist.is_group and store is not None and not retrieval:
        chunk, n_db = int(meta["chunk_rows"]), len(db_keep)
        bounds = [(n_db * r // dist.world) // chunk * chunk for r in range(dist.world)] + [n_db]
        shard = (bounds[dist.rank], bounds[dist.rank + 1])
    for name in names:
        layer, _, pool = name.partition("/")
        if store is None:
            queries = l2_normalize(arrays[2])
            database: Any = l2_normalize(arrays[0])
        else:
            queries = l2_normalize(store.read_rows(test_split, name, np.flatnonzero(q_keep)))
            dim = store.feature_dim(name)
            # a block: float16 rows read + their float32 normalized copy; whole store chunks
            chunk = int(meta["chunk_rows"])
            rows = max(1, memory_mb * 2**20 // (6 * dim + 4 * len(queries)))
            rows = max(chunk, rows // chunk * chunk)
            database = _stream(store, train_split, name, rows, db_keep, shard)
        exclude = None  # leave-one-out: each query's own row among the database's rows
        if same:
            exclude = np.arange(len(queries)) if store is None else _positions(db_keep, q_keep)
        if retrieval:
            records += _retrieval(
                queries, database, db_y, q_y, exclude, backend, memory_mb, base, layer, pool
            )
            continue
        if not dist.is_group:
            sims, idx = search(
                queries, database, ks[-1], backend=backend, memory_mb=memory_mb, exclude=exclude
            )
        else:  # each rank searches its shard; the local top-k lists merge as one search would
            kk = ks[-1] + (0 if exclude is None else 1)
            d, i, n = _topk(queries, database, kk, backend, memory_mb)
            parts = dist.all_gather((d, i, n))
            _check_k(ks[-1], 0 if exclude is None else 1, sum(p[2] for p in parts))
            sims, idx = _merge([(p[0], p[1]) for p in parts], kk)
            if exclude is not None:
                sims, idx = _drop_self(sims, idx, exclude, ks[-1])
        nbr = db_y[idx]
        for v in votes:
            ranked = vote(nbr, sims, ks, n_classes, temperature, v)
            for k in ks:
                r = ranked[k]
                t = temperature if v == "weighted" else None
                common = dict(base, layer=layer, pool=pool, k=k, temperature=t, vote=v, n=len(q_y))
                correct = (r[:, 0] == q_y).astype(np.float64)
                right[(layer, pool, k, v)] = correct.astype(bool)
                records += [
                    KnnRecord(
                        **common,
                        metric="top1",
                        value=float(correct.mean()) if len(q_y) else float("nan"),
                        extra={"ci95": list(bootstrap_ci(correct))},
                    ),
                    KnnRecord(**common, metric="top5", value=topk_accuracy(r, q_y, min(5, k))),
                    KnnRecord(
                        **common,
                        metric="balanced_accuracy",
                        value=balanced_accuracy(r[:, 0], q_y, n_classes),
                    ),
                    _per_class_record(common, r[:, 0], q_y, n_classes),
                ]
    path = None
    if write and store is not None and dist.is_main:
        config = [ks, temperature, vote_method, names, train_split, test_split, retrieval]
        path = store.write_records(
            "knn", config, ({**r.to_dict(), "backend": backend} for r in records)
        )
    queried = np.ones(len(q_y), dtype=bool) if store is None else q_keep
    return KnnResult(records, backend, path, None if retrieval else queried, right)


def _per_class_record(
    common: dict[str, Any], pred: np.ndarray, labels: np.ndarray, n_classes: int
) -> KnnRecord:
    """The worst class's accuracy as the value; every class's accuracy (None: absent) in extra."""
    per_class = per_class_accuracy(pred, labels, n_classes)
    present = per_class[np.isfinite(per_class)]
    return KnnRecord(
        **common,
        metric="worst_class_accuracy",
        value=float(present.min()) if len(present) else float("nan"),
        extra={"per_class": [None if np.isnan(a) else float(a) for a in per_class]},
    )


def _retrieval(
    queries: np.ndarray,
    database: Any,
    db_y: np.ndarray,
    q_y: np.ndarray,
    exclude: np.ndarray | None,
    backend: str,
    memory_mb: int,
    base: dict[str, Any],
    layer: str,
    pool: str,
) -> list[KnnRecord]:
    """Full-ranking retrieval metrics; the gallery is held in memory, queries go in blocks."""
    gallery = (
        database if isinstance(database, np.ndarray) else np.concatenate([b for _, b in database])
    )
    n = len(gallery) - (1 if exclude is not None else 0)
    if n < 1:
        raise ProbekitError("retrieval needs at least one gallery item besides the query.")
    q_rows = max(1, memory_mb * 2**20 // (12 * max(1, len(gallery))))
    sums: dict[str, float] = {}
    total = 0
    for s in range(0, len(queries), q_rows):
        qb = queries[s : s + q_rows]
        sims = qb @ gallery.T  # (q, N) float32
        if exclude is not None:
            sims[np.arange(len(qb)), exclude[s : s + q_rows]] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")
        if exclude is not None:
            order = order[:, :n]  # the query itself sorts last
        m = retrieval_metrics(
            order, db_y, q_y[s : s + q_rows], RETRIEVAL_KS, queries_in_gallery=exclude is not None
        )
        for key, val in [
            ("mAP", m.ap),
            ("mAP@R", m.ap_at_r),
            ("MRR", m.rr),
            *[(f"precision@{k}", v) for k, v in m.precision_at.items()],
            *[(f"recall@{k}", v) for k, v in m.recall_at.items()],
        ]:
            sums[key] = sums.get(key, 0.0) + val
        total += m.n
    return [
        KnnRecord(
            **base,
            layer=layer,
            pool=pool,
            k=0,
            temperature=None,
            vote="-",
            metric=key,
            value=val / max(total, 1),
            n=total,
        )
        for key, val in sums.items()
    ]
