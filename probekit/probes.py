"""Linear probes on cached features: batched linear heads (DINOv2 style) and logistic regression.

Every hyperparameter (feature, lr, wd, epoch, C) is chosen on a validation holdout carved from
the train split (or a real `val` split); the chosen probe is evaluated once on the test split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from probekit.cache.store import FeatureStore, open_for_reading, open_store
from probekit.errors import ProbekitError
from probekit.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    encode_outcomes,
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
    "Rows",
    "bootstrap_ci",
    "feature_stats",
    "fit_logreg",
    "holdout_split",
    "logreg_objective",
    "memory_budget",
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


# --------------------------------------------------------------------------- feature rows


def memory_budget(device: str | torch.device, memory_mb: int | None = None) -> int:
    """Bytes of features a probe holds at once: `memory_mb` MiB, or half of what is free on
    the device (for the CPU: available RAM)."""
    if memory_mb is not None:
        if memory_mb <= 0:
            raise ProbekitError(f"memory budget must be positive, got {memory_mb} MiB.")
        return int(memory_mb) * 2**20
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0]) // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return 4 * 2**30


class Rows:
    """Standardized rows of L features of one width, as (L, n, D): held on the device when
    they fit the memory budget, otherwise read from the store `block` rows at a time.

    `take(positions)` gives the rows at sorted positions, `blocks()` every row once in
    consecutive blocks. The same rows give the same floats either way.
    """

    def __init__(
        self,
        n: int,
        layers: int,
        width: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        data: torch.Tensor | None = None,
        read: Callable[[np.ndarray], torch.Tensor] | None = None,
        block: int = 0,
    ):
        self.n, self.layers, self.width = n, layers, width
        self.dtype, self.device = dtype, device
        self.data, self._read = data, read
        self.block = max(1, block or n)

    @property
    def resident(self) -> bool:
        return self.data is not None

    @classmethod
    def of(cls, x: torch.Tensor) -> Rows:
        """Rows of tensors already in memory: (N, D) or (L, N, D)."""
        xs = x if x.ndim == 3 else x[None]
        n_feat, n, d = xs.shape
        return cls(n, n_feat, d, dtype=xs.dtype, device=xs.device, data=xs)

    @classmethod
    def from_store(
        cls,
        store: FeatureStore,
        split: str,
        names: Sequence[str],
        rows: np.ndarray,
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        budget: int,
    ) -> Rows:
        """Rows `rows` (sorted) of `split` for features `names`, standardized by mean/std (L, D)."""
        n_feat, d = mean.shape
        dtype, device = mean.dtype, mean.device
        row_bytes = n_feat * d * torch.empty((), dtype=dtype).element_size()

        def read(pos: np.ndarray) -> torch.Tensor:
            out = torch.empty(n_feat, len(pos), d, dtype=dtype, device=device)
            step = max(1, min(len(pos), 2**24 // (4 * d)))  # 16 MiB pieces: few temporaries
            for i, name in enumerate(names):
                for s in range(0, len(pos), step):
                    part = store.read_rows(split, name, rows[pos[s : s + step]])
                    out[i, s : s + step] = torch.from_numpy(part).to(device, dtype)
            out -= mean[:, None]
            out /= std[:, None]
            return out

        if row_bytes * len(rows) <= budget:
            data = read(np.arange(len(rows)))
            return cls(len(rows), n_feat, d, dtype=dtype, device=device, data=data)
        block = max(1, budget // row_bytes)
        return cls(len(rows), n_feat, d, dtype=dtype, device=device, read=read, block=block)

    def take(self, positions: np.ndarray) -> torch.Tensor:
        """(L, len(positions), D) for sorted positions."""
        if self.data is not None:
            return _gather(self.data, torch.from_numpy(positions).to(self.device))
        assert self._read is not None
        return self._read(positions)

    def blocks(self) -> Iterator[torch.Tensor]:
        """Every row once, in order, as (L, b, D) blocks."""
        if self.data is not None:
            yield self.data
            return
        for start in range(0, self.n, self.block):
            yield self.take(np.arange(start, min(start + self.block, self.n)))


def feature_stats(
    store: FeatureStore, split: str, name: str, rows: np.ndarray, block: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and standard deviation of a feature over `rows` of `split`, read `block`
    rows at a time (blocks merged by Chan, Golub and LeVeque's pairwise update)."""
    n, mean, m2 = 0, torch.zeros(0), torch.zeros(0)
    for start in range(0, len(rows), block):
        xb = torch.from_numpy(store.read_rows(split, name, rows[start : start + block])).double()
        nb, mb = len(xb), xb.mean(0)
        m2b = (xb - mb).square_().sum(0)
        if n == 0:
            mean, m2 = mb, m2b
        else:
            delta, total = mb - mean, n + nb
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta.square() * (n * nb / total)
        n += nb
    return mean.numpy(), (m2 / max(n, 1)).sqrt_().numpy()


