"""Linear probes on cached features: batched linear heads (DINOv2 style) and logistic regression.

Every hyperparameter (feature, lr, wd, epoch, C) is chosen on a validation holdout carved from
the train split (or a real `val` split); the chosen probe is evaluated once on the test split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from probekit.cache.store import FeatureStore, open_store
from probekit.errors import ProbekitError
from probekit.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    per_class_accuracy,
    topk_accuracy,
)

__all__ = [
    "DEFAULT_CS",
    "DEFAULT_LRS",
    "DEFAULT_WDS",
    "LinearHeads",
    "ProbeRecord",
    "ProbeResult",
    "bootstrap_ci",
    "fit_logreg",
    "holdout_split",
    "logreg_objective",
    "probe",
    "train_linear_heads",
]

# DINOv2's 13 learning rates (scaled by batch_size / 256), a few weight decays, DINOv2's C path
DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DEFAULT_WDS = (0.0, 1e-4, 1e-3)
DEFAULT_CS = tuple(float(c) for c in 10 ** np.linspace(-6, 5, 45))
Method = Literal["linear", "logreg", "both"]


# --------------------------------------------------------------------------- splits, stats


def holdout_split(
    labels: np.ndarray, fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, holdout) row indices: a stratified, seeded holdout of `fraction` of the rows.

    Classes with a single example stay in the fit part (they cannot be split).
    """
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ProbekitError(f"holdout fraction must be in (0, 1), got {fraction}.")
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    splittable = counts[labels] >= 2
    n_val = max(1, round(fraction * splittable.sum()))
    n_classes = int((counts >= 2).sum())
    if splittable.sum() - n_val < n_classes or n_val < n_classes:
        raise ProbekitError(
            f"the train split ({len(labels)} rows, {n_classes} classes with 2+ examples) is too "
            f"small for a stratified {fraction:.0%} holdout; give a `val` split or more data."
        )
    fit, val = train_test_split(
        idx[splittable], test_size=n_val, random_state=seed, stratify=labels[splittable]
    )
    return np.sort(np.concatenate([fit, idx[~splittable]])), np.sort(val)


# --------------------------------------------------------------------------- logistic regression


def logreg_objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, c: float) -> float:
    """scikit-learn's multinomial L2 objective: C * sum_i CE(x_i W^T + b, y_i) + 0.5 ||W||^2."""
    logits = x.astype(np.float64) @ w.T.astype(np.float64) + b.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(axis=1))
    ce = log_z - logits[np.arange(len(y)), y]
    return float(c * ce.sum() + 0.5 * (w.astype(np.float64) ** 2).sum())


