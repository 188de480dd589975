"""Reports written: Markdown, CSV, JSON Lines and the plots, from a computed `Report`."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from probekit.records import Record
from probekit.report.agreement import AGREEMENT_NOTE
from probekit.report.compute import (
    BEST_NOTE,
    BOB_CAVEAT,
    DELTA_COLUMNS,
    DELTA_NOTE,
    DENSE_METRICS,
    DENSE_NOTE,
    Report,
    build_report,
    delta_method,
    delta_texts,
)
from probekit.report.trust import sections

__all__ = [
    "COST_HEADER",
    "COST_NOTE",
    "CSV_FIELDS",
    "cost_rows",
    "leaderboard_rows",
    "render_markdown",
    "write_report",
]


# --------------------------------------------------------------------------- writing


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def leaderboard_rows(
    rep: Report, task: str, star: str = "*", metric: str = "top1"
) -> list[list[str]]:
    """Rows of one task's leaderboard of `metric`: model, then value [CI] (feature) per method;
    `star` marks the entries of `rep.best`."""
    rows = []
    for model in rep.models:
        note = rep.size_note(model)
        row = [f"{model} ({note})" if "pretrained" in note else model]
        for m in rep.methods_of(task, metric):
            c = rep.cell(task, m, model, metric)
            mark = star if (task, m, model, metric) in rep.best else ""
            text = "-" if c is None else f"{_pct(c.value)}{mark} {c.ci_text()} {c.feature}"
            row.append(text.strip())
        if any(v != "-" for v in row[1:]):
            rows.append(row)
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(rep: Report, plots: Sequence[str] = ()) -> str:
    md = ["# probekit triage report", ""]
    md.append(
        "Top-1 accuracy (%) on each task's test split with a 95% bootstrap interval and the "
        "feature (layer/pool) used. Every choice (feature, k, learning rate, weight decay, "
        "epoch, C) was made without the test split: probes on validation data, kNN on "
        "leave-one-out kNN over the train split (or a val split). `a->b`: trained on a, "
        "tested on b." + (" " + BEST_NOTE.replace("*", "\\*") if rep.best else "")
    )
    if any(c.metric in DENSE_METRICS for c in rep.cells):
        md += ["", DENSE_NOTE]
    for metric, task in ((m, t) for m in rep.metrics for t in rep.tasks if rep.shows(t, m)):
        md += ["", f"## {task}" if metric == "top1" else f"## {task}: {metric}", ""]
        said = rep.warnings.get(task, []) if metric == "top1" else []  # of image labels
        md += [f"> warning: {w}" for w in said]
        md += [""] if said else []
        columns = rep.methods_of(task, metric)
        md.append(_md_table(["model", *columns], leaderboard_rows(rep, task, "\\*", metric)))
        md += ["", "Chosen configuration (best layer and winning hyperparameters):", ""]
        rows = []
        for model in rep.models:
            for m in columns:
                c = rep.cell(task, m, model, metric)
                if c is not None:
                    rows.append([model, m, c.feature, c.hyper_text(), c.selected_on, str(c.n)])
        md.append(
            _md_table(["model", "method", "feature", "hyperparameters", "chosen on", "n"], rows)
        )
    if rep.ranking:
        md += ["", "## Ranking across tasks (mean z-score)", ""]
        rows = []
        for m, ranked in rep.ranking.items():
            rows += [
                [m, str(i + 1), mod, f"{z:+.2f}", str(n)] for i, (mod, z, n) in enumerate(ranked)
            ]
        md.append(_md_table(["method", "rank", "model", "mean z", "tasks"], rows))
        md += ["", f"> {BOB_CAVEAT}"]
    if rep.agreements or rep.flags:
        md += ["", "## How far the proxies agree", ""]
        if rep.agreements:
            md += [AGREEMENT_NOTE, ""]
            md.append(_md_table(AGREEMENT_HEADER, agreement_rows(rep)))
        if rep.flags:
            md += [""] + [f"- {f.text()}" for f in rep.flags]
        md += ["", f"> {BOB_CAVEAT}"]
    md += _trust_sections(rep)
    if rep.reference:
        md += ["", f"## Difference to {rep.reference}", ""]
        md += [DELTA_NOTE, ""]
        rows = [[d["task"], delta_method(d), d["model"], *delta_texts(d)] for d in rep.deltas]
        md.append(_md_table(["task", "method", "model", *DELTA_COLUMNS], rows))
    if rep.costs and cost_rows(rep):
        md += ["", "## Cost and resolution", "", COST_NOTE, ""]
        md.append(_md_table(COST_HEADER, cost_rows(rep)))
    if rep.timing:
        md += ["", "## Time per backbone", ""]
        rows = []
        for model, t in rep.timing.items():
            rate = t["images"] / t["extract_s"] if t["extract_s"] > 0 else float("nan")
            rows.append(
                [
                    model,
                    f"{t['images']:.0f}",
                    f"{t['extract_s']:.1f}",
                    "-" if math.isnan(rate) else f"{rate:.1f}",
                    f"{t['eval_s']:.1f}",
                ]
            )
        md.append(
            _md_table(
                ["model", "images", "extract (s)", "extract images/s", "kNN + probes (s)"], rows
            )
        )
    if rep.errors:
        md += ["", "## Failures", ""]
        md += [
            f"- {e.model} on {e.dataset} ({e.extra.get('stage')}): {e.extra.get('message')}"
            for e in rep.errors
        ]
    if plots:
        md += ["", "## Plots", ""]
        md += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(md) + "\n"


def _trust_sections(rep: Report) -> list[str]:
    """Few-shot, calibration, label-free structure, similarity and side by side."""
    md: list[str] = []
    for sec in sections(rep):
        md += ["", f"## {sec.title}", "", sec.note]
        for task, header, rows in sec.tables:
            md += ["", f"{task}:", "", _md_table(header, rows)]
    return md


AGREEMENT_HEADER = ["task", "methods", "backbones", "Spearman [95% CI]", "Kendall [95% CI]"]


def _corr(v: float, ci: tuple[float, float] | None) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def agreement_rows(rep: Report) -> list[list[str]]:
    """Per task and pair of methods: how many backbones, Spearman and Kendall with intervals."""
    return [
        [
            a.task,
            f"{a.method_a} vs {a.method_b}",
            str(len(a.models)),
            _corr(a.spearman, a.spearman_ci95),
            _corr(a.kendall, a.kendall_ci95),
        ]
        for a in rep.agreements
    ]


CSV_FIELDS = [
    "task",
    "method",
    "model",
    "metric",
    "value",
    "ci95_low",
    "ci95_high",
    "feature",
    "hyperparameters",
    "selected_on",
    "n",
    "mean_z",
    "img_size",
    "params_m",
    "gmacs",
    "images_per_s",
    "shots",
    "episodes",
]


def _num(v: Any, digits: int) -> str:
    return "" if v is None else f"{float(v):.{digits}f}"


def _cost_cells(cost: Mapping[str, Any]) -> list[str]:
    return [
        str(cost.get("img_size") or ""),
        _num(cost.get("params_m"), 3),
        _num(cost.get("gmacs"), 3),
        _num(cost.get("images_per_s"), 1),
    ]


def cost_rows(rep: Report) -> list[list[str]]:
    """Per model: input (and pretrained size where it differs), params (M), GMACs per image,
    extraction images/s per dataset."""
    rows = []
    for model in rep.models:
        c = rep.costs.get(model)
        if not c:
            continue
        rates = ", ".join(f"{d} {v:.0f}" for d, v in c.get("images_per_s", {}).items())
        rows.append(
            [
                model,
                rep.size_note(model) or "-",
                _num(c.get("params_m"), 1) or "-",
                "-" if c.get("gmacs") is None else f"{float(c['gmacs']):.3g}",
                rates or "-",
            ]
        )
    return rows


COST_HEADER = ["model", "input", "params (M)", "GMACs/image", "extract images/s"]
COST_NOTE = (
    "GMACs: multiply-adds of one image's forward at the evaluated input, counted on the model "
    "(torch's FlopCounterMode, attention included). images/s: the extraction loop on the machine "
    "that made the store. An input marked 'pretrained N px' is evaluated at another size than "
    "its weights were trained at: its numbers are not the paper's."
)


def write_report(
    records: Iterable[Record | Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    reference: str | None = None,
    plots: bool = True,
) -> tuple[Report, dict[str, str]]:
    """Write report.md, results.csv, results.jsonl and the PNG plots; return what was written."""
    rep = build_report(records, reference)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    jsonl = out / "results.jsonl"
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    with tmp.open("w") as f:
        for r in rep.records:
            f.write(json.dumps(r.to_dict()) + "\n")
    tmp.replace(jsonl)
    files["results.jsonl"] = str(jsonl)

    z = {(m, mod): s for m, ranked in rep.ranking.items() for mod, s, _ in ranked}
    path = out / "results.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for c in rep.cells:
            lo, hi = c.ci95 if c.ci95 else ("", "")
            w.writerow(
                [
                    c.task,
                    c.method,
                    c.model,
                    c.metric,
                    f"{c.value:.6f}",
                    lo,
                    hi,
                    c.feature,
                    c.hyper_text(),
                    c.selected_on,
                    c.n,
                    "" if (c.method, c.model) not in z else f"{z[(c.method, c.model)]:.4f}",
                    *_cost_cells(rep.cost_of(c.model, c.task)),
                    "",
                    "",
                ]
            )
        for r in rep.records:  # few-shot: a row per method and shots, the mean over episodes
            if r.kind != "fewshot" or r.metric != "top1":
                continue
            lo, hi = r.extra.get("ci95") or ("", "")
            w.writerow(
                [
                    r.task,
                    r.method,
                    r.model,
                    "top1",
                    f"{r.value:.6f}",
                    lo,
                    hi,
                    r.feature,
                    "",
                    "validation",
                    r.n,
                    "",
                    *_cost_cells(rep.cost_of(r.model, r.task)),
                    r.hyper.get("shots"),
                    r.hyper.get("episodes"),
                ]
            )
    files["results.csv"] = str(path)

    pngs: list[str] = []
    if plots and rep.cells:
        from probekit.plots import (
            plot_cost,
            plot_fewshot,
            plot_heatmap,
            plot_layers,
            plot_methods,
            plot_ranking,
            plot_reliability,
            plot_resolution,
            plot_similarity,
        )

        pngs.append(plot_layers(rep, out / "layers.png"))
        pngs.append(plot_heatmap(rep, out / "heatmap.png"))
        if rep.ranking:
            pngs.append(plot_ranking(rep, out / "ranking.png"))
        for drawn in (
            plot_methods(rep, out / "methods.png"),
            plot_fewshot(rep, out / "fewshot.png"),
            plot_reliability(rep, out / "reliability.png"),
            plot_similarity(rep, out / "similarity.png"),
            plot_cost(rep, out / "cost.png"),
            plot_resolution(rep, out / "resolution.png"),
        ):
            if drawn is not None:
                pngs.append(drawn)
        files.update({Path(p).name: p for p in pngs})
    path = out / "report.md"
    path.write_text(render_markdown(rep, pngs))
    files["report.md"] = str(path)
    return rep, files
