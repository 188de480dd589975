"""Few-shot episodes on cached features: `shots` train images per class sampled from the fit
part of the train split (never from validation, never from test), kNN, linear heads and
logistic regression fitted on each episode, each one's hyperparameters chosen on the
validation part, then scored once on test; the mean over episodes with a t interval.

Episodes are nested and seeded: episode e draws one seeded order of each class's fit rows and
takes its first `shots`, so the 1-shot support is part of the 5-shot support and a rerun with
the same seed draws the same images (the sampled ids' hash is in every record). kNN (cosine,
DINO's weighted vote) and the linear heads run every episode in one batched pass (episodes
stacked as the heads' feature axis); logistic regression fits each episode along a short C
path with warm starts.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from probekit.cache.store import FeatureStore, open_for_reading
from probekit.errors import OptionError, ProbekitError
from probekit.records import Record, write_records
from probekit.specs import as_ints, is_count, parse_list

__all__ = [
    "DEFAULT_EPISODES",
    "DEFAULT_SHOTS",
    "FEWSHOT_METHODS",
    "FewShotResult",
    "fewshot",
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
LINEAR_STEPS = 100  # full-batch steps on a support set of a few images per class
VAL_ROWS = 2000  # at most this many validation rows choose each episode's hyperparameters


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
    test is scored once per episode. Features are standardized by the fit part's statistics
    (no labels) for the linear heads and logistic regression; kNN uses them L2-normalized.
    """
    from probekit.probes import ProbeData, ProbeOptions
    from probekit.probes.linear import train_linear_heads
    from probekit.probes.logreg import fit_logreg

    shot_list = sorted(set(as_ints(shots, "shots")))
    if not shot_list or any(s < 1 for s in shot_list):
        raise OptionError(f"shots must be positive integers (e.g. 1,5,10), not {shots!r}.")
    if not is_count(episodes):
        raise OptionError(f"episodes must be a positive integer, not {episodes!r}.")
    wanted = parse_list(methods, "methods")
    for m in wanted:
        if m not in FEWSHOT_METHODS:
            raise OptionError(
                f"few-shot method {m!r} is unknown; use {', '.join(FEWSHOT_METHODS)}."
            )
    store = open_for_reading(source)
    if feature is None:
        feature = "head/embed" if store.has_feature("head/embed") else store.feature_names[-1]
    (feature,) = store.check_features([feature])
    opts = ProbeOptions.of(
        method="logreg",
        features=[feature],
        seed=seed,
        holdout=holdout,
        device=device,
        test_split=test_split,
        write=False,
    )
    data = ProbeData.prepare(store, opts)
    dev = data.device
    fit_y = data.fit_y.cpu().numpy()
    rng = np.random.default_rng(seed)
    val_pick = np.sort(rng.permutation(len(data.val_rows))[:VAL_ROWS])
    val_rows, val_y = data.val_rows[val_pick], data.val_y.cpu().numpy()[val_pick]
    test_rows = np.flatnonzero(store.usable(test_split))
    test_y = store.labels(test_split)[test_rows]
    n_classes = data.n_classes
    stats = data.feats[feature]

    def read(split: str, rows: np.ndarray) -> torch.Tensor:
        order = np.argsort(rows, kind="stable")
        x = np.empty((len(rows), store.feature_dim(feature)), np.float32)
        x[order] = store.read_rows(split, feature, rows[order])
        return torch.from_numpy(x).to(dev)

    def standard(x: torch.Tensor) -> torch.Tensor:
        return (x - stats.mean) / stats.std

    x_val, x_test = read(data.val_split, val_rows), read(test_split, test_rows)
    yv = torch.from_numpy(val_y).to(dev)
    yt = torch.from_numpy(test_y).to(dev)
    info = store.info
    base = Record(
        "fewshot",
        info.label,
        info.dataset.spec,
        metric="top1",
        split=test_split,
        feature=feature,
        n=len(test_rows),
        backbone=info.backbone.name,
        weights=info.weights_source,
    )
    ids = store.ids("train")
    records = []
    for s in shot_list:
        supports = sample_episodes(fit_y, data.fit_rows, s, episodes, seed)
        digest = _ids_digest(ids, supports)
        y_s = torch.from_numpy(store.labels("train")[supports[0]]).to(dev)
        x_s = torch.stack([read("train", rows) for rows in supports])  # (E, S, D)
        per: dict[str, tuple[list[float], list[dict[str, Any]]]] = {}
        if "knn" in wanted:
            ks = [k for k in KNN_KS if k <= x_s.shape[1]] or [1]
            sup = _normalize(x_s)
            val_acc = _knn_top1(sup, y_s, _normalize(x_val), yv, ks)  # (E, K)
            test_acc = _knn_top1(sup, y_s, _normalize(x_test), yt, ks)
            pick = [int(np.flatnonzero(row == row.max())[0]) for row in val_acc.cpu().numpy()]
            per["knn"] = (
                [float(test_acc[e, k]) for e, k in enumerate(pick)],
                [{"k": ks[k]} for k in pick],
            )
        if "linear" in wanted:
            n_s = x_s.shape[1]
            heads = train_linear_heads(
                standard(x_s),
                y_s,
                n_classes,
                LINEAR_LRS,
                LINEAR_WDS,
                epochs=LINEAR_STEPS,
                batch_size=n_s,
                seed=seed,
                x_val=standard(x_val).expand(episodes, -1, -1),
                y_val=yv,
            )
            grid = [(lr, wd) for lr in LINEAR_LRS for wd in LINEAR_WDS]
            accs, chosen = [], []
            with torch.no_grad():
                logits = heads.logits(standard(x_test).expand(episodes, -1, -1))  # (E, Q, H, C)
            for e in range(episodes):
                h = int(np.lexsort((heads.val_loss[e], -heads.val_acc[e]))[0])
                accs.append(float((logits[e, :, h].argmax(-1) == yt).double().mean()))
                chosen.append({"lr": grid[h][0], "wd": grid[h][1], "epoch": int(heads.epoch[e, h])})
            per["linear"] = (accs, chosen)
        if "logreg" in wanted:
            accs, chosen = [], []
            xv, xt = standard(x_val), standard(x_test)
            for e in range(episodes):
                xe = standard(x_s[e])
                best: tuple[float, float, Any] = (-1.0, 0.0, None)
                init = None
                for c in LOGREG_CS:
                    w, b = fit_logreg(xe, y_s, n_classes, c, init=init)
                    init = (w, b)
                    acc = float(((xv @ w.T + b).argmax(1) == yv).double().mean())
                    if acc > best[0]:
                        best = (acc, c, (w, b))
                w, b = best[2]
                accs.append(float(((xt @ w.T + b).argmax(1) == yt).double().mean()))
                chosen.append({"C": best[1]})
            per["logreg"] = (accs, chosen)
        for m in wanted:
            accs, chosen = per[m]
            lo, hi = (min(max(v, 0.0), 1.0) for v in t_interval(accs))  # an accuracy
            records.append(
                replace(
                    base,
                    method=m,
                    value=float(np.mean(accs)),
                    hyper={"shots": s, "episodes": episodes, "seed": seed},
                    extra={
                        "ci95": [lo, hi],
                        "episodes_top1": accs,
                        "chosen": chosen,
                        "support_ids_sha256": digest,
                        "support_per_class": s,
                        "val_rows": len(val_rows),
                    },
                )
            )
    path = None
    if write:
        config = ["fewshot", shot_list, episodes, seed, wanted, feature, holdout, test_split]
        path = write_records(store.path, "fewshot", config, records, out)
    return FewShotResult(records, path)