def fit_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    c: float,
    *,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on scikit-learn's objective; returns (W (C, D), b (C,)).

    Minimizes the objective divided by C * n (the same minimizer, as scikit-learn does):
    mean CE + ||W||^2 / (2 C n), until the largest gradient entry is below `tol`
    (scikit-learn's `tol` means the same, with the same default). The gradient is written out
    (softmax minus one-hot), which spares autograd's bookkeeping on every evaluation.
    """
    n, d = x.shape
    w = torch.zeros(n_classes, d, dtype=x.dtype, device=x.device)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device)
    if init is not None:
        w, b = init[0].clone(), init[1].clone()
    reg = 1.0 / (c * n)
    rows = torch.arange(n, device=x.device)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        logits = torch.addmm(b, x, w.T)  # (n, C)
        log_p = torch.log_softmax(logits, dim=1)
        loss = -log_p[rows, y].mean() + 0.5 * reg * (w * w).sum()
        p = log_p.exp_()
        p[rows, y] -= 1.0
        p /= n
        w.grad = torch.addmm(w, p.T, x, beta=reg)  # (C, D): (p - onehot)^T x / n + reg W
        b.grad = p.sum(0)
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return w, b


# --------------------------------------------------------------------------- linear heads
# --------------------------------------------------------------------------- linear heads


@dataclass
class LinearHeads:
    """Linear heads for L features of one width, H (lr, wd) heads each, trained together.

    weight (L, D, H, C) (so that all heads of a feature are one (D, H*C) matrix), bias
    (L, H, C); `epoch[l, h]` is the epoch (1-based) each head's weights come from,
    `val_acc`/`val_loss` (L, H) its validation scores then.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    epoch: np.ndarray
    val_acc: np.ndarray
    val_loss: np.ndarray

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(L, B, D) -> (L, B, H, C): one batched matmul for every feature and head."""
        n_feat, d, h, c = self.weight.shape
        flat = torch.bmm(x, self.weight.view(n_feat, d, h * c))
        return flat.view(n_feat, -1, h, c) + self.bias[:, None]


def _softmax_grad(
    heads: LinearHeads, xb: torch.Tensor, yb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of each head's mean cross-entropy on the batch (softmax minus one-hot)."""
    n_feat, d, h, c = heads.weight.shape
    p = torch.softmax(heads.logits(xb), dim=-1)  # (L, B, H, C)
    p -= torch.nn.functional.one_hot(yb, c).to(p.dtype)[None, :, None, :]
    p /= len(yb)
    g_w = torch.bmm(xb.transpose(1, 2), p.view(n_feat, -1, h * c)).view(n_feat, d, h, c)
    return g_w, p.sum(1)


def train_linear_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    lrs: Sequence[float],
    wds: Sequence[float],
    *,
    epochs: int = 20,
    batch_size: int = 256,
    optimizer: Literal["sgd", "adamw"] = "sgd",
    seed: int = 0,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
) -> LinearHeads:
    """Train every (lr, wd) head of every feature on the same minibatches.

    x: (N, D) or (L, N, D), L features of one width for the same rows. SGD with momentum 0.9
    or AdamW, cosine schedule, lr scaled by batch_size / 256 (DINOv2). With a validation set,
    each head keeps its weights from its best epoch (accuracy, then lower loss); without,
    its last. Heads never interact: each update uses only that head's own gradient, so a
    batched head equals the same head trained alone.
    """
    xs = x if x.ndim == 3 else x[None]
    xv = None if x_val is None else (x_val if x_val.ndim == 3 else x_val[None])
    n_feat, n, d = xs.shape
    grid = [(lr, wd) for lr in lrs for wd in wds]
    h = len(grid)
    gen = torch.Generator().manual_seed(seed)
    opts: dict[str, Any] = {"dtype": xs.dtype, "device": xs.device}
    # zero init: the problem is convex and a head's start does not depend on its neighbours
    heads = LinearHeads(
        torch.zeros(n_feat, d, h, n_classes, **opts),
        torch.zeros(n_feat, h, n_classes, **opts),
        np.full((n_feat, h), epochs),
        np.zeros((n_feat, h)),
        np.zeros((n_feat, h)),
    )
    best = LinearHeads(
        heads.weight.clone(),
        heads.bias.clone(),
        np.zeros((n_feat, h), int),
        np.full((n_feat, h), -1.0),
        np.full((n_feat, h), np.inf),
    )
    lr0 = torch.tensor([lr * batch_size / 256 for lr, _ in grid], **opts)
    wd0 = torch.tensor([wd for _, wd in grid], **opts)
    params = [heads.weight, heads.bias]
    shapes = [(1, 1, h, 1), (1, h, 1)]
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    steps = max(1, math.ceil(n / batch_size))
    total, step = epochs * steps, 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).to(xs.device)
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]
            g_w, g_b = _softmax_grad(heads, xs[:, idx], y[idx])
            scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine schedule
            step += 1
            for i, (p, g) in enumerate(zip(params, (g_w, g_b), strict=True)):
                lr = (lr0 * scale).view(shapes[i])
                wd = wd0.view(shapes[i]) if i == 0 else 0.0  # no decay on biases
                if optimizer == "sgd":
                    m1[i].mul_(0.9).add_(g + wd * p)
                    p.sub_(lr * m1[i])
                else:  # AdamW: decoupled weight decay
                    m1[i].mul_(0.9).add_(g, alpha=0.1)
                    m2[i].mul_(0.999).addcmul_(g, g, value=0.001)
                    m_hat, v_hat = m1[i] / (1 - 0.9**step), m2[i] / (1 - 0.999**step)
                    p.mul_(1 - lr * wd).sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))
        if xv is not None and y_val is not None:
            logits = heads.logits(xv)  # (L, V, H, C)
            acc = (logits.argmax(-1) == y_val[None, :, None]).double().mean(1).cpu().numpy()
            onehot = torch.nn.functional.one_hot(y_val, n_classes).to(logits.dtype)
            log_p = torch.log_softmax(logits, dim=-1)
            loss = -(log_p * onehot[None, :, None, :]).sum(-1).mean(1).double().cpu().numpy()
            better = (acc > best.val_acc) | ((acc == best.val_acc) & (loss < best.val_loss))
            if better.any():
                mask = torch.from_numpy(better).to(xs.device)
                best.weight.transpose(1, 2)[mask] = heads.weight.transpose(1, 2)[mask]
                best.bias[mask] = heads.bias[mask]
                best.epoch[better], best.val_acc[better] = epoch + 1, acc[better]
                best.val_loss[better] = loss[better]
    return best if xv is not None else heads


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class ProbeRecord:
    """One number of one probe: its feature, method, chosen hyperparameters, metric, split."""

    backbone: str
    weights: str
    dataset: str
    split: str
    layer: str
    pool: str
    method: str
    metric: str
    value: float
    n: int
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # the dataset the probe was trained on: differs from `dataset` for a transfer evaluation
    train_dataset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProbeResult:
    """Every record of one `probe` call; `selected[method]` is the winning configuration."""

    records: list[ProbeRecord]
    selected: dict[str, dict[str, Any]]
    path: str | None = None

    def value(self, metric: str, *, method: str, split: str | None = None) -> float:
        hits = [
            r
            for r in self.records
            if r.metric == metric and r.method == method and (split is None or r.split == split)
        ]
        if len(hits) != 1:
            raise ProbekitError(f"{len(hits)} records match {metric} {method} {split}.")
        return hits[0].value