# --------------------------------------------------------------------------- logistic regression


def logreg_objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, c: float) -> float:
    """scikit-learn's multinomial L2 objective: C * sum_i CE(x_i W^T + b, y_i) + 0.5 ||W||^2."""
    logits = x.astype(np.float64) @ w.T.astype(np.float64) + b.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(axis=1))
    ce = log_z - logits[np.arange(len(y)), y]
    return float(c * ce.sum() + 0.5 * (w.astype(np.float64) ** 2).sum())


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last (short) dimension, in place: several times faster on CPUs
    than torch.log_softmax for a few classes."""
    logits -= logits.amax(-1, keepdim=True)
    logits -= logits.exp().sum(-1, keepdim=True).log_()
    return logits


def fit_logreg(
    x: torch.Tensor | Rows,
    y: torch.Tensor,
    n_classes: int,
    c: float,
    *,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial L2 logistic regression with scikit-learn's optimizer: (W (C, D), b (C,)).

    The same problem and stopping rule as LogisticRegression(solver="lbfgs"): scipy's
    L-BFGS-B with scikit-learn's options (gtol = `tol`, ftol = 64 eps, 50 line-search steps)
    on C * sum CE + ||W||^2 / 2 divided by C * n; the objective and its gradient (softmax
    minus one-hot) are evaluated in torch on the features' device and dtype, block by block
    when `x` is streamed. `info` receives the iteration count and whether it converged.
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    rows = x if isinstance(x, Rows) else Rows.of(x)
    if rows.layers != 1:
        raise ProbekitError(f"fit_logreg takes one feature, got {rows.layers}.")
    n, d = rows.n, rows.width
    dev, dt = rows.device, rows.dtype
    reg = 1.0 / (c * n)
    theta0 = np.zeros((n_classes, d + 1))
    if init is not None:
        theta0[:, :d] = init[0].double().cpu().numpy()
        theta0[:, d] = init[1].double().cpu().numpy()

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        wb = theta.reshape(n_classes, d + 1)
        w = torch.from_numpy(np.ascontiguousarray(wb[:, :d])).to(dev, dt)
        b = torch.from_numpy(np.ascontiguousarray(wb[:, d])).to(dev, dt)
        grad = torch.zeros(n_classes, d + 1, dtype=dt, device=dev)
        ce = torch.zeros((), dtype=torch.float64, device=dev)
        start = 0
        for xb in rows.blocks():
            xb = xb[0]
            yb = y[start : start + len(xb), None]
            start += len(xb)
            log_p = _log_softmax_(torch.addmm(b, xb, w.T))
            ce -= log_p.gather(1, yb).sum(dtype=torch.float64)
            p = log_p.exp_()
            p.scatter_add_(1, yb, torch.full_like(yb, -1, dtype=dt))
            grad[:, :d].addmm_(p.T, xb)
            grad[:, d] += p.sum(0)
        grad /= n
        grad[:, :d].add_(w, alpha=reg)
        loss = float(ce) / n + 0.5 * reg * float(
            np.square(theta.reshape(n_classes, -1)[:, :d]).sum()
        )
        return loss, grad.double().cpu().numpy().ravel()

    # one BLAS thread for the optimizer's own small vector work: its spinning threads would
    # otherwise fight torch's for the cores between evaluations (several times slower)
    with threadpool_limits(1, user_api="blas"):
        res = minimize(
            objective,
            theta0.ravel(),
            jac=True,
            method="L-BFGS-B",
            options={
                "maxiter": max_iter,
                "maxls": 50,
                "gtol": tol,
                "ftol": 64 * np.finfo(float).eps,
            },
        )
    if info is not None:
        info.update(iterations=int(res.nit), converged=bool(res.status == 0))
    theta = torch.from_numpy(res.x.reshape(n_classes, d + 1)).to(dev, dt)
    return theta[:, :d].contiguous(), theta[:, d].contiguous()


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
        flat = torch.baddbmm(
            self.bias.view(n_feat, 1, h * c), x, self.weight.view(n_feat, d, h * c)
        )
        return flat.view(n_feat, -1, h, c)


def _softmax_minus_onehot(heads: LinearHeads, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """(L, B, H, C) softmax of every head's logits minus the one-hot labels: B times the
    gradient of the batch's mean cross-entropy with respect to the logits."""
    logits = heads.logits(xb)
    logits -= logits.amax(-1, keepdim=True)
    p = logits.exp_()
    p /= p.sum(-1, keepdim=True)
    p[:, torch.arange(len(yb), device=yb.device), :, yb] -= 1.0
    return p


