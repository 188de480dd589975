"""Few-shot episodes on cached features: `shots` train images per class sampled from the fit
part of the train split (never from validation, never from test), kNN and the probe methods
fitted on each episode, each one's hyperparameters chosen on the validation part, then scored
once on test; the mean over episodes with a t interval.

Few-shot is a subset of the data, not methods of its own (dinov2's `n_per_class_list`): each
episode's support set is handed to a probe method of the registry as its fit part (linear
heads, logistic regression without its refit on validation, the MLP probe, ...), with
few-shot's grids. Episodes are nested and seeded: episode e draws one seeded order of each
class's fit rows and takes its first `shots`, so the 1-shot support is part of the 5-shot
support and a rerun with the same seed draws the same images (the sampled ids' hash is in
every record). kNN (cosine, DINO's weighted vote) runs every episode in one batched pass.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from probekit.cache.store import FeatureStore, open_for_reading
from probekit.errors import OptionError, ProbekitError, ProbekitWarning
from probekit.probes.base import ProbeData, ProbeOptions
from probekit.probes.rows import Rows
from probekit.records import Record, write_records
from probekit.specs import as_ints, is_count, parse_list

__all__ = [
    "DEFAULT_EPISODES",
    "DEFAULT_SHOTS",
    "FEWSHOT_METHODS",
    "FewShotResult",
    "fewshot",
    "fewshot_methods",
    "sample_episodes",
    "support_digest",
    "t_interval",
]

DEFAULT_SHOTS = (1, 2, 5, 10)
DEFAULT_EPISODES = 5
FEWSHOT_METHODS = ("knn", "linear", "logreg")
KNN_KS = (1, 3, 5, 10, 20)
KNN_TEMPERATURE = 0.07
LOGREG_CS = tuple(float(c) for c in np.logspace(-3, 3, 7))
LINEAR_LRS = (1e-3, 1e-2, 0.1, 1.0)
LINEAR_WDS = (0.0, 1e-3)
FULL_BATCH_STEPS = 100  # full-batch steps on a support set of a few images per class
VAL_ROWS = 2000  # at most this many validation rows choose each episode's hyperparameters
# few-shot's grids (by flat option name), where a method's defaults suit a full train split:
# no refit on validation rows (the support set is all an episode trains on)
FEWSHOT_SETTINGS: dict[str, dict[str, Any]] = {
    "linear": {"lrs": LINEAR_LRS, "wds": LINEAR_WDS},
    "logreg": {"cs": LOGREG_CS, "refit": False},
}


def sample_episodes(
    labels: np.ndarray, rows: np.ndarray, shots: int, episodes: int, seed: int
) -> list[np.ndarray]:
    """Each episode's rows (a subset of `rows`, whose labels are `labels`): the first `shots`
    of a seeded order of each class's rows (all of them where a class has fewer), class by
    class in class order, so every episode has the same labels in the same order."""
    classes = np.unique(labels)
    out = []
    for e in range(episodes):
        rng = np.random.default_rng([seed, e])
        picked = []
        for c in classes:
            mine = rows[labels == c]
            picked.append(mine[rng.permutation(len(mine))[:shots]])
        out.append(np.concatenate(picked))
    return out


def _ids_digest(ids: Sequence[str], supports: Sequence[np.ndarray]) -> str:
    joined = "\n".join(",".join(ids[int(r)] for r in rows) for rows in supports)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def support_digest(
    store: FeatureStore, shots: Sequence[int], episodes: int, seed: int = 0, holdout: float = 0.1
) -> str:
    """A hash of the train image ids every episode of every `shots` samples (what `fewshot`
    records per shots), from the labels alone: a resume key that changes with the images."""
    from probekit.probes.base import fit_and_validation

    _, fit_rows, fit_y, _, _ = fit_and_validation(store, holdout, seed)
    ids = store.ids("train")
    parts = [
        _ids_digest(ids, sample_episodes(fit_y, fit_rows, s, episodes, seed))
        for s in sorted(set(shots))
    ]
    return hashlib.sha256(",".join(parts).encode()).hexdigest()[:16]


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% Student-t interval of the mean of `values` (the mean itself for one value); the
    caller clips it to what the values can be."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, m
    half = float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m - half, m + half


@dataclass(frozen=True)
class FewShotResult:
    """Records (one per method and shots) and the path they were written to."""

    records: list[Record]
    path: str | None = None

    def value(self, method: str, shots: int) -> float:
        for r in self.records:
            if r.method == method and r.hyper.get("shots") == shots:
                return r.value
        raise ProbekitError(f"no few-shot record of {method} at {shots} shots.")


def _knn_top1(
    support: torch.Tensor, y: torch.Tensor, queries: torch.Tensor, q_y: torch.Tensor, ks: list[int]
) -> torch.Tensor:
    """(E, len(ks)) top-1 of each episode's weighted kNN at every k; support (E, S, D) and
    queries (Q, D) L2-normalized."""
    n_classes = int(y.max()) + 1
    sims = torch.einsum("qd,esd->eqs", queries, support)  # (E, Q, S)
    top, idx = sims.topk(max(ks), dim=2)
    weights = (top / KNN_TEMPERATURE).exp()
    votes = torch.nn.functional.one_hot(y[idx], n_classes).to(weights.dtype) * weights[..., None]
    acc = []
    for k in ks:
        pred = votes[:, :, :k].sum(2).argmax(-1)  # (E, Q)
        acc.append((pred == q_y).double().mean(1))
    return torch.stack(acc, 1)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return out


def fewshot_methods() -> tuple[str, ...]:
    """The methods few-shot runs: kNN and every probe method of pooled features."""
    from probekit.methods import PROBE_METHODS

    pooled = [m.name for m in PROBE_METHODS.values() if not (m.tokens or m.dense)]
    return ("knn", *pooled)


def _per_class(labels: np.ndarray, shots: int, spec: str) -> dict[str, Any]:
    """The support's real images per class (the fewest, and each class's where they differ),
    with a warning where a class has fewer than `shots` fit images to give."""
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    out: dict[str, Any] = {"support_per_class": int(counts.min())}
    if counts.min() < shots:
        warnings.warn(
            f"{spec}: {shots} shots asked, but {int((counts < shots).sum())} classes have "
            f"fewer fit images (as few as {int(counts.min())}): those classes use all they "
            "have; the records say how many",
            ProbekitWarning,
            stacklevel=3,
        )
        out["support_per_class_each"] = [int(c) for c in np.bincount(labels)]
    return out


def _check(shots: Any, episodes: Any, methods: Any) -> tuple[list[int], list[str]]:
    shot_list = sorted(set(as_ints(shots, "shots")))
    if not shot_list or any(s < 1 for s in shot_list):
        raise OptionError(f"shots must be positive integers (e.g. 1,5,10), not {shots!r}.")
    if not is_count(episodes):
        raise OptionError(f"episodes must be a positive integer, not {episodes!r}.")
    wanted = parse_list(methods, "methods")
    known = fewshot_methods()
    for m in wanted:
        if m not in known:
            raise OptionError(f"few-shot method {m!r} is unknown; use {', '.join(known)}.")
    return shot_list, wanted


@dataclass
class _Episodes:
    """What every episode of one number of shots is scored with: the probe data (its
    validation part: at most VAL_ROWS rows), the test rows standardized and L2-normalized."""

    data: ProbeData
    feature: str
    fit: Rows  # every fit row (the supports are drawn from them), standardized, resident
    test: Rows
    test_y: torch.Tensor
    unit_val: torch.Tensor  # (V, D) L2-normalized raw features (kNN)
    unit_test: torch.Tensor


def _knn_episodes(ep: _Episodes, supports: list[np.ndarray]) -> tuple[list[float], list[Any]]:
    """Every episode's weighted kNN at each k in one batched pass, k chosen on validation."""
    data, store = ep.data, ep.data.store
    y_s = torch.from_numpy(store.labels("train")[supports[0]]).to(data.device)
    x_s = torch.stack([_read(store, "train", ep.feature, rows, data.device) for rows in supports])
    ks = [k for k in KNN_KS if k <= x_s.shape[1]] or [1]
    sup = _normalize(x_s)
    val_acc = _knn_top1(sup, y_s, ep.unit_val, data.val_y, ks)  # (E, K)
    test_acc = _knn_top1(sup, y_s, ep.unit_test, ep.test_y, ks)
    pick = [int(np.flatnonzero(row == row.max())[0]) for row in val_acc.cpu().numpy()]
    return [float(test_acc[e, k]) for e, k in enumerate(pick)], [{"k": ks[k]} for k in pick]


