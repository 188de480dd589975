"""Exact kNN classification (DINO protocol) and retrieval on cached features or arrays: the
options, the data of one call (`KnnData`), the search (`search.py`: sharded under torchrun),
the vote and the shared evaluator's records."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import numpy as np

from probekit import distributed
from probekit.cache.store import FeatureStore, open_for_reading
from probekit.defaults import DEFAULT_KS, DEFAULT_MEMORY_MB, DEFAULT_TEMPERATURE
from probekit.errors import OptionError, ProbekitError, choice
from probekit.evaluation import check_labels, classification_records, warned, with_extra
from probekit.metrics import retrieval_metrics
from probekit.neighbors.search import (
    Vote,
    _check_k,
    _drop_self,
    _merge,
    _topk,
    l2_normalize,
    resolve_backend,
    search,
    vote,
)
from probekit.records import Metric, Record, write_records
from probekit.specs import as_ints, is_count, options_of, parse_list

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TEMPERATURE",
    "KnnOptions",
    "KnnRecord",
    "KnnResult",
    "knn",
    "resolve_backend",
    "search",
    "vote",
]

RETRIEVAL_KS = (1, 5, 10)


# --------------------------------------------------------------------------- results


# a kNN result line is a `Record` (kind "knn", hyper {k, vote, temperature})
KnnRecord = Record


@dataclass(frozen=True)
class KnnResult:
    """All records of one `knn` call, and where they were written."""

    records: list[Record]
    backend: str
    path: str | None = None
    # classification: which rows of the test split were queried (one flag per row), and for
    # each (feature, k, vote) which of those queries were classified right
    queried: np.ndarray | None = field(default=None, repr=False)
    right: dict[tuple[str, int, str], np.ndarray] = field(default_factory=dict, repr=False)

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
            and (k is None or r.hyper["k"] == k)
            and (vote is None or r.hyper["vote"] == vote)
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
            key = (r.feature, str(r.hyper["vote"]), r.metric)
            col = f"k={r.hyper['k']}" if r.hyper["k"] else "-"
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


@dataclass(frozen=True)
class KnnOptions:
    """Every option of `knn` with its default, checked when made.

    ks: neighbour counts (one search at the largest); temperature: T of the weighted vote's
    exp(s / T); vote_method: weighted (DINO), majority, or both. features: the stored features
    to evaluate (default: all). retrieval: rank the whole gallery instead (mAP, mAP@R, MRR,
    P@k, R@k). backend: auto, faiss, faiss-gpu or torch. memory_mb: the database block held at
    once. max_queries: query a seeded sample of at most this many rows of `test_split`.
    """

    ks: int | Sequence[int] = DEFAULT_KS
    temperature: float = DEFAULT_TEMPERATURE
    vote_method: Literal["weighted", "majority", "both"] = "weighted"
    features: str | Sequence[str] | None = None
    train_split: str = "train"
    test_split: str = "test"
    retrieval: bool = False
    backend: str = "auto"
    memory_mb: int = DEFAULT_MEMORY_MB
    allow_partial: bool = False
    max_queries: int | None = None
    seed: int = 0
    write: bool = True
    out: str | os.PathLike[str] | None = None  # where records go (default: beside the store)

    def __post_init__(self) -> None:
        ks = sorted(set(as_ints(self.ks, "ks")))
        if not ks or ks[0] < 1:
            raise OptionError(f"k must be positive integers, got {self.ks!r}.")
        object.__setattr__(self, "ks", tuple(ks))
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise OptionError(f"temperature must be > 0, got {self.temperature!r}.")
        choice("vote", self.vote_method, ("weighted", "majority", "both"))
        choice("kNN backend", self.backend, ("auto", "faiss", "faiss-gpu", "torch"))
        if self.features is not None:
            names = parse_list(self.features, "features")
            if not names:
                raise OptionError("features is empty; name features or leave it out.")
            object.__setattr__(self, "features", tuple(names))
        mb = self.memory_mb
        if not is_count(mb):
            raise OptionError(f"memory_mb must be a positive number of MiB, not {mb!r}.")
        q = self.max_queries
        if q is not None and not is_count(q):
            raise OptionError(f"max_queries must be a positive number of queries, not {q!r}.")

    @classmethod
    def of(cls, options: KnnOptions | None = None, **changes: Any) -> KnnOptions:
        """`options` (default: the defaults) with `changes`; an unknown name is an error."""
        return options_of(cls, "knn", options, changes)


def knn(
    source: FeatureStore
    | str
    | os.PathLike[str]
    | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    options: KnnOptions | None = None,
    **changes: Any,
) -> KnnResult:
    """kNN classification (DINO protocol) of `test_split` against `train_split`, every feature.

    `source`: a feature store (or its path), or arrays (train_x, train_y, test_x, test_y).
    `options` and keyword `changes`: the fields of `KnnOptions` (ks, temperature, vote_method,
    features, train_split, test_split, retrieval, backend, memory_mb, allow_partial,
    max_queries, seed, write), each checked before any work.
    Cosine similarity on L2-normalized features; all k from one search at max(k); the query
    itself is excluded when both splits are the same. `retrieval=True` ranks the whole gallery
    instead and reports mAP, mAP@R, MRR, precision@k and recall@k (same label = relevant); a
    store with `query` and `gallery` splits is evaluated that way by default.
    `max_queries`: query at most this many rows of `test_split`, a seeded random sample (the
    rest of the database stays whole): choosing k and the feature by leave-one-out on a large
    train split needs no more. Records are written as JSON Lines next to the store.
    """
    o = KnnOptions.of(options, **changes)
    if isinstance(source, tuple):
        data, dist = KnnData.from_arrays(source, o), distributed.SINGLE
    else:
        dist = distributed.init()
        data = KnnData.from_store(open_for_reading(source, allow_partial=o.allow_partial), o)
    backend = resolve_backend(o.backend)
    ks = list(as_ints(o.ks, "ks"))
    if not data.retrieval:  # before any search allocates (queries, k) results
        _check_k(max(ks), 0 if data.exclude is None else 1, len(data.db_y))
    records: list[Record] = []
    right: dict[tuple[str, int, str], np.ndarray] = {}
    # under torchrun: each rank searches its chunk-aligned rows of the database
    shard = None if data.retrieval or not dist.is_group else data.shard(dist)
    for name in data.names:
        queries, database = data.queries(name), data.database(name, o.memory_mb, shard)
        if data.retrieval:
            at = replace(data.base, feature=name, hyper={"k": 0, "vote": "-", "temperature": None})
            records += _retrieval(
                queries, database, data.db_y, data.q_y, data.exclude, backend, o.memory_mb, at
            )
            continue
        sims, idx = _search_sharded(queries, database, ks[-1], backend, o, data.exclude, dist)
        recs, hits = _classify(data, name, sims, idx, ks, o)
        records += recs
        right.update(hits)
    path = None
    if o.write and data.store is not None and dist.is_main:
        config = [
            ks,
            o.temperature,
            o.vote_method,
            data.names,
            data.train_split,
            data.test_split,
            data.retrieval,
        ]
        rows = (with_extra(r, backend=backend) for r in records)
        path = write_records(data.store.path, "knn", config, rows, o.out)
    return KnnResult(records, backend, path, None if data.retrieval else data.queried, right)


@dataclass
class KnnData:
    """What one kNN call searches: the features to evaluate, each one's queries and database
    (an array, or a stream of store blocks), the labels, and the record every result shares."""

    base: Record
    names: list[str]
    n_classes: int
    train_split: str
    test_split: str
    retrieval: bool
    db_y: np.ndarray  # labels of the database rows used
    q_y: np.ndarray  # labels of the queries
    queried: np.ndarray  # one flag per row of the test split: queried or not
    exclude: np.ndarray | None  # leave-one-out: each query's own position in the database
    store: FeatureStore | None = None
    arrays: tuple[np.ndarray, ...] | None = None
    db_keep: np.ndarray | None = None  # store rows of the database

    @classmethod
    def from_arrays(cls, arrays: tuple[np.ndarray, ...], o: KnnOptions) -> KnnData:
        """(train_x, train_y, test_x, test_y) in memory."""
        n_classes = int(max(arrays[1].max(initial=0), arrays[3].max(initial=0))) + 1
        same = o.train_split == o.test_split
        base = Record(
            "knn",
            "arrays",
            "arrays",
            split=o.test_split,
            method="knn",
            train_dataset="arrays",
            backbone="arrays",
            weights="-",
        )
        if not o.retrieval:
            said = check_labels(arrays[1], arrays[3], [], who="kNN")
            base = warned(base, said, "arrays")
        return cls(
            base,
            ["array/given"],
            n_classes,
            o.train_split,
            o.test_split,
            o.retrieval,
            arrays[1],
            arrays[3],
            np.ones(len(arrays[3]), dtype=bool),
            np.arange(len(arrays[2])) if same else None,
            arrays=arrays,
        )

    @classmethod
    def from_store(cls, store: FeatureStore, o: KnnOptions) -> KnnData:
        """A store's splits; labels and validity are read once for every feature."""
        info = store.info
        names = store.check_features(o.features) if o.features else store.feature_names
        train_split, test_split, retrieval = o.train_split, o.test_split, o.retrieval
        if {"query", "gallery"} <= set(store.splits) and (train_split, test_split) == (
            "train",
            "test",
        ):  # a retrieval dataset: rank the gallery for each query
            train_split, test_split, retrieval = "gallery", "query", True
        for s in (train_split, test_split):
            if s not in store.splits:
                raise ProbekitError(f"store has no split {s!r}; it has {', '.join(store.splits)}.")
        db_keep, q_keep = store.usable(train_split), store.usable(test_split)
        if o.max_queries is not None and q_keep.sum() > o.max_queries:
            rng = np.random.default_rng(o.seed)
            sample = np.sort(rng.choice(np.flatnonzero(q_keep), o.max_queries, replace=False))
            q_keep = np.zeros_like(q_keep)
            q_keep[sample] = True
        base = Record(
            "knn",
            info.label,
            info.dataset.spec,
            split=test_split,
            method="knn",
            train_dataset=info.dataset.spec,
            backbone=info.backbone.name,
            weights=info.weights_source,
        )
        db_y, q_y = store.labels(train_split)[db_keep], store.labels(test_split)[q_keep]
        said = list(info.dataset.warnings)
        if not retrieval:
            said += check_labels(
                db_y, q_y, store.class_names, who="kNN", splits=(train_split, test_split)
            )
        base = warned(base, said, info.dataset.spec)
        return cls(
            base,
            list(names),
            len(store.class_names),
            train_split,
            test_split,
            retrieval,
            db_y,
            q_y,
            q_keep,
            _positions(db_keep, q_keep) if train_split == test_split else None,
            store=store,
            db_keep=db_keep,
        )

    def shard(self, dist: distributed.Dist) -> tuple[int, int]:
        """This rank's rows [lo, hi) of the database, whole store chunks each."""
        assert self.store is not None and self.db_keep is not None
        chunk, n_db = self.store.info.chunk_rows, len(self.db_keep)
        bounds = [(n_db * r // dist.world) // chunk * chunk for r in range(dist.world)] + [n_db]
        return bounds[dist.rank], bounds[dist.rank + 1]

    def queries(self, name: str) -> np.ndarray:
        """(Q, D) L2-normalized queries of feature `name`."""
        if self.arrays is not None:
            return l2_normalize(self.arrays[2])
        assert self.store is not None
        return l2_normalize(
            self.store.read_rows(self.test_split, name, np.flatnonzero(self.queried))
        )

    def database(self, name: str, memory_mb: int, shard: tuple[int, int] | None) -> Any:
        """The normalized database of `name`: an array, or blocks streamed from the store."""
        if self.arrays is not None:
            return l2_normalize(self.arrays[0])
        assert self.store is not None and self.db_keep is not None
        dim = self.store.feature_dim(name)
        # a block: float16 rows read + their float32 normalized copy; whole store chunks
        chunk = self.store.info.chunk_rows
        rows = max(1, memory_mb * 2**20 // (6 * dim + 4 * len(self.q_y)))
        rows = max(chunk, rows // chunk * chunk)
        return _stream(self.store, self.train_split, name, rows, self.db_keep, shard)


def _search_sharded(
    queries: np.ndarray,
    database: Any,
    k: int,
    backend: str,
    o: KnnOptions,
    exclude: np.ndarray | None,
    dist: distributed.Dist,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k; under torchrun each rank searches its shard and the local top-k lists
    merge as one search would."""
    if not dist.is_group:
        return search(queries, database, k, backend=backend, memory_mb=o.memory_mb, exclude=exclude)
    kk = k + (0 if exclude is None else 1)
    d, i, n = _topk(queries, database, kk, backend, o.memory_mb)
    parts = dist.all_gather((d, i, n))
    _check_k(k, 0 if exclude is None else 1, sum(p[2] for p in parts))
    sims, idx = _merge([(p[0], p[1]) for p in parts], kk)
    if exclude is not None:
        sims, idx = _drop_self(sims, idx, exclude, k)
    return sims, idx


def _classify(
    data: KnnData,
    name: str,
    sims: np.ndarray,
    idx: np.ndarray,
    ks: list[int],
    o: KnnOptions,
) -> tuple[list[Record], dict[tuple[str, int, str], np.ndarray]]:
    """Every (vote, k) of one feature from its neighbours: the shared evaluator's records, and
    which queries each classified right."""
    votes: list[Vote] = ["weighted", "majority"] if o.vote_method == "both" else [o.vote_method]  # type: ignore[list-item]
    nbr = data.db_y[idx]
    records: list[Record] = []
    right: dict[tuple[str, int, str], np.ndarray] = {}
    for v in votes:
        ranked = vote(nbr, sims, ks, data.n_classes, o.temperature, v)
        for k in ks:
            t = o.temperature if v == "weighted" else None
            at = replace(data.base, feature=name, hyper={"k": k, "vote": v, "temperature": t})
            recs, correct = classification_records(
                ranked[k], data.q_y, data.n_classes, at, top=min(5, k)
            )
            right[(name, k, v)] = correct
            records += recs
    return records, right


def _retrieval(
    queries: np.ndarray,
    database: Any,
    db_y: np.ndarray,
    q_y: np.ndarray,
    exclude: np.ndarray | None,
    backend: str,
    memory_mb: int,
    base: Record,
) -> list[Record]:
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
        replace(base, metric=cast(Metric, key), value=val / max(total, 1), n=total)
        for key, val in sums.items()
    ]
