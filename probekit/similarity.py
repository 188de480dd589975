"""How alike two representations of the same images are: debiased linear CKA (Kornblith et
al. 2019, with the unbiased HSIC estimator of Song et al. 2012) and mutual k-nearest-neighbour
alignment (Huh et al. 2024), between every pair of stored features of one or more stores,
their rows matched by image id.

Linear CKA is computed in feature space (X^T Y, never the n x n Gram matrices), so it costs
n d1 d2 and no n^2 memory; kNN neighbours come from the same exact search as `probekit.knn`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np

from probekit.cache.store import FeatureStore, open_store
from probekit.errors import OptionError, ProbekitError
from probekit.records import Metric, Record

__all__ = [
    "CompareResult",
    "EnsembleGain",
    "Similarity",
    "compare",
    "concat_probe",
    "hsic",
    "linear_cka",
    "mutual_knn",
]

DEFAULT_MUTUAL_K = 10


def _centered(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out: np.ndarray = x - x.mean(0, keepdims=True)
    return out


def hsic(x: np.ndarray, y: np.ndarray, *, debiased: bool = True) -> float:
    """HSIC of linear kernels between (n, d1) and (n, d2) rows, features centered first:
    the unbiased estimator (n >= 4) or the biased tr(KHLH) / (n-1)^2."""
    xc, yc = _centered(x), _centered(y)
    return _hsic(xc, yc, debiased)


def _hsic(xc: np.ndarray, yc: np.ndarray, debiased: bool) -> float:
    n = len(xc)
    cross = float(np.square(xc.T @ yc).sum())  # tr(K L) = ||X^T Y||_F^2
    if not debiased:
        return cross / (n - 1) ** 2
    if n < 4:
        raise ProbekitError(f"debiased CKA needs at least 4 images in common, got {n}.")
    kx, ky = np.einsum("ij,ij->i", xc, xc), np.einsum("ij,ij->i", yc, yc)  # Gram diagonals
    sx, sy = xc.sum(0), yc.sum(0)
    trace = cross - float(kx @ ky)  # tr(K~ L~), the diagonals zeroed
    ones_k, ones_l = float(sx @ sx - kx.sum()), float(sy @ sy - ky.sum())  # 1^T K~ 1, 1^T L~ 1
    k1, l1 = xc @ sx - kx, yc @ sy - ky  # K~ 1, L~ 1
    total = trace + ones_k * ones_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(k1 @ l1)
    return total / (n * (n - 3))


def linear_cka(x: np.ndarray, y: np.ndarray, *, debiased: bool = True) -> float:
    """Linear CKA of two representations (n, d1), (n, d2) of the same n images: 1 for the
    same features, invariant to rotations and isotropic scaling of either; NaN where one of
    them has no variance."""
    xc, yc = _centered(x), _centered(y)
    if len(xc) != len(yc):
        raise ProbekitError(f"CKA needs the same images in both: {len(xc)} vs {len(yc)} rows.")
    xy, xx, yy = (_hsic(a, b, debiased) for a, b in ((xc, yc), (xc, xc), (yc, yc)))
    if xx <= 0 or yy <= 0:
        return math.nan
    return xy / math.sqrt(xx * yy)


def neighbours(x: np.ndarray, k: int, backend: str = "auto") -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows by cosine similarity."""
    from probekit.neighbors.search import l2_normalize, search

    z = l2_normalize(x)
    _, idx = search(z, z, k, backend=backend, exclude=np.arange(len(z)))
    return idx


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of |a_i & b_i| / k for two (n, k) neighbour lists."""
    k = a.shape[1]
    both = (a[:, :, None] == b[:, None, :]).any(2).sum(1)
    return float(both.mean() / k)


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = DEFAULT_MUTUAL_K, **kw: Any) -> float:
    """Mutual kNN alignment: the mean fraction of each image's k nearest neighbours (cosine,
    itself left out) that two representations share; 1 for the same neighbourhoods, about
    k / (n - 1) for unrelated ones."""
    if len(x) != len(y):
        raise ProbekitError(f"mutual kNN needs the same images in both: {len(x)} vs {len(y)}.")
    return _overlap(neighbours(x, k, **kw), neighbours(y, k, **kw))


@dataclass(frozen=True)
class Similarity:
    """One pair of stored features on the same images (`n` of them)."""

    store_a: str
    feature_a: str
    store_b: str
    feature_b: str
    n: int
    cka: float
    mutual_knn: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CompareResult:
    """Every pair's numbers, the labels of the stores, the split and the images used."""

    pairs: list[Similarity]
    labels: dict[str, str]  # store path -> model label
    dataset: str
    split: str
    k: int
    ensembles: list[EnsembleGain] = field(default_factory=list)  # with concat=True

    def records(self) -> list[Record]:
        """Two records a pair (`cka`, `mutual_knn`): model and feature are the pair's first,
        the second in `extra` (model_b, feature_b)."""
        out = []
        for p in self.pairs:
            for metric, value in (("cka", p.cka), ("mutual_knn", p.mutual_knn)):
                out.append(
                    Record(
                        "compare",
                        self.labels[p.store_a],
                        self.dataset,
                        metric=cast(Metric, metric),
                        value=value,
                        split=self.split,
                        feature=p.feature_a,
                        method="compare",
                        n=p.n,
                        hyper={"k": self.k} if metric == "mutual_knn" else {"debiased": True},
                        extra={
                            "model_b": self.labels[p.store_b],
                            "feature_b": p.feature_b,
                            "store_a": p.store_a,
                            "store_b": p.store_b,
                        },
                    )
                )
        return out + [e.record(self.dataset, self.split) for e in self.ensembles]