def _gather(data: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """data[:, idx] for (L, n, D) data: as one gather of whole rows when it can (several
    times faster than indexing the middle dimension)."""
    n_feat, n, d = data.shape
    if not data.is_contiguous():
        return data.index_select(1, idx)
    offsets = (torch.arange(n_feat, device=idx.device)[:, None] * n + idx).view(-1)
    return data.view(-1, d).index_select(0, offsets).view(n_feat, -1, d)


def _minibatches(
    rows: Rows, y: torch.Tensor, batch_size: int, window: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of minibatches. With every row in memory, a plain shuffle; otherwise a
    windowed one: blocks of consecutive rows in random order, `window` rows loaded at a time
    and shuffled, a batch that straddles two windows completed from the next."""
    n = rows.n
    if window >= n:
        windows = [(np.arange(n), torch.randperm(n, generator=gen))]
    else:
        block = max(1, window // 8)
        starts = torch.randperm(math.ceil(n / block), generator=gen).numpy() * block
        per = max(1, window // block)
        windows = []
        for i in range(0, len(starts), per):
            pos = np.sort(
                np.concatenate([np.arange(s, min(s + block, n)) for s in starts[i : i + per]])
            )
            windows.append((pos, torch.randperm(len(pos), generator=gen)))
    carry: tuple[torch.Tensor, torch.Tensor] | None = None
    for pos, perm in windows:
        data = rows.data if rows.data is not None and len(pos) == n else rows.take(pos)
        y_win = y[torch.from_numpy(pos).to(y.device)]
        perm = perm.to(rows.device)
        start = 0
        if carry is not None:
            idx = perm[: batch_size - len(carry[1])]
            carry = (
                torch.cat([carry[0], _gather(data, idx)], 1),
                torch.cat([carry[1], y_win[idx]]),
            )
            start = len(idx)
            if len(carry[1]) < batch_size:
                continue
            yield carry
            carry = None
        for s in range(start, len(perm), batch_size):
            idx = perm[s : s + batch_size]
            if len(idx) < batch_size:
                carry = (_gather(data, idx), y_win[idx])
                break
            yield _gather(data, idx), y_win[idx]
    if carry is not None:
        yield carry


def _head_scores(heads: LinearHeads, rows: Rows, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, mean cross-entropy), each (L, H), of every head on `rows`."""
    correct = torch.zeros(heads.val_acc.shape, dtype=torch.int64, device=rows.device)
    loss = torch.zeros(heads.val_acc.shape, dtype=torch.float64, device=rows.device)
    start = 0
    for xb in rows.blocks():
        yb = y[start : start + xb.shape[1]]
        start += xb.shape[1]
        log_p = _log_softmax_(heads.logits(xb))  # (L, b, H, C)
        correct += (log_p.argmax(-1) == yb[None, :, None]).sum(1)
        index = yb[None, :, None, None].expand(*log_p.shape[:3], 1)
        loss -= log_p.gather(-1, index)[..., 0].sum(1, dtype=torch.float64)
    return (correct.double() / rows.n).cpu().numpy(), (loss / rows.n).cpu().numpy()


def train_linear_heads(
    x: torch.Tensor | Rows,
    y: torch.Tensor,
    n_classes: int,
    lrs: Sequence[float],
    wds: Sequence[float],
    *,
    epochs: int = 20,
    batch_size: int = 256,
    optimizer: Literal["sgd", "adamw"] = "sgd",
    seed: int = 0,
    x_val: torch.Tensor | Rows | None = None,
    y_val: torch.Tensor | None = None,
    window: int | None = None,
) -> LinearHeads:
    """Train every (lr, wd) head of every feature on the same minibatches.

    x: (N, D) or (L, N, D), L features of one width for the same rows, or streamed `Rows`.
    SGD with momentum 0.9 or AdamW, cosine schedule, lr scaled by batch_size / 256 (DINOv2).
    With a validation set, each head keeps its weights from its best epoch (accuracy, then
    lower loss); without, its last. Heads never interact: each update uses only that head's
    own gradient, so a batched head equals the same head trained alone. `window`: rows loaded
    at once (default: all when in memory, else the budget's block); a smaller window shuffles
    within windows of blocks and gives the same heads in memory and streamed.
    """
    rows = x if isinstance(x, Rows) else Rows.of(x)
    val = None if x_val is None else (x_val if isinstance(x_val, Rows) else Rows.of(x_val))
    n_feat, n, d = rows.layers, rows.n, rows.width
    window = (n if rows.resident else rows.block) if window is None else window
    grid = [(lr, wd) for lr in lrs for wd in wds]
    h = len(grid)
    gen = torch.Generator().manual_seed(seed)
    opts: dict[str, Any] = {"dtype": rows.dtype, "device": rows.device}
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
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    steps = max(1, math.ceil(n / batch_size))
    total, step = epochs * steps, 0
    decay = bool((wd0 != 0).any())
    for epoch in range(epochs):
        for xb, yb in _minibatches(rows, y, batch_size, window, gen):
            p = _softmax_minus_onehot(heads, xb, yb)
            inv_b = 1.0 / len(yb)  # mean over the batch
            scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine schedule
            step += 1
            lr_w, lr_b = (lr0 * scale).view(1, 1, h, 1), (lr0 * scale).view(1, h, 1)
            w_flat = (n_feat, d, h * n_classes)
            if optimizer == "sgd":  # m = 0.9 m + grad (+ wd W); W -= lr m; no decay on biases
                m1[0].view(w_flat).baddbmm_(
                    xb.transpose(1, 2), p.view(w_flat[0], -1, w_flat[2]), beta=0.9, alpha=inv_b
                )
                m1[1].mul_(0.9).add_(p.sum(1), alpha=inv_b)
                if decay:
                    m1[0].addcmul_(heads.weight, wd0.view(1, 1, h, 1))
                heads.weight.addcmul_(m1[0], lr_w, value=-1.0)
                heads.bias.addcmul_(m1[1], lr_b, value=-1.0)
            else:  # AdamW: decoupled weight decay
                g_w = torch.bmm(xb.transpose(1, 2), p.view(w_flat[0], -1, w_flat[2]))
                grads = (g_w.view(heads.weight.shape).mul_(inv_b), p.sum(1).mul_(inv_b))
                for i, (param, g, lr) in enumerate(zip(params, grads, (lr_w, lr_b), strict=True)):
                    m1[i].mul_(0.9).add_(g, alpha=0.1)
                    m2[i].mul_(0.999).addcmul_(g, g, value=0.001)
                    m_hat, v_hat = m1[i] / (1 - 0.9**step), m2[i] / (1 - 0.999**step)
                    if i == 0 and decay:
                        param.mul_(1 - lr * wd0.view(1, 1, h, 1))
                    param.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))
        if val is not None and y_val is not None:
            acc, loss = _head_scores(heads, val, y_val)
            better = (acc > best.val_acc) | ((acc == best.val_acc) & (loss < best.val_loss))
            if better.any():
                mask = torch.from_numpy(better).to(rows.device)
                best.weight.transpose(1, 2)[mask] = heads.weight.transpose(1, 2)[mask]
                best.bias[mask] = heads.bias[mask]
                best.epoch[better], best.val_acc[better] = epoch + 1, acc[better]
                best.val_loss[better] = loss[better]
    return best if val is not None else heads


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
    """A stored feature's standardization (train statistics) and the rows it is read from."""

    name: str
    mean: torch.Tensor  # (D,)
    std: torch.Tensor


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
    memory_mb: int | None = None,
    allow_partial: bool = False,
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
    Features are held on the device when they fit `memory_mb` (default: half the free
    memory), otherwise streamed from the store in blocks.
    """
    store = open_for_reading(source, allow_partial=allow_partial)
    meta = store.meta
    names = store.check_features(features) if features else store.feature_names
    if test_split not in store.splits or "train" not in store.splits:
        raise ProbekitError(
            f"probes need a train and a {test_split!r} split; the store has "
            f"{', '.join(store.splits)}."
        )
    methods = ["linear", "logreg"] if method == "both" else [method]
    if any(m not in ("linear", "logreg") for m in methods):
        raise ProbekitError(f"unknown method {method!r}; use linear, logreg or both.")
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    n_classes = len(store.class_names)
    budget = memory_budget(dev, memory_mb)

    # ---- labels and the validation split: the test split is not read until evaluation
    train_rows = np.flatnonzero(store.usable("train"))
    train_y = store.labels("train")[train_rows]
    if len(np.unique(train_y)) < 2:
        raise ProbekitError("the train split has fewer than 2 classes; a probe needs at least 2.")
    if "val" in store.splits:  # a real validation split
        val_split, val_rows = "val", np.flatnonzero(store.usable("val"))
        fit_rows, val_y = train_rows, store.labels("val")[val_rows]
        fit_y = train_y
    else:
        fit_idx, val_idx = holdout_split(train_y, holdout, seed)
        val_split, fit_rows, val_rows = "train", train_rows[fit_idx], train_rows[val_idx]
        fit_y, val_y = train_y[fit_idx], train_y[val_idx]
    fit_yt = torch.from_numpy(fit_y).to(dev)
    val_yt = torch.from_numpy(val_y).to(dev)
    fit_share = len(fit_rows) / (len(fit_rows) + len(val_rows))

    feats: dict[str, _Feature] = {}
    for name in names:  # train statistics, a block at a time
        width = store.feature_dim(name)
        block = max(256, min(16384, budget // (3 * 8 * width)))  # float64 blocks, temporaries
        mean_np, std_np = feature_stats(store, "train", name, fit_rows, block)
        mean = torch.from_numpy(mean_np).to(dev, tdtype)
        std = torch.from_numpy(std_np).to(dev, tdtype)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features stay 0
        feats[name] = _Feature(name, mean, std)

    def rows_of(group: Sequence[str], split: str, rows: np.ndarray, share: float = 1.0) -> Rows:
        mean = torch.stack([feats[g].mean for g in group])
        std = torch.stack([feats[g].std for g in group])
        return Rows.from_store(store, split, group, rows, mean, std, budget=int(budget * share))

    base = {
        "backbone": meta["backbone"]["name"],
        "weights": meta["weights"]["source"],
        "dataset": meta["dataset"]["spec"],
        "train_dataset": meta["dataset"]["spec"],  # kept when `dataset` is a transfer target
    }
    records: list[ProbeRecord] = []
    selected: dict[str, dict[str, Any]] = {}
    chosen: dict[str, tuple[_Feature, torch.Tensor, torch.Tensor]] = {}  # W (C, D), b (C,)
    val_curve: list[tuple[str, str, dict[str, Any], float]] = []
    streamed: set[str] = set()
    refit_rows: Rows | None = None

    if "linear" in methods:
        grid = [(lr, wd) for lr in lrs for wd in wds]
        by_width: dict[int, list[str]] = {}
        for name in names:  # features of one width train as one stack: one matmul per minibatch
            by_width.setdefault(int(feats[name].mean.shape[0]), []).append(name)
        best: tuple[tuple[float, float], Any] = ((-1.0, 0.0), None)
        for group in by_width.values():
            fit_x = rows_of(group, "train", fit_rows, fit_share)
            val_x = rows_of(group, val_split, val_rows, 1 - fit_share)
            if not fit_x.resident:
                streamed.add("linear")
            heads = train_linear_heads(
                fit_x,
                fit_yt,
                n_classes,
                lrs,
                wds,
                epochs=epochs,
                batch_size=batch_size,
                optimizer=optimizer,
                seed=seed,
                x_val=val_x,
                y_val=val_yt,
            )
            del fit_x, val_x
            for li, name in enumerate(group):  # each feature's best head: the layer-wise curve
                hd = int(np.lexsort((heads.val_loss[li], -heads.val_acc[li]))[0])
                val_curve.append(
                    (name, "linear", {"lr": grid[hd][0], "wd": grid[hd][1]}, heads.val_acc[li, hd])
                )
            # best accuracy; among equals, the lowest validation loss
            flat = np.lexsort((heads.val_loss.ravel(), -heads.val_acc.ravel()))[0]
            li, hd = (int(v) for v in np.unravel_index(int(flat), heads.val_acc.shape))
            score = (float(heads.val_acc[li, hd]), float(-heads.val_loss[li, hd]))
            if score > best[0]:
                w, b = heads.weight[li, :, hd].T.clone(), heads.bias[li, hd].clone()
                best = (score, (group[li], w, b, int(heads.epoch[li, hd]), hd))
        assert best[1] is not None
        name, w, b, epoch, hd = best[1]
        selected["linear"] = {
            "feature": name,
            "lr": grid[hd][0],
            "wd": grid[hd][1],
            "epoch": epoch,
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "heads": len(grid) * len(names),
            "val_top1": best[0][0],
        }
        chosen["linear"] = (feats[name], w, b)

    if "logreg" in methods:
        best_lr: tuple[tuple[float, float], Any] = ((-1.0, 0.0), None)
        best_rows: tuple[Rows, Rows] | None = None  # the leading feature's rows, kept
        for name in names:  # half the budget each: the leader's rows and the current ones
            fit_x = rows_of([name], "train", fit_rows, fit_share / 2)
            val_x = rows_of([name], val_split, val_rows, (1 - fit_share) / 2)
            if not fit_x.resident:
                streamed.add("logreg")
            init = None
            best_f: tuple[tuple[float, float], float] = ((-1.0, 0.0), 0.0)
            for c in sorted(cs):  # small C first: warm starts follow the path
                w, b = fit_logreg(fit_x, fit_yt, n_classes, c, init=init, tol=tol)
                init = (w, b)
                acc, loss = _scores(val_x, val_yt, w, b)
                if (acc, -loss) > best_lr[0]:  # best accuracy; among equals, the lowest loss
                    best_lr = ((acc, -loss), (name, c, w, b))
                    best_rows = (fit_x, val_x)
                best_f = max(best_f, ((acc, -loss), c))
            val_curve.append((name, "logreg", {"C": best_f[1]}, best_f[0][0]))
            del fit_x, val_x
        assert best_lr[1] is not None and best_rows is not None
        name, c, w, b = best_lr[1]
        # refit on train + validation with the chosen C, from the chosen solution
        all_x = _Concat(*best_rows)
        del best_rows
        info: dict[str, Any] = {}
        w, b = fit_logreg(
            all_x, torch.cat([fit_yt, val_yt]), n_classes, c, init=(w, b), tol=tol, info=info
        )
        selected["logreg"] = {
            "feature": name,
            "C": c,
            "n_C": len(cs),
            "val_top1": best_lr[0][0],
            "refit": "train+val",
            "dtype": dtype,
            "tol": tol,
            "converged": info["converged"],
        }
        chosen["logreg"] = (feats[name], w, b)
        refit_rows = all_x
    for m in sorted(streamed):
        selected[m]["features_streamed"] = True

    # validation accuracy of every feature's best probe (what selection saw), for layer curves
    for name, m, cfg, acc in val_curve:
        layer, _, pool = name.partition("/")
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
    for m, (f, w, b) in chosen.items():
        cfg = selected[m]
        layer, _, pool = f.name.partition("/")
        if m == "logreg":  # the refit saw train + validation
            probe_x = refit_rows
            train_y_m = torch.cat([fit_yt, val_yt])
        else:
            probe_x, train_y_m = rows_of([f.name], "train", fit_rows), fit_yt
        assert probe_x is not None
        evals = [(store, test_split, base["dataset"])]
        for other in eval_on:
            o = other if isinstance(other, FeatureStore) else open_store(other)
            _check_transfer(store, o, f.name)
            evals.append((o, test_split, o.meta["dataset"]["spec"]))
        with torch.no_grad():
            train_top1 = _scores(probe_x, train_y_m, w, b)[0]
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
                usable = st.usable(split)
                rows = np.flatnonzero(usable)
                x = Rows.from_store(
                    st, split, [f.name], rows, f.mean[None], f.std[None], budget=budget
                )
                y = st.labels(split)[rows]
                if st is not store:  # map the other store's class ids onto ours by name
                    ids = {c: i for i, c in enumerate(store.class_names)}
                    y = np.array([ids[st.class_names[t]] for t in y], dtype=np.int64)
                ranked = np.concatenate(
                    [
                        torch.addmm(b, xb[0], w.T).argsort(1, descending=True)[:, :5].cpu().numpy()
                        for xb in x.blocks()
                    ]
                )
                correct = (ranked[:, 0] == y).astype(np.float64)
                lo, hi = bootstrap_ci(correct, seed=seed)
                outcomes = encode_outcomes(usable, correct, st.fingerprint)
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
                        extra={"ci95": [lo, hi], "outcomes": outcomes},
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


class _Concat(Rows):
    """Rows of `a` followed by rows of `b` (train then validation, for the refit)."""

    def __init__(self, a: Rows, b: Rows):
        super().__init__(a.n + b.n, a.layers, a.width, dtype=a.dtype, device=a.device)
        self.a, self.b = a, b

    def take(self, positions: np.ndarray) -> torch.Tensor:
        cut = int(np.searchsorted(positions, self.a.n))
        return torch.cat([self.a.take(positions[:cut]), self.b.take(positions[cut:] - self.a.n)], 1)

    def blocks(self) -> Iterator[torch.Tensor]:
        yield from self.a.blocks()
        yield from self.b.blocks()


def _scores(rows: Rows, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the linear classifier W (C, D), b on one feature's rows."""
    correct, loss, start = 0, 0.0, 0
    with torch.no_grad():
        for xb in rows.blocks():
            yb = y[start : start + xb.shape[1]]
            start += xb.shape[1]
            log_p = _log_softmax_(torch.addmm(b, xb[0], w.T))
            correct += int((log_p.argmax(1) == yb).sum())
            loss -= float(log_p.gather(1, yb[:, None]).sum(dtype=torch.float64))
    return correct / rows.n, loss / rows.n


def _check_transfer(src: FeatureStore, dst: FeatureStore, name: str) -> None:
    missing = sorted(set(dst.class_names) - set(src.class_names))
    if missing:
        raise ProbekitError(
            f"cannot evaluate on {dst.meta['dataset']['spec']}: classes {missing[:5]} are not "
            "among the probe's training classes."
        )
    if (
        not dst.has_feature(name)
        or src.meta["config"]["backbone"] != dst.meta["config"]["backbone"]
        or src.meta["config"]["weights"] != dst.meta["config"]["weights"]
    ):
        raise ProbekitError(
            f"cannot evaluate on {dst.path.name}: it does not hold feature {name!r} of the same "
            "backbone and weights; extract it with the same options."
        )
