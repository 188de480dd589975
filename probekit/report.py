"""Reports from result records: leaderboards, layer curves, z-score ranking, reference deltas.

Everything here is computed from result records (JSON Lines: the `results.jsonl` of a triage, or
the `*.knn-*.jsonl` / `*.probe-*.jsonl` files written next to feature stores), so reports from
different runs and machines combine: `probekit report A/results.jsonl B/results.jsonl`.

Selection follows the probes' rule, never the test split: a probe record is already the one
chosen on validation; for kNN the feature, k and vote are chosen on the selection records
(leave-one-out kNN on the train split, or a `val` split) and only then read on test.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from probekit.errors import ProbekitError
from probekit.metrics import decode_outcomes, mcnemar_p, paired_bootstrap_ci

__all__ = [
    "BOB_CAVEAT",
    "METHODS",
    "Cell",
    "Report",
    "build_report",
    "leaderboard_rows",
    "load_records",
    "model_label",
    "render_markdown",
    "write_report",
]

METHODS = ("knn", "linear", "logreg")
BOB_CAVEAT = (
    "Caveat (Battle of the Backbones, Goldblum et al. 2023): kNN and linear probes favour CNNs "
    "over ViTs relative to full finetuning, and underrate MAE-style models; treat this ranking "
    "as a triage, not a finetuning result."
)
SELECTION_SPLITS = ("val", "train")  # kNN selection: a val split, else leave-one-out on train
DEFAULT_K = 20  # DINO's k, used when a record set has no selection records


def model_label(backbone: str, weights: str, weights_ref: str | None = None) -> str:
    """The name a backbone goes by in reports: `name`, `name@random`, `name@<weights file>`."""
    if weights == "random":
        return f"{backbone}@random"
    if weights == "file" and weights_ref:
        return f"{backbone}@{Path(weights_ref).name}"
    return backbone


def _kind(r: dict[str, Any]) -> str:
    if "kind" in r:
        return str(r["kind"])
    if "k" in r and "vote" in r:
        return "knn"
    if "method" in r:
        return "probe"
    return "unknown"


def _normalize(r: dict[str, Any]) -> dict[str, Any]:
    r = dict(r)
    r["kind"] = _kind(r)
    if r["kind"] in ("knn", "probe"):
        r.setdefault("model", model_label(r["backbone"], r["weights"]))
        if not r.get("train_dataset"):
            r["train_dataset"] = r["dataset"]
        if r["kind"] == "knn":
            r["method"] = "knn"
    return r


_MEASUREMENT = {  # the fields that say what was measured, per kind of record
    "extract": ("dataset", "stage"),
    "error": ("dataset", "stage"),
    "time": ("dataset", "stage"),
    # a probe's test numbers belong to the probe chosen on validation: its layer is a result,
    # not part of what was measured, so a rerun replaces them whatever it chose
    "probe": ("train_dataset", "dataset", "split", "method", "metric"),
}
_FULL = (
    "train_dataset",
    "dataset",
    "split",
    "layer",
    "pool",
    "method",
    "k",
    "vote",
    "temperature",
    "metric",
)


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    """Records with the same key are the same measurement: a later one replaces an earlier."""
    fields = _MEASUREMENT.get(r["kind"], _FULL)
    if r["kind"] == "probe" and r.get("metric") == "val_top1":
        fields = _FULL  # one per feature: the layer-wise curve
    return (r["kind"], r.get("model"), *(r.get(f) for f in fields))


def load_records(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read result records from JSON Lines files, or directories of them (results.jsonl first).

    A record measured again in a later file replaces the earlier one.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            inner = p / "results.jsonl"
            found = [inner] if inner.is_file() else sorted(p.glob("*.jsonl"))
            if not found:
                raise ProbekitError(f"{str(p)!r} holds no result records (*.jsonl).")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ProbekitError(f"no such results file or directory: {str(p)!r}.")
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProbekitError(f"{f}:{n} is not a JSON record ({e.msg}).") from None
            if not isinstance(raw, dict):
                raise ProbekitError(f"{f}:{n} is not a JSON object.")
            r = _normalize(raw)
            merged[_key(r)] = r
    return list(merged.values())


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class Cell:
    """One leaderboard entry: a model's test top-1 on a task by one method."""

    task: str  # dataset, or "source->target" for a transfer
    method: str
    model: str
    value: float
    ci95: tuple[float, float] | None
    feature: str
    hyper: dict[str, Any]
    n: int
    selected_on: str
    # which test rows were scored and right (`encode_outcomes`), for paired differences
    outcomes: dict[str, Any] | None = field(default=None, repr=False)

    def ci_text(self) -> str:
        if self.ci95 is None or any(math.isnan(v) for v in self.ci95):
            return ""
        return f"[{100 * self.ci95[0]:.1f}, {100 * self.ci95[1]:.1f}]"

    def hyper_text(self) -> str:
        return ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.hyper.items()
        )