def _probe_episodes(
    method: str, ep: _Episodes, supports: list[np.ndarray]
) -> tuple[list[float], list[Any]]:
    """The probe method of the registry on each episode's support set (its fit part), its
    hyperparameters chosen on the validation part, then tested: the method as `probe` runs
    it, with few-shot's grid (`FEWSHOT_SETTINGS`) and full-batch steps."""
    from probekit.methods import PROBE_METHODS

    entry = PROBE_METHODS[method]
    store, data = ep.data.store, ep.data
    accs, chosen = [], []
    for rows in supports:
        rows = np.sort(rows)
        n = len(rows)
        opts = ProbeOptions.of(
            data.options, epochs=FULL_BATCH_STEPS, batch_size=n, **FEWSHOT_SETTINGS.get(method, {})
        )
        fit_y = torch.from_numpy(store.labels("train")[rows]).to(data.device)
        held = dict(data.held)
        if ep.fit.data is not None:  # the fit part in memory: the support taken from it
            order = np.argsort(data.fit_rows, kind="stable")
            pos = order[np.searchsorted(data.fit_rows, rows, sorter=order)]
            index = torch.from_numpy(pos).to(ep.fit.device)
            held["fit", (ep.feature,)] = Rows.of(ep.fit.data[0, index])
        episode = replace(data, options=opts, fit_rows=rows, fit_y=fit_y, held=held)
        sel = entry.select()(episode, opts.of_method(method))
        test = ep.test if sel.reader is None else sel.rows(store, *_test_of(ep), data.budget)
        pred = torch.from_numpy(sel.all_logits(test).argmax(1)).to(ep.test_y.device)
        accs.append(float((pred == ep.test_y).double().mean()))
        chosen.append({k: sel.config[k] for k in entry.shown if k in sel.config})
    return accs, chosen