def _common_rows(stores: Sequence[FeatureStore], split: str) -> list[np.ndarray]:
    """For each store, the row positions of the images every store holds validly, in the
    first store's order (matched by id)."""
    for st in stores:
        if split not in st.splits:
            raise ProbekitError(
                f"{st.path.name} has no {split!r} split (it has {', '.join(st.splits)}); "
                "pick another with --split."
            )
    maps = []
    for st in stores:
        ids, valid = st.ids(split), st.valid(split)
        maps.append({i: r for r, i in enumerate(ids) if valid[r]})
    common = [i for i in maps[0] if all(i in m for m in maps[1:])]
    if len(common) < 4:
        raise ProbekitError(
            f"the stores share {len(common)} valid images of split {split!r}; comparing needs "
            "at least 4 (extract the same dataset with each backbone)."
        )
    return [np.array([m[i] for i in common], dtype=np.int64) for m in maps]


def compare(
    sources: Sequence[FeatureStore | str | os.PathLike[str]],
    *,
    split: str = "test",
    features: Sequence[str] | None = None,
    k: int = DEFAULT_MUTUAL_K,
    backend: str = "auto",
    features_of: Sequence[Sequence[str]] | None = None,
    labels: Sequence[str] | None = None,
    concat: bool = False,
) -> CompareResult:
    """CKA and mutual kNN between every pair of (store, feature) of `sources` on the images
    they share (matched by id; a row invalid in one store is dropped from all).

    `features`: names every store holds (default: each store's own stored features), or
    `features_of`: one list per store. One store compares its layers with each other.
    `labels`: what each store's model is called in the records (default: its own label).
    `concat`: also a logistic regression on each pair of two stores' features side by side
    against each alone (`concat_probe`): does the ensemble pay?
    """
    if isinstance(sources, (str, os.PathLike, FeatureStore)):
        sources = [sources]
    if not sources:
        raise OptionError("compare needs at least one store.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise OptionError(f"k must be a positive number of neighbours, got {k!r}.")
    stores = [s if isinstance(s, FeatureStore) else open_store(s) for s in sources]
    paths = [str(s.path) for s in stores]
    if len(set(paths)) != len(paths):
        raise OptionError("a store is given twice; give each store once.")
    if features_of is not None and len(features_of) != len(stores):
        raise OptionError(f"features_of has {len(features_of)} lists for {len(stores)} stores.")
    items = _shared_items(stores, split, features, features_of)
    pairs = _similarities(items, k, backend)
    names_of = list(labels) if labels is not None else [st.info.label for st in stores]
    by_path = dict(zip(paths, names_of, strict=True))
    ensembles = []
    if concat:
        store_of = dict(zip(paths, stores, strict=True))
        for p in pairs:
            if p.store_a != p.store_b:
                ensembles.append(
                    concat_probe(
                        store_of[p.store_a],
                        store_of[p.store_b],
                        feature_a=p.feature_a,
                        feature_b=p.feature_b,
                        labels=[by_path[p.store_a], by_path[p.store_b]],
                        test_split=split,
                    )
                )
    return CompareResult(pairs, by_path, stores[0].info.dataset.spec, split, k, ensembles)


def _shared_items(
    stores: Sequence[FeatureStore],
    split: str,
    features: Sequence[str] | None,
    features_of: Sequence[Sequence[str]] | None,
) -> list[tuple[str, str, np.ndarray]]:
    """(store path, feature, (n, D) rows) of every feature asked of every store, on the rows
    the stores share, in the first store's order."""
    rows = _common_rows(stores, split)
    items: list[tuple[str, str, np.ndarray]] = []
    for i, (st, r) in enumerate(zip(stores, rows, strict=True)):
        asked = features_of[i] if features_of is not None else features
        names = st.check_features(list(asked)) if asked else st.feature_names
        ordered = np.sort(r)  # read in the store's order, then put in the first store's
        back = np.searchsorted(ordered, r)
        for name in names:
            x = np.asarray(st.read_rows(split, name, ordered), np.float32)[back]
            items.append((str(st.path), name, x))
    if len(items) < 2:
        raise ProbekitError("one feature alone: nothing to compare; give two stores or features.")
    return items


def _similarities(
    items: list[tuple[str, str, np.ndarray]], k: int, backend: str
) -> list[Similarity]:
    """Debiased linear CKA and mutual kNN of every pair of items."""
    n = len(items[0][2])
    if k >= n:
        raise OptionError(f"k={k} needs more than {k} images in common; there are {n}.")
    centered = [_centered(x) for _, _, x in items]
    self_hsic = [_hsic(c, c, True) for c in centered]
    near = [neighbours(x, k, backend) for _, _, x in items]
    pairs = []
    for i, j in itertools.combinations(range(len(items)), 2):
        denom = self_hsic[i] * self_hsic[j]
        cka = _hsic(centered[i], centered[j], True) / math.sqrt(denom) if denom > 0 else math.nan
        (pa, fa, _), (pb, fb, _) = items[i], items[j]
        pairs.append(Similarity(pa, fa, pb, fb, n, cka, _overlap(near[i], near[j])))
    return pairs


@dataclass(frozen=True)
class EnsembleGain:
    """Logistic regression on two backbones' features side by side against each alone, on
    the same images: does the ensemble pay?"""

    model_a: str
    feature_a: str
    model_b: str
    feature_b: str
    n: int  # test images
    top1_a: float
    top1_b: float
    top1_both: float
    gain: float  # top1_both minus the better of the two alone
    gain_ci95: tuple[float, float]  # paired bootstrap over the test images
    mcnemar_p: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self, dataset: str, split: str) -> Record:
        return Record(
            "compare",
            self.model_a,
            dataset,
            metric="concat_gain",
            value=self.gain,
            split=split,
            feature=self.feature_a,
            method="concat",
            n=self.n,
            hyper={"probe": "logreg"},
            extra={
                "model_b": self.model_b,
                "feature_b": self.feature_b,
                "top1_a": self.top1_a,
                "top1_b": self.top1_b,
                "top1_both": self.top1_both,
                "ci95": list(self.gain_ci95),
                "mcnemar_p": self.mcnemar_p,
            },
        )