@dataclass
class _Feature:
    name: str
    fit_x: torch.Tensor
    val_x: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _standardize(
    x: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: str, dtype: torch.dtype
) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(x, dtype=np.float64)).to(device, dtype) - mean) / std


def probe(
    source: FeatureStore | str | os.PathLike[str],
    *,
    method: Method = "both",
    features: Sequence[str] | None = None,
    holdout: float = 0.1,
    seed: int = 0,
    lrs: Sequence[float] = DEFAULT_LRS,
    wds: Sequence[float] = DEFAULT_WDS,
    epochs: int = 20,
    batch_size: int = 256,
    optimizer: Literal["sgd", "adamw"] = "sgd",
    cs: Sequence[float] = DEFAULT_CS,
    tol: float = 1e-4,
    dtype: Literal["float32", "float64"] = "float32",
    device: str = "auto",
    eval_on: Sequence[FeatureStore | str | os.PathLike[str]] = (),
    test_split: str = "test",
    write: bool = True,
) -> ProbeResult:
    """Train probes on every stored feature and report the one chosen on validation data.

    linear: G = features x lrs x wds heads trained together on each minibatch (one batched
    matmul), epoch and head chosen on validation accuracy. logreg: multinomial L2 logistic
    regression by L-BFGS along the C path (warm starts), C and feature chosen on validation,
    then refit on train + validation. The chosen probe is evaluated once on `test_split`, and
    on the test splits of the `eval_on` stores (transfer; same class names needed).
    """
    store = source if isinstance(source, FeatureStore) else open_store(source)
    meta = store.meta
    names = list(features) if features else store.feature_names
    unknown = [n for n in names if n not in store.feature_names]
    if unknown:
        raise ProbekitError(f"unknown features {unknown}; the store has {store.feature_names}.")
    if test_split not in store.splits or "train" not in store.splits:
        raise ProbekitError(
            f"probes need a train and a {test_split!r} split; the store has "
            f"{', '.join(store.splits)}."
        )
    methods = ["linear", "logreg"] if method == "both" else [method]
    if any(m not in ("linear", "logreg") for m in methods):
        raise ProbekitError(f"unknown method {method!r}; use linear, logreg or both.")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    n_classes = len(store.class_names)

    # ---- labels and the validation split: the test split is not read until evaluation
    train_valid = store.valid("train")
    train_y = store.labels("train")[train_valid]
    if len(np.unique(train_y)) < 2:
        raise ProbekitError("the train split has fewer than 2 classes; a probe needs at least 2.")
    val_valid = store.valid("val") if "val" in store.splits else None
    if val_valid is not None:  # a real validation split
        fit_y, val_y = train_y, store.labels("val")[val_valid]
    else:
        fit_idx, val_idx = holdout_split(train_y, holdout, seed)
        fit_y, val_y = train_y[fit_idx], train_y[val_idx]
    fit_yt = torch.from_numpy(fit_y).to(dev)
    val_yt = torch.from_numpy(val_y).to(dev)

    feats: list[_Feature] = []
    for name in names:
        train_x = store.features("train", name)[train_valid]
        if val_valid is not None:
            fit_np, val_np = train_x, store.features("val", name)[val_valid]
        else:
            fit_np, val_np = train_x[fit_idx], train_x[val_idx]
        f64 = fit_np.astype(np.float64)
        mean = torch.from_numpy(f64.mean(0)).to(dev, tdtype)
        std = torch.from_numpy(f64.std(0)).to(dev, tdtype)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features stay 0
        feats.append(
            _Feature(
                name,
                _standardize(fit_np, mean, std, dev, tdtype),
                _standardize(val_np, mean, std, dev, tdtype),
                mean,
                std,
            )
        )

    base = {
        "backbone": meta["backbone"]["name"],
        "weights": meta["weights"]["source"],
        "dataset": meta["dataset"]["spec"],
        "train_dataset": meta["dataset"]["spec"],  # kept when `dataset` is a transfer target
    }
    records: list[ProbeRecord] = []
    selected: dict[str, dict[str, Any]] = {}
    chosen: dict[str, tuple[_Feature, Any]] = {}
    val_curve: list[tuple[_Feature, str, dict[str, Any], float]] = []

    if "linear" in methods:
        grid = [(lr, wd) for lr in lrs for wd in wds]
        by_width: dict[int, list[_Feature]] = {}
        for f in feats:  # features of one width train as one stack: one matmul per minibatch
            by_width.setdefault(int(f.fit_x.shape[1]), []).append(f)
        best: tuple[tuple[float, float], Any] = ((-1.0, 0.0), None)
        for group in by_width.values():
            heads = train_linear_heads(
                torch.stack([f.fit_x for f in group]),
                fit_yt,
                n_classes,
                lrs,
                wds,
                epochs=epochs,
                batch_size=batch_size,
                optimizer=optimizer,
                seed=seed,
                x_val=torch.stack([f.val_x for f in group]),
                y_val=val_yt,
            )
            for li, f in enumerate(group):  # each feature's best head: the layer-wise curve
                hd = int(np.lexsort((heads.val_loss[li], -heads.val_acc[li]))[0])
                val_curve.append(
                    (f, "linear", {"lr": grid[hd][0], "wd": grid[hd][1]}, heads.val_acc[li, hd])
                )
            # best accuracy; among equals, the lowest validation loss
            flat = np.lexsort((heads.val_loss.ravel(), -heads.val_acc.ravel()))[0]
            li, hd = (int(v) for v in np.unravel_index(int(flat), heads.val_acc.shape))
            score = (float(heads.val_acc[li, hd]), float(-heads.val_loss[li, hd]))
            if score > best[0]:
                best = (score, (group[li], heads, li, hd))
        assert best[1] is not None
        f, heads, li, hd = best[1]
        cfg = {
            "feature": f.name,
            "lr": grid[hd][0],
            "wd": grid[hd][1],
            "epoch": int(heads.epoch[li, hd]),
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "heads": len(grid) * len(feats),
            "val_top1": best[0][0],
        }
        selected["linear"] = cfg
        w, b = heads.weight[li, :, hd], heads.bias[li, hd]
        chosen["linear"] = (f, lambda x, w=w, b=b: x @ w + b)

    if "logreg" in methods:
        best_lr: tuple[tuple[float, float], Any] = ((-1.0, 0.0), None)
        for f in feats:
            init = None
            best_f: tuple[tuple[float, float], float] = ((-1.0, 0.0), 0.0)
            for c in sorted(cs):  # small C first: warm starts follow the path
                w, b = fit_logreg(f.fit_x, fit_yt, n_classes, c, init=init, tol=tol)
                init = (w, b)
                logits = f.val_x @ w.T + b
                acc = float((logits.argmax(1) == val_yt).double().mean())
                loss = float(torch.nn.functional.cross_entropy(logits, val_yt))
                if (acc, -loss) > best_lr[0]:  # best accuracy; among equals, the lowest loss
                    best_lr = ((acc, -loss), (f, c, w, b))
                best_f = max(best_f, ((acc, -loss), c))
            val_curve.append((f, "logreg", {"C": best_f[1]}, best_f[0][0]))
        assert best_lr[1] is not None
        f, c, w, b = best_lr[1]
        # refit on train + validation with the chosen C, from the chosen solution
        all_x = torch.cat([f.fit_x, f.val_x])
        all_y = torch.cat([fit_yt, val_yt])
        w, b = fit_logreg(all_x, all_y, n_classes, c, init=(w, b), tol=tol)
        selected["logreg"] = {
            "feature": f.name,
            "C": c,
            "n_C": len(cs),
            "val_top1": best_lr[0][0],
            "refit": "train+val",
            "dtype": dtype,
            "tol": tol,
        }
        chosen["logreg"] = (f, lambda x, w=w, b=b: x @ w.T + b)

    # validation accuracy of every feature's best probe (what selection saw), for layer curves
    for f, m, cfg, acc in val_curve:
        layer, _, pool = f.name.partition("/")
        records.append(
            ProbeRecord(
                **base,
                split="val",
                layer=layer,
                pool=pool,
                method=m,
                metric="val_top1",
                value=float(acc),
                n=len(val_y),
                config=cfg,
            )
        )

    # ---- evaluation: the only place the test split is read
    for m, (f, predict) in chosen.items():
        cfg = selected[m]
        layer, _, pool = f.name.partition("/")
        probe_x = torch.cat([f.fit_x, f.val_x]) if m == "logreg" else f.fit_x
        train_y_m = torch.cat([fit_yt, val_yt]) if m == "logreg" else fit_yt
        evals = [(store, test_split, base["dataset"])]
        for other in eval_on:
            o = other if isinstance(other, FeatureStore) else open_store(other)
            _check_transfer(store, o, f.name)
            evals.append((o, test_split, o.meta["dataset"]["spec"]))
        with torch.no_grad():
            train_top1 = float((predict(probe_x).argmax(1) == train_y_m).double().mean())
            # underfitting: the probe fits its own training data hardly better than held-out data
            underfit = train_top1 < 0.95 and train_top1 - cfg["val_top1"] < 0.02
            records.append(
                ProbeRecord(
                    **base,
                    split="train",
                    layer=layer,
                    pool=pool,
                    method=m,
                    metric="train_top1",
                    config=cfg,
                    n=len(train_y_m),
                    value=train_top1,
                    extra={"underfit": underfit},
                )
            )
            for st, split, ds_spec in evals:
                v = st.valid(split)
                x = _standardize(st.features(split, f.name)[v], f.mean, f.std, dev, tdtype)
                y = st.labels(split)[v]
                if st is not store:  # map the other store's class ids onto ours by name
                    ids = {c: i for i, c in enumerate(store.class_names)}
                    y = np.array([ids[st.class_names[t]] for t in y], dtype=np.int64)
                ranked = predict(x).argsort(1, descending=True)[:, :5].cpu().numpy()
                correct = (ranked[:, 0] == y).astype(np.float64)
                lo, hi = bootstrap_ci(correct, seed=seed)
                common = dict(
                    base,
                    dataset=ds_spec,
                    split=split,
                    layer=layer,
                    pool=pool,
                    method=m,
                    config=cfg,
                    n=len(y),
                )
                per_class = per_class_accuracy(ranked[:, 0], y, n_classes)
                records += [
                    ProbeRecord(
                        **common,
                        metric="top1",
                        value=float(correct.mean()),
                        extra={"ci95": [lo, hi]},
                    ),
                    ProbeRecord(**common, metric="top5", value=topk_accuracy(ranked, y, 5)),
                    ProbeRecord(
                        **common,
                        metric="balanced_accuracy",
                        value=balanced_accuracy(ranked[:, 0], y, n_classes),
                    ),
                    ProbeRecord(
                        **common,
                        metric="worst_class_accuracy",
                        value=float(np.nanmin(per_class)),
                        extra={"per_class": [None if np.isnan(a) else float(a) for a in per_class]},
                    ),
                ]
    path = None
    if write:
        config = [
            method,
            names,
            holdout,
            seed,
            lrs,
            wds,
            epochs,
            batch_size,
            optimizer,
            cs,
            tol,
            dtype,
            test_split,
            [str(getattr(o, "path", o)) for o in eval_on],
        ]
        path = store.write_records("probe", config, (r.to_dict() for r in records))
    return ProbeResult(records, selected, path)


def _check_transfer(src: FeatureStore, dst: FeatureStore, name: str) -> None:
    missing = sorted(set(dst.class_names) - set(src.class_names))
    if missing:
        raise ProbekitError(
            f"cannot evaluate on {dst.meta['dataset']['spec']}: classes {missing[:5]} are not "
            "among the probe's training classes."
        )
    if (
        name not in dst.feature_names
        or src.meta["config"]["backbone"] != dst.meta["config"]["backbone"]
        or src.meta["config"]["weights"] != dst.meta["config"]["weights"]
    ):
        raise ProbekitError(
            f"cannot evaluate on {dst.path.name}: it does not hold feature {name!r} of the same "
            "backbone and weights; extract it with the same options."
        )
