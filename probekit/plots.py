"""PNG plots of a report: layer-wise curves, a model x task heatmap, and ranking bars.

matplotlib's object API (Figure + the Agg canvas) is used directly: no pyplot state, no display.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from probekit.methods import method_title

if TYPE_CHECKING:
    from probekit.report.compute import Report

__all__ = [
    "plot_cost",
    "plot_fewshot",
    "plot_heatmap",
    "plot_layers",
    "plot_methods",
    "plot_ranking",
    "plot_reliability",
    "plot_resolution",
    "plot_similarity",
]


def _save(fig: Figure, path: str | os.PathLike[str]) -> str:
    with warnings.catch_warnings():  # a cramped layout still draws; it is not worth a warning
        warnings.filterwarnings("ignore", "constrained_layout not applied", UserWarning)
        fig.savefig(path, dpi=110)
    return str(path)


def _finish(
    fig: Figure, ax: Any, title: str, path: str | os.PathLike[str], fontsize: int = 8
) -> str:
    """The first panel's legend below the panels (three columns at most), the title, saved."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ncols = min(3, len(labels))
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=fontsize)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def short(task: str, width: int = 28) -> str:
    """A task's name for a plot: folder/file specs by their last path part, then truncated."""

    def one(spec: str) -> str:
        kind, sep, arg = spec.partition(":")
        if sep and kind in ("imagefolder", "csv"):
            spec = f"{kind}:{Path(arg.rstrip('/')).name or arg}"
        return spec if len(spec) <= width else spec[: width - 1] + "…"

    return "->".join(one(part) for part in task.split("->"))


