"""Multinomial L2 logistic regression with scikit-learn's optimizer (L-BFGS along a C path,
warm starts), chosen on validation and refit on train + validation."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from probekit.defaults import DEFAULT_CS, DEFAULT_TOL
from probekit.errors import ProbekitError
from probekit.probes.options import MethodOptions, option

if TYPE_CHECKING:
    import torch

    from probekit.probes.base import ProbeData, Selection
    from probekit.probes.rows import Rows
else:
    from probekit._lazy import lazy_module

    torch = lazy_module("torch")

__all__ = ["Options", "fit_logreg", "logreg_objective", "select"]


@dataclass(frozen=True)
class Options(MethodOptions):
    """Logistic regression: the C path (small C first, warm starts) and L-BFGS's tolerance."""

    shown = ("C",)
    cs: tuple[float, ...] = option(
        DEFAULT_CS, "Logistic regression: the C path (comma list).", "numbers>0"
    )
    tol: float = option(
        DEFAULT_TOL,
        "Logistic regression: stop when no gradient entry exceeds it.",
        "number>0",
    )
    refit: bool = option(
        True,
        "Logistic regression: refit on train + validation with the chosen C (few-shot: no).",
        "bool",
    )


def logreg_objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, c: float) -> float:
    """scikit-learn's multinomial L2 objective: C * sum_i CE(x_i W^T + b, y_i) + 0.5 ||W||^2."""
    logits = x.astype(np.float64) @ w.T.astype(np.float64) + b.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(axis=1))
    ce = log_z - logits[np.arange(len(y)), y]
    return float(c * ce.sum() + 0.5 * (w.astype(np.float64) ** 2).sum())


@functools.cache
def _blas() -> Any:
    """The process's BLAS thread pools, found once: finding them reads /proc/self/maps and
    every loaded library's symbols (4 ms a time here, more than a small fit itself)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


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

    from probekit.probes.rows import Rows, log_softmax_

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
            log_p = log_softmax_(torch.addmm(b, xb, w.T))
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
    with _blas().limit(limits=1, user_api="blas"):
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


def select(data: ProbeData, options: Options) -> Selection:
    """The C path of every feature (small C first, warm starts), C and feature chosen on
    validation accuracy (then the lower loss), refit on train + validation from the chosen
    solution."""
    from probekit.probes.base import Selection
    from probekit.probes.rows import Concat, linear_scores

    best: tuple[tuple[float, float], Any] = ((-1.0, 0.0), None)
    best_rows: tuple[Rows, Rows] | None = None  # the leading feature's rows, kept
    curve: list[tuple[str, dict[str, Any], float]] = []
    streamed = False
    n_classes, tol = data.n_classes, options.tol
    for name in data.names:  # half the budget each: the leader's rows and the current ones
        fit_x = data.fit([name], data.fit_share / 2)
        val_x = data.val([name], (1 - data.fit_share) / 2)
        streamed |= not fit_x.resident
        init = None
        best_f: tuple[tuple[float, float], float] = ((-1.0, 0.0), 0.0)
        for c in sorted(options.cs):  # small C first: warm starts follow the path
            info: dict[str, Any] = {}
            w, b = fit_logreg(fit_x, data.fit_y, n_classes, c, init=init, tol=tol, info=info)
            init = (w, b)
            acc, loss = linear_scores(val_x, data.val_y, w, b)
            if (acc, -loss) > best[0]:  # best accuracy; among equals, the lowest loss
                best = ((acc, -loss), (name, c, w, b, info))
                best_rows = (fit_x, val_x)
            best_f = max(best_f, ((acc, -loss), c))
        curve.append((name, {"C": best_f[1]}, best_f[0][0]))
        del fit_x, val_x
    assert best[1] is not None and best_rows is not None
    name, c, w, b, info = best[1]
    config: dict[str, Any] = {
        "feature": name,
        "C": c,
        "n_C": len(options.cs),
        "val_top1": best[0][0],
        "dtype": data.options.dtype,
        "tol": tol,
        "converged": info["converged"],
    }
    if streamed:
        config["features_streamed"] = True
    if not options.refit:
        fit_rows = best_rows[0]
        return Selection(
            "logreg", data.feats[name], w, b, config, curve, lambda: fit_rows, data.fit_y
        )
    # the chosen solution's validation logits, before the refit sees those rows: what its
    # temperature is fitted on
    with torch.no_grad():
        val_logits = np.concatenate(
            [torch.addmm(b, xb[0], w.T).double().cpu().numpy() for xb in best_rows[1].blocks()]
        )
    # refit on train + validation with the chosen C, from the chosen solution
    all_x = Concat(*best_rows)
    del best_rows
    all_y = torch.cat([data.fit_y, data.val_y])
    info = {}
    w, b = fit_logreg(all_x, all_y, n_classes, c, init=(w, b), tol=tol, info=info)
    config.update(refit="train+val", converged=info["converged"])
    return Selection(
        "logreg",
        data.feats[name],
        w,
        b,
        config,
        curve,
        lambda: all_x,
        all_y,
        val_logits=val_logits,
    )