def _test_of(ep: _Episodes) -> tuple[str, np.ndarray]:
    split = ep.data.options.test_split
    return split, np.flatnonzero(ep.data.store.usable(split))


def _read(store: FeatureStore, split: str, feature: str, rows: np.ndarray, dev: Any) -> Any:
    """(n, D) float32 raw features of `rows` (any order) on `dev`."""
    order = np.argsort(rows, kind="stable")
    x = np.empty((len(rows), store.feature_dim(feature)), np.float32)
    x[order] = store.read_rows(split, feature, rows[order])
    return torch.from_numpy(x).to(dev)


def _prepare(store: FeatureStore, feature: str, opts: ProbeOptions) -> _Episodes:
    data = ProbeData.prepare(store, opts)
    rng = np.random.default_rng(opts.seed)
    pick = np.sort(rng.permutation(len(data.val_rows))[:VAL_ROWS])
    data = replace(data, val_rows=data.val_rows[pick], val_y=data.val_y[pick])
    # read once: the validation rows every episode chooses on, the fit rows supports are from
    data = replace(data, held={("val", (feature,)): data.val([feature])})
    split = opts.test_split
    test_rows = np.flatnonzero(store.usable(split))
    dev = data.device
    test_y = torch.from_numpy(store.labels(split)[test_rows]).to(dev)
    test = data.rows_of([feature], split, test_rows)
    unit_val = _normalize(_read(store, data.val_split, feature, data.val_rows, dev))
    unit_test = _normalize(_read(store, split, feature, test_rows, dev))
    return _Episodes(data, feature, data.fit([feature]), test, test_y, unit_val, unit_test)


def fewshot(
    source: FeatureStore | str | os.PathLike[str],
    *,
    shots: int | str | Sequence[int] = DEFAULT_SHOTS,
    episodes: int = DEFAULT_EPISODES,
    seed: int = 0,
    methods: str | Sequence[str] = FEWSHOT_METHODS,
    feature: str | None = None,
    holdout: float = 0.1,
    device: str = "cpu",
    test_split: str = "test",
    write: bool = True,
    out: str | os.PathLike[str] | None = None,
) -> FewShotResult:
    """Few-shot top-1 of `methods` at each number of `shots` per class, over `episodes`
    seeded episodes, on one stored `feature` (default: head/embed, else the last stored).

    Support images come only from the fit part of train (a real `val` split, else a seeded
    stratified `holdout`, is never sampled); every hyperparameter is chosen on validation;
    test is scored once per episode. kNN (features L2-normalized) runs every episode in one
    batched pass; every other method (`fewshot_methods()`: the probe methods of pooled
    features) is the registry's own, handed the episode's support set as its fit part.
    """
    shot_list, wanted = _check(shots, episodes, methods)
    store = open_for_reading(source)
    if feature is None:
        feature = "head/embed" if store.has_feature("head/embed") else store.feature_names[-1]
    (feature,) = store.check_features([feature])
    probes = [m for m in wanted if m != "knn"]
    opts = ProbeOptions.of(
        method=probes or "logreg",
        features=[feature],
        seed=seed,
        holdout=holdout,
        device=device,
        test_split=test_split,
        write=False,
    )
    ep = _prepare(store, feature, opts)
    info = store.info
    base = Record(
        "fewshot",
        info.label,
        info.dataset.spec,
        metric="top1",
        split=test_split,
        feature=feature,
        n=len(ep.test_y),
        backbone=info.backbone.name,
        weights=info.weights_source,
    )
    ids, fit_y = store.ids("train"), ep.data.fit_y.cpu().numpy()
    records = []
    for s in shot_list:
        supports = sample_episodes(fit_y, ep.data.fit_rows, s, episodes, seed)
        digest = _ids_digest(ids, supports)
        per_class = _per_class(store.labels("train")[supports[0]], s, store.info.dataset.spec)
        for m in wanted:
            accs, chosen = (
                _knn_episodes(ep, supports) if m == "knn" else _probe_episodes(m, ep, supports)
            )
            lo, hi = (min(max(v, 0.0), 1.0) for v in t_interval(accs))  # an accuracy
            extra: dict[str, Any] = {"ci95": [lo, hi], "episodes_top1": accs, "chosen": chosen}
            extra.update(support_ids_sha256=digest, val_rows=len(ep.data.val_rows), **per_class)
            hyper = {"shots": s, "episodes": episodes, "seed": seed}
            records.append(replace(base, method=m, value=float(np.mean(accs)), hyper=hyper,
                                   extra=extra))  # fmt: skip
    path = None
    if write:
        config = ["fewshot", shot_list, episodes, seed, wanted, feature, holdout, test_split]
        path = write_records(store.path, "fewshot", config, records, out)
    return FewShotResult(records, path)