def plot_layers(rep: Report, path: str | os.PathLike[str]) -> str:
    """Accuracy by relative layer depth: one panel per (method, task), a line per model."""
    tasks = [t for t in rep.tasks if any(k[0] == t for k in rep.curves)]
    methods = [m for m in rep.methods if any(k[1] == m for k in rep.curves)]
    nr, nc = max(1, len(methods)), max(1, len(tasks))
    fig = Figure(figsize=(4.2 * nc, 3.2 * nr), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nr, nc, squeeze=False))
    colors = {m: f"C{i % 10}" for i, m in enumerate(rep.models)}
    for i, method in enumerate(methods):
        for j, task in enumerate(tasks):
            ax: Any = axes[i, j]
            for model in rep.models:
                pts = rep.curves.get((task, method, model))
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ys = [100 * p[2] for p in pts]
                ax.plot(xs, ys, marker="o", ms=3, color=colors[model], label=model)
            ax.set_title(f"{short(task)}: {method_title(method)}", fontsize=9)
            ax.set_xticks([0.25, 0.5, 0.75, 1.0, 1.08], ["0.25", "0.5", "0.75", "1", "head"])
            ax.set_xlabel("relative depth (block / number of blocks)", fontsize=8)
            ax.set_ylabel("top-1 (%)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        cols = max(1, min(len(labels), int(4.2 * nc // 2.4)))
        fig.legend(handles, labels, loc="outside lower center", ncols=cols, fontsize=8)
    fig.suptitle("Accuracy by layer depth", fontsize=11)
    return _save(fig, path)


def plot_heatmap(rep: Report, path: str | os.PathLike[str]) -> str:
    """Test top-1 of every model (rows) on every task (columns), a panel per method."""
    nm = max(1, len(rep.methods))
    fig = Figure(
        figsize=(3.0 + (0.9 * len(rep.tasks) + 0.8) * nm, 2.2 + 0.45 * len(rep.models)),
        layout="constrained",
    )
    axes = fig.subplots(1, nm, squeeze=False)[0]
    for i, (ax, method) in enumerate(zip(axes, rep.methods, strict=False)):
        grid = np.full((len(rep.models), len(rep.tasks)), np.nan)
        for c in rep.cells:
            if c.method == method and c.metric == "top1":
                grid[rep.models.index(c.model), rep.tasks.index(c.task)] = 100 * c.value
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (r, c), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(
                    c,
                    r,
                    f"{v:.1f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v < 60 else "black",
                )
        ax.set_xticks(
            range(len(rep.tasks)),
            [short(t) for t in rep.tasks],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_yticks(range(len(rep.models)), rep.models if i == 0 else [], fontsize=8)
        ax.set_title(method, fontsize=10)
    fig.colorbar(im, ax=list(axes), label="test top-1 (%)", shrink=0.8)
    return _save(fig, path)


def plot_ranking(rep: Report, path: str | os.PathLike[str]) -> str:
    """Mean z-score across tasks per model (BoB's aggregate), a panel per method."""
    methods = list(rep.ranking)
    fig = Figure(figsize=(4.0 * len(methods), 2.4 + 0.4 * len(rep.models)), layout="constrained")
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods, strict=True):
        ranked = rep.ranking[method][::-1]  # best on top
        zs = [z for _, z, _ in ranked]
        ax.barh(range(len(ranked)), zs, color=["C2" if z >= 0 else "C3" for z in zs])
        ax.set_yticks(range(len(ranked)), [m for m, _, _ in ranked], fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("mean z-score across tasks", fontsize=8)
        ax.set_title(method, fontsize=10)
    fig.suptitle("Ranking (kNN/linear probes favour CNNs, underrate MAE: see report)", fontsize=9)
    return _save(fig, path)


def plot_cost(rep: Report, path: str | os.PathLike[str]) -> str | None:
    """Test top-1 against GMACs per image (log scale), a panel per task, a marker per method;
    the Pareto front (no entry cheaper and better) joined per method. None: no cost known."""
    from probekit.report.compute import cost_points, pareto_front

    tasks = [t for t in rep.tasks if any(cost_points(rep, t, m) for m in rep.methods)]
    if not tasks:
        return None
    fig = Figure(figsize=(4.2 * len(tasks), 3.6), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        for i, method in enumerate(rep.methods):
            pts = cost_points(rep, task, method)
            if not pts:
                continue
            xs, ys = [g for _, g, _ in pts], [100 * a for _, _, a in pts]
            ax.scatter(xs, ys, s=22, color=f"C{i}", label=method)
            front = pareto_front([(g, a) for _, g, a in pts])
            ax.plot([xs[j] for j in front], [ys[j] for j in front], color=f"C{i}", lw=1.0)
            for name, x, y in zip([n for n, _, _ in pts], xs, ys, strict=True):
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        costs = [g for m in rep.methods for _, g, _ in cost_points(rep, task, m)]
        if max(costs) > 10 * min(costs):  # orders of magnitude apart: a log axis
            ax.set_xscale("log")
        ax.set_xlabel("GMACs per image (evaluated input)", fontsize=8)
        ax.set_ylabel("test top-1 (%)", fontsize=8)
        ax.set_title(short(task), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Test top-1 vs cost (lines: each method's Pareto front)", fontsize=9)
    return _save(fig, path)


def plot_resolution(rep: Report, path: str | os.PathLike[str]) -> str | None:
    """A resolution sweep: test top-1 against the input size per model, a panel per task and
    method (None when no model was run at two sizes)."""
    from probekit.report.compute import resolution_curves

    panels = [
        (t, m, resolution_curves(rep, t, m))
        for t in rep.tasks
        for m in rep.methods
        if resolution_curves(rep, t, m)
    ]
    if not panels:
        return None
    fig = Figure(figsize=(3.8 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (task, method, curves) in zip(axes, panels, strict=True):
        for i, (model, pts) in enumerate(curves.items()):
            ax.plot(
                [s for s, _ in pts], [100 * a for _, a in pts], "o-", color=f"C{i}", label=model
            )
            for size, acc in pts:
                gmacs = (rep.costs.get(f"{model} @{size}px") or {}).get("gmacs")
                if gmacs:
                    ax.annotate(
                        f"{gmacs:.1f}G",
                        (size, 100 * acc),
                        fontsize=6,
                        xytext=(2, 3),
                        textcoords="offset points",
                    )
        ax.set_xlabel("input size (px)", fontsize=8)
        ax.set_ylabel("test top-1 (%)", fontsize=8)
        ax.set_title(f"{short(task)}: {method_title(method)}", fontsize=9)
        ax.legend(fontsize=7)

    fig.suptitle("Accuracy vs resolution (labels: GMACs per image)", fontsize=9)
    return _save(fig, path)


def plot_methods(rep: Report, path: str | os.PathLike[str]) -> str | None:
    """Method against method per backbone: a panel per task, the methods along x and a line
    per backbone through its test top-1 by each (lines that cross: the methods rank the
    backbones differently). None where no task has two methods."""
    tasks = [t for t in rep.tasks if len({c.method for c in rep.cells if c.task == t}) >= 2]
    if not tasks:
        return None
    fig = Figure(figsize=(3.2 + 1.0 * len(rep.methods), 3.4 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 1, squeeze=False)[:, 0]
    colors = {m: f"C{i % 10}" for i, m in enumerate(rep.models)}
    for ax, task in zip(axes, tasks, strict=True):
        for model in rep.models:
            pts = [
                (i, 100 * c.value)
                for i, m in enumerate(rep.methods)
                if (c := rep.cell(task, m, model)) is not None
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", ms=4, color=colors[model], label=model)
        ax.set_xticks(range(len(rep.methods)), rep.methods, fontsize=8)
        ax.set_ylabel("test top-1 (%)", fontsize=8)
        ax.set_title(short(task), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    return _finish(
        fig, axes[0], "Each backbone by each method (crossing lines: rankings disagree)", path
    )


def plot_reliability(rep: Report, path: str | os.PathLike[str]) -> str | None:
    """Reliability diagrams of the probes on test: accuracy against confidence per bin, a
    panel per (task, method), a line per model (solid before temperature scaling, dashed
    after). None where no record has calibration bins."""
    got: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rep.records:
        if r.kind == "probe" and r.metric in ("ece", "ece_ts") and "bins" in r.extra:
            got.setdefault((r.task, r.method), {}).setdefault(r.model, {})[r.metric] = r.extra
    if not got:
        return None
    panels = sorted(got, key=lambda k: (rep.tasks.index(k[0]) if k[0] in rep.tasks else 99, k[1]))
    nc = min(3, len(panels))
    nr = -(-len(panels) // nc)
    fig = Figure(figsize=(3.6 * nc, 3.4 * nr + 0.6), layout="constrained")
    axes = fig.subplots(nr, nc, squeeze=False).ravel()
    colors = {m: f"C{i % 10}" for i, m in enumerate(rep.models)}
    for ax, (task, method) in zip(axes, panels, strict=False):
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8)
        for model, by in got[(task, method)].items():
            for metric, style in (("ece", "-"), ("ece_ts", "--")):
                bins = by.get(metric, {}).get("bins")
                if not bins:
                    continue
                pts = [
                    (c, a)
                    for c, a, n in zip(
                        bins["confidence"], bins["accuracy"], bins["count"], strict=True
                    )
                    if n and c is not None
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    label = model if metric == "ece" else None
                    ax.plot(xs, ys, style, marker="o", ms=3, color=colors.get(model), label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{short(task)}: {method}", fontsize=9)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _finish(fig, axes[0], "Reliability on test (dashed: after temperature scaling)", path)


def plot_similarity(rep: Report, path: str | os.PathLike[str]) -> str | None:
    """CKA between the backbones, a heatmap per task (None where nothing was compared)."""
    pairs: dict[str, dict[tuple[str, str], float]] = {}
    for r in rep.records:
        if r.kind == "compare" and r.metric == "cka":
            b = str(r.extra.get("model_b"))
            pairs.setdefault(r.dataset, {})[(r.model, b)] = r.value
    if not pairs:
        return None
    tasks = list(pairs)
    fig = Figure(
        figsize=(3.2 + 0.6 * len(rep.models), 3.0 + 0.5 * len(rep.models)), layout="constrained"
    )
    fig.set_figwidth(fig.get_figwidth() * len(tasks))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        names = [m for m in rep.models if any(m in k for k in pairs[task])]
        grid = np.eye(len(names))
        for (a, b), v in pairs[task].items():
            if a in names and b in names:
                grid[names.index(a), names.index(b)] = grid[names.index(b), names.index(a)] = v
        im = ax.imshow(grid, cmap="magma", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(grid):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if v < 0.6 else "black",
            )
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(f"{short(task)}: CKA", fontsize=9)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    return _save(fig, path)


def plot_fewshot(rep: Report, path: str | os.PathLike[str]) -> str | None:
    """Test top-1 against shots per class, a panel per task, a colour per backbone and a line
    style per method, with each point's interval across episodes. None without few-shot."""
    recs = [r for r in rep.records if r.kind == "fewshot" and r.metric == "top1"]
    if not recs:
        return None
    tasks = list(dict.fromkeys(r.task for r in recs))
    fig = Figure(figsize=(4.6 * len(tasks), 3.8), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    colors = {m: f"C{i % 10}" for i, m in enumerate(rep.models)}
    styles = {"knn": ":", "linear": "--", "logreg": "-"}
    for ax, task in zip(axes, tasks, strict=True):
        lines: dict[tuple[str, str], list[Any]] = {}
        for r in recs:
            if r.task == task:
                lines.setdefault((r.model, r.method), []).append(r)
        for (model, method), rs in lines.items():
            rs.sort(key=lambda r: int(r.hyper["shots"]))
            xs = [int(r.hyper["shots"]) for r in rs]
            ys = [100 * r.value for r in rs]
            lo = [100 * (r.value - r.extra["ci95"][0]) for r in rs]
            hi = [100 * (r.extra["ci95"][1] - r.value) for r in rs]
            ax.errorbar(
                xs,
                ys,
                yerr=[lo, hi],
                ls=styles.get(method, "-"),
                marker="o",
                ms=3,
                capsize=2,
                color=colors.get(model),
                label=f"{model} {method}",
            )
        ax.set_xscale("log")
        shots = sorted({int(r.hyper["shots"]) for r in recs if r.task == task})
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.set_xlabel("train images per class", fontsize=8)
        ax.set_ylabel("test top-1 (%)", fontsize=8)
        ax.set_title(short(task), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    return _finish(fig, axes[0], "Few-shot (mean over episodes, 95% interval)", path, 7)