def _joint_arrays(
    stores: Sequence[FeatureStore], names: Sequence[str], splits: Sequence[str]
) -> tuple[dict[str, tuple[dict[str, np.ndarray], np.ndarray]], dict[str, list[str]]]:
    """Per split, the two stores' features on the images they share (layer0/mean: a's,
    layer1/mean: b's, head/embed: both side by side) with their labels, and the images' ids;
    an image the stores label differently is an error."""
    arrays: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    ids: dict[str, list[str]] = {}
    classes = stores[0].class_names
    for split in splits:
        rows = _common_rows(stores, split)
        xs = []
        for st, r, name in zip(stores, rows, names, strict=True):
            ordered = np.sort(r)
            x = np.asarray(st.read_rows(split, name, ordered), np.float32)
            xs.append(x[np.searchsorted(ordered, r)])
        ya = stores[0].labels(split)[rows[0]]
        yb = stores[1].labels(split)[rows[1]]
        if [classes[i] for i in ya] != [stores[1].class_names[i] for i in yb]:
            raise ProbekitError(
                f"the stores label the same {split} images differently; compare stores of the "
                "same dataset."
            )
        both = np.concatenate(xs, axis=1)
        arrays[split] = ({"layer0/mean": xs[0], "layer1/mean": xs[1], "head/embed": both}, ya)
        all_ids = stores[0].ids(split)
        ids[split] = [all_ids[int(i)] for i in rows[0]]
    return arrays, ids