@dataclass
class Report:
    """A leaderboard and everything the report shows, computed from records."""

    records: list[dict[str, Any]]
    cells: list[Cell]
    tasks: list[str]
    models: list[str]
    methods: list[str]
    ranking: dict[str, list[tuple[str, float, int]]]  # method -> (model, mean z, tasks)
    curves: dict[tuple[str, str, str], list[tuple[float, str, float]]]  # (task, method, model)
    timing: dict[str, dict[str, float]]
    errors: list[dict[str, Any]]
    reference: str | None = None
    deltas: list[dict[str, Any]] = field(default_factory=list)
    # (task, method, model) of each column's best entry and those not significantly different
    best: set[tuple[str, str, str]] = field(default_factory=set)

    def cell(self, task: str, method: str, model: str) -> Cell | None:
        for c in self.cells:
            if (c.task, c.method, c.model) == (task, method, model):
                return c
        return None


def _task(r: dict[str, Any]) -> str:
    src, dst = r["train_dataset"], r["dataset"]
    return dst if src == dst else f"{src}->{dst}"


def _cfg(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["layer"], r["pool"], r["k"], r["vote"])


def _first_seen(xs: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _knn_cells(recs: list[dict[str, Any]]) -> list[Cell]:
    """kNN: choose (feature, k, vote) on the selection split, then read that on test."""
    by_run: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in recs:
        if r["kind"] == "knn" and r["metric"] == "top1":
            by_run.setdefault((r["model"], _task(r)), []).append(r)
    cells = []
    for (model, task), rs in by_run.items():
        test = [r for r in rs if r["split"] not in SELECTION_SPLITS]
        if not test:
            continue
        sel = [r for r in rs if r["split"] in SELECTION_SPLITS]
        on = "test (given)"
        if any(r.get("extra", {}).get("selected_on") for r in test):  # a transfer record
            pick = test[0]
            on = str(pick["extra"]["selected_on"])
        elif sel:
            split = "val" if any(r["split"] == "val" for r in sel) else "train"
            sel = [r for r in sel if r["split"] == split]
            # best selection accuracy; ties go to the smaller k, then the later record
            best = max(sel, key=lambda r: (r["value"], -r["k"]))
            match = [r for r in test if _cfg(r) == _cfg(best)]
            if not match:
                continue
            pick = match[0]
            on = "val split" if split == "val" else "leave-one-out on train"
        else:  # no selection records: DINO's default k on the pooled head, nothing chosen
            default = [r for r in test if r["layer"] == "head" and r["k"] == DEFAULT_K]
            if not default:
                continue
            pick = default[0]
            on = f"none (head, k={DEFAULT_K})"
        ci = pick.get("extra", {}).get("ci95")
        cells.append(
            Cell(
                task,
                "knn",
                model,
                float(pick["value"]),
                (float(ci[0]), float(ci[1])) if ci else None,
                f"{pick['layer']}/{pick['pool']}",
                {"k": pick["k"], "vote": pick["vote"]},
                int(pick["n"]),
                on,
                pick.get("extra", {}).get("outcomes"),
            )
        )
    return cells


def _probe_cells(recs: list[dict[str, Any]]) -> list[Cell]:
    cells = []
    for r in recs:
        if r["kind"] != "probe" or r["metric"] != "top1":
            continue
        ci = r.get("extra", {}).get("ci95")
        hyper = {
            k: v
            for k, v in r.get("config", {}).items()
            if k in ("lr", "wd", "epoch", "C", "optimizer")
        }
        cells.append(
            Cell(
                _task(r),
                r["method"],
                r["model"],
                float(r["value"]),
                (float(ci[0]), float(ci[1])) if ci else None,
                f"{r['layer']}/{r['pool']}",
                hyper,
                int(r["n"]),
                "validation",
                r.get("extra", {}).get("outcomes"),
            )
        )
    return cells


def _depth(layer: str, num_layers: int) -> float:
    """Relative depth of a stored layer: block i of L at (i + 1) / L; the head just past 1."""
    if layer == "head":
        return 1.08
    i = int(layer.removeprefix("layer"))
    return (i + 1) / max(num_layers, 1)


def _curves(
    recs: list[dict[str, Any]], cells: list[Cell], num_layers: dict[str, int]
) -> dict[tuple[str, str, str], list[tuple[float, str, float]]]:
    """Accuracy by layer depth: kNN test top-1 at the chosen k/vote/pool, probes' val top-1."""
    curves: dict[tuple[str, str, str], list[tuple[float, str, float]]] = {}
    chosen = {(c.task, c.model): c for c in cells if c.method == "knn"}
    pts: dict[tuple[str, str, str], dict[str, tuple[float, float]]] = {}
    for r in recs:
        if r["kind"] == "knn" and r["metric"] == "top1" and r["split"] not in SELECTION_SPLITS:
            c = chosen.get((_task(r), r["model"]))
            if c is None or r["train_dataset"] != r["dataset"]:
                continue
            if (r["k"], r["vote"]) != (c.hyper["k"], c.hyper["vote"]):
                continue
            method, value = "knn", float(r["value"])
            prefer = r["pool"] == c.feature.split("/")[1]
        elif r["kind"] == "probe" and r["metric"] == "val_top1":
            method, value, prefer = r["method"], float(r["value"]), True
        else:
            continue
        if r["layer"] != "head" and not r["layer"].removeprefix("layer").isdigit():
            continue  # a concatenation of layers (last4/cls) has no one depth
        key = (_task(r), method, r["model"])
        slot = pts.setdefault(key, {})
        # one point per layer: the chosen pool where the layer has it, else the best pool
        rank = (1.0 if prefer else 0.0, value)
        if r["layer"] not in slot or rank > slot[r["layer"]]:
            slot[r["layer"]] = rank
    for key, layers in pts.items():
        nl = num_layers.get(key[2]) or 1 + max(
            (int(name.removeprefix("layer")) for name in layers if name != "head"), default=0
        )
        curves[key] = sorted((_depth(name, nl), name, v[1]) for name, v in layers.items())
    return curves


def _zscore_ranking(
    cells: list[Cell], methods: list[str], tasks: list[str], models: list[str]
) -> dict[str, list[tuple[str, float, int]]]:
    """BoB's aggregate: z-score each task's accuracies across models, average over tasks."""
    ranking: dict[str, list[tuple[str, float, int]]] = {}
    for m in methods:
        zs: dict[str, list[float]] = {mod: [] for mod in models}
        for t in tasks:
            vals = {c.model: c.value for c in cells if c.method == m and c.task == t}
            if len(vals) < 2:
                continue
            arr = np.array(list(vals.values()))
            sd = float(arr.std())
            for mod, v in vals.items():
                zs[mod].append((v - float(arr.mean())) / sd if sd > 0 else 0.0)
        rows = [(mod, float(np.mean(z)), len(z)) for mod, z in zs.items() if z]
        if rows:
            ranking[m] = sorted(rows, key=lambda x: -x[1])
    return ranking


def _deltas(cells: list[Cell], reference: str) -> list[dict[str, Any]]:
    out = []
    ref = {(c.task, c.method): c for c in cells if c.model == reference}
    for c in sorted(cells, key=lambda c: (c.task, METHODS.index(c.method))):
        r = ref.get((c.task, c.method))
        if c.model == reference or r is None:
            continue
        overlap = None
        if c.ci95 and r.ci95:
            overlap = c.ci95[0] <= r.ci95[1] and r.ci95[0] <= c.ci95[1]
        out.append(
            {
                "task": c.task,
                "method": c.method,
                "model": c.model,
                "value": c.value,
                "reference_value": r.value,
                "delta": c.value - r.value,
                "delta_ci95": _paired_ci(c.outcomes, r.outcomes),
                "mcnemar_p": _paired(c.outcomes, r.outcomes, mcnemar_p),
                "ci_overlap": overlap,
            }
        )
    return out


def _paired(
    a: dict[str, Any] | None,
    b: dict[str, Any] | None,
    stat: Callable[[np.ndarray, np.ndarray], Any],
) -> Any:
    """`stat` of two entries' hits over the test rows both scored; None unless both have
    outcomes of the same dataset's rows."""
    if not a or not b or a.get("fingerprint") is None:
        return None
    if (a["rows"], a["fingerprint"]) != (b["rows"], b["fingerprint"]):
        return None
    (scored_a, right_a), (scored_b, right_b) = decode_outcomes(a), decode_outcomes(b)
    both = scored_a & scored_b
    return stat(right_a[both], right_b[both]) if both.any() else None


def _paired_ci(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[float] | None:
    """95% paired bootstrap interval of a model's top-1 minus the reference's, image by image."""
    ci = _paired(a, b, paired_bootstrap_ci)
    return None if ci is None else list(ci)


def delta_texts(d: dict[str, Any]) -> list[str]:
    """A delta row's difference, paired interval and interval overlap, as the tables show them."""
    ci = d.get("delta_ci95")
    return [
        f"{100 * d['delta']:+.2f}",
        f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "-",
        "-" if d.get("mcnemar_p") is None else f"{d['mcnemar_p']:.2g}",
        {True: "yes", False: "no", None: "-"}[d["ci_overlap"]],
    ]


BEST_NOTE = (
    "*: the best of its column, and every entry not significantly different from it on the "
    "same test images (exact McNemar test, p >= 0.05)."
)
DELTA_COLUMNS = ["delta (points)", "paired 95% CI", "McNemar p", "CIs overlap"]
DELTA_NOTE = (
    "Test top-1 minus the reference's, in points. The paired interval resamples the test images "
    "of both models together; McNemar's exact test asks whether the images only one of them "
    "got right split as evenly as chance would (p < 0.05: unlikely to be noise). Two "
    "leaderboard intervals that overlap say much less."
)


def build_report(records: Iterable[dict[str, Any]], reference: str | None = None) -> Report:
    """Compute the leaderboard, curves, ranking, timings and reference deltas from records."""
    recs = [_normalize(r) for r in records]
    cells = _knn_cells(recs) + _probe_cells(recs)
    errors = [r for r in recs if r["kind"] == "error"]
    extracts = [r for r in recs if r["kind"] == "extract"]
    if not cells and not errors:
        raise ProbekitError(
            "no kNN or probe results among the records; run `probekit triage`, `probekit knn` "
            "or `probekit probe` first."
        )
    models = _first_seen(
        [r["model"] for r in extracts] + [c.model for c in cells] + [e["model"] for e in errors]
    )
    tasks = _first_seen(
        [c.task for c in cells if "->" not in c.task] + [c.task for c in cells if "->" in c.task]
    )
    methods = [m for m in METHODS if any(c.method == m for c in cells)]
    if reference is not None and reference not in models:
        raise ProbekitError(
            f"reference {reference!r} is not among the models: {', '.join(models)}."
        )
    num_layers = {r["model"]: int(r["num_layers"]) for r in extracts if r.get("num_layers")}
    timing: dict[str, dict[str, float]] = {}
    for r in recs:
        if r["kind"] in ("extract", "time"):
            t = timing.setdefault(r["model"], {"extract_s": 0.0, "images": 0.0, "eval_s": 0.0})
            if r["kind"] == "extract":
                t["extract_s"] += float(r.get("seconds") or 0.0)
                t["images"] += float(r.get("images") or 0)
            else:
                t["eval_s"] += float(r.get("seconds") or 0.0)
    return Report(
        recs,
        cells,
        tasks,
        models,
        methods,
        _zscore_ranking(cells, methods, tasks, models),
        _curves(recs, cells, num_layers),
        timing,
        errors,
        reference,
        _deltas(cells, reference) if reference else [],
        _best(cells),
    )


def _best(cells: list[Cell]) -> set[tuple[str, str, str]]:
    """Each leaderboard column's best entry, and every entry not significantly different from
    it on the same test images (exact McNemar test, p >= 0.05). Columns of one entry, or whose
    best has no per-image outcomes, mark nothing."""
    out: set[tuple[str, str, str]] = set()
    columns: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        columns.setdefault((c.task, c.method), []).append(c)
    for (task, method), column in columns.items():
        top = max(column, key=lambda c: c.value)
        if len(column) < 2 or top.outcomes is None:
            continue
        out.add((task, method, top.model))
        for c in column:
            p = _paired(c.outcomes, top.outcomes, mcnemar_p) if c is not top else None
            if p is not None and p >= 0.05:
                out.add((task, method, c.model))
    return out


# --------------------------------------------------------------------------- writing


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def leaderboard_rows(rep: Report, task: str, star: str = "*") -> list[list[str]]:
    """Rows of one task's leaderboard: model, then top-1 [CI] (feature) per method; `star`
    marks the entries of `rep.best`."""
    rows = []
    for model in rep.models:
        row = [model]
        for m in rep.methods:
            c = rep.cell(task, m, model)
            mark = star if (task, m, model) in rep.best else ""
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
    for task in rep.tasks:
        md += ["", f"## {task}", ""]
        md.append(_md_table(["model", *rep.methods], leaderboard_rows(rep, task, "\\*")))
        md += ["", "Chosen configuration (best layer and winning hyperparameters):", ""]
        rows = []
        for model in rep.models:
            for m in rep.methods:
                c = rep.cell(task, m, model)
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
    if rep.reference:
        md += ["", f"## Difference to {rep.reference}", ""]
        md += [DELTA_NOTE, ""]
        rows = [[d["task"], d["method"], d["model"], *delta_texts(d)] for d in rep.deltas]
        md.append(_md_table(["task", "method", "model", *DELTA_COLUMNS], rows))
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
            f"- {e['model']} on {e['dataset']} ({e.get('stage')}): {e['message']}"
            for e in rep.errors
        ]
    if plots:
        md += ["", "## Plots", ""]
        md += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(md) + "\n"


CSV_FIELDS = [
    "task",
    "method",
    "model",
    "top1",
    "ci95_low",
    "ci95_high",
    "feature",
    "hyperparameters",
    "selected_on",
    "n",
    "mean_z",
]


def write_report(
    records: Iterable[dict[str, Any]],
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
            f.write(json.dumps(r) + "\n")
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
                    f"{c.value:.6f}",
                    lo,
                    hi,
                    c.feature,
                    c.hyper_text(),
                    c.selected_on,
                    c.n,
                    "" if (c.method, c.model) not in z else f"{z[(c.method, c.model)]:.4f}",
                ]
            )
    files["results.csv"] = str(path)

    pngs: list[str] = []
    if plots and rep.cells:
        from probekit.plots import plot_heatmap, plot_layers, plot_ranking

        pngs.append(plot_layers(rep, out / "layers.png"))
        pngs.append(plot_heatmap(rep, out / "heatmap.png"))
        if rep.ranking:
            pngs.append(plot_ranking(rep, out / "ranking.png"))
        files.update({Path(p).name: p for p in pngs})
    path = out / "report.md"
    path.write_text(render_markdown(rep, pngs))
    files["report.md"] = str(path)
    return rep, files