def concat_probe(
    a: FeatureStore | str | os.PathLike[str],
    b: FeatureStore | str | os.PathLike[str],
    *,
    feature_a: str = "head/embed",
    feature_b: str = "head/embed",
    labels: Sequence[str] | None = None,
    test_split: str = "test",
    seed: int = 0,
    device: str = "auto",
) -> EnsembleGain:
    """Logistic regression (`probe(method="logreg")`: C chosen on a validation holdout, refit,
    tested once) on `feature_a` of store a, `feature_b` of store b, and both side by side, on
    the images the stores share (matched by id, in every split)."""
    import tempfile
    from pathlib import Path

    from probekit.cache.arrays import store_from_arrays
    from probekit.metrics import decode_outcomes, mcnemar_p, paired_bootstrap_ci
    from probekit.probes import probe

    stores = [s if isinstance(s, FeatureStore) else open_store(s) for s in (a, b)]
    if str(stores[0].path) == str(stores[1].path):
        raise OptionError("a concatenation probe needs two different stores.")
    names = [stores[0].check_features([feature_a])[0], stores[1].check_features([feature_b])[0]]
    splits = [s for s in stores[0].splits if s in stores[1].splits]
    if "train" not in splits or test_split not in splits:
        raise ProbekitError(f"both stores need a train and a {test_split!r} split.")
    arrays, ids = _joint_arrays(stores, names, splits)
    classes = stores[0].class_names
    label_of = list(labels) if labels is not None else [st.info.label for st in stores]
    outcomes = {}
    with tempfile.TemporaryDirectory(prefix="probekit-concat-") as tmp:
        joint = store_from_arrays(
            str(Path(tmp) / "concat.zarr"),
            arrays,
            classes,
            dataset=stores[0].info.dataset.spec,
            ids=ids,
        )
        for key, name in (("a", "layer0/mean"), ("b", "layer1/mean"), ("both", "head/embed")):
            res = probe(
                joint,
                method="logreg",
                features=[name],
                seed=seed,
                device=device,
                test_split=test_split,
                write=False,
            )
            rec = next(r for r in res.records if r.metric == "top1" and r.split == test_split)
            scored, right = decode_outcomes(rec.extra["outcomes"])
            outcomes[key] = (rec.value, right[scored])
    best = max(("a", "b"), key=lambda k: outcomes[k][0])
    right_both, right_best = outcomes["both"][1], outcomes[best][1]
    lo, hi = paired_bootstrap_ci(right_both, right_best)
    return EnsembleGain(
        label_of[0],
        names[0],
        label_of[1],
        names[1],
        len(right_both),
        outcomes["a"][0],
        outcomes["b"][0],
        outcomes["both"][0],
        outcomes["both"][0] - outcomes[best][0],
        (float(lo), float(hi)),
        float(mcnemar_p(right_both, right_best)),
    )
