"""One report document: every section a report shows (leaderboards, chosen configurations,
ranking, agreement, trust, deltas, cost, timing, failures) computed once from a `Report`, and
the writers that walk it: Markdown (report.md) and the terminal (rich tables). The data files
come from the same `Report`: CSV (results.csv, one row per leaderboard entry and few-shot
mean) and JSON Lines (every record).

A new section is one function here and one line in `document`; no writer changes.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from probekit.report.agreement import AGREEMENT_NOTE
from probekit.report.compute import (
    BEST_NOTE,
    BOB_CAVEAT,
    BOX_DELTA_NOTE,
    BOX_METRICS,
    BOX_NOTE,
    DELTA_COLUMNS,
    DELTA_NOTE,
    DENSE_METRICS,
    DENSE_NOTE,
    Report,
    delta_method,
    delta_texts,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["CSV_FIELDS", "Document", "Section", "Table", "document", "write_csv", "write_jsonl"]

Where = Literal["markdown", "terminal"]
BOTH: frozenset[Where] = frozenset(("markdown", "terminal"))


@dataclass(frozen=True)
class Table:
    """A table of text cells; `title`: what it is of (a task), where a section has several."""

    header: list[str]
    rows: list[list[str]]
    title: str = ""


@dataclass(frozen=True)
class Section:
    """A heading, its note, its tables and its lines (warnings, flags, failures); `where`:
    the writers that show it."""

    kind: str
    title: str
    note: str = ""
    tables: tuple[Table, ...] = ()
    lines: tuple[str, ...] = ()
    caveat: str = ""  # said last (BoB's caveat on rankings)
    where: frozenset[Where] = BOTH


@dataclass(frozen=True)
class Document:
    """What a report says: its sections, in order, and the report they were computed from."""

    intro: str
    sections: list[Section]
    report: Report = field(repr=False)


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


def _leaderboards(rep: Report) -> list[Section]:
    """A leaderboard per task and metric, then the configuration each entry chose."""
    out = []
    for metric, task in ((m, t) for m in rep.metrics for t in rep.tasks if rep.shows(t, m)):
        name = "top-1" if metric == "top1" else metric
        columns = rep.methods_of(task, metric)
        said = rep.warnings.get(task, []) if metric == "top1" else []  # of image labels
        board = Table(["model", *columns], leaderboard_rows(rep, task, "*", metric))
        title = task if metric == "top1" else f"{task}: {metric}"
        note = f"test {name} (%), chosen without the test split"
        out.append(Section("leaderboard", title, note, (board,), tuple(said)))
        rows = [
            [model, m, c.feature, c.hyper_text(), c.selected_on, str(c.n)]
            for model in rep.models
            for m in columns
            if (c := rep.cell(task, m, model, metric)) is not None
        ]
        header = ["model", "method", "feature", "hyperparameters", "chosen on", "n"]
        chosen = "Chosen configuration (best layer and winning hyperparameters):"
        out.append(
            Section("chosen", "", chosen, (Table(header, rows),), where=frozenset({"markdown"}))
        )
    return out


def _ranking(rep: Report) -> list[Section]:
    if not rep.ranking:
        return []
    rows = [
        [m, str(i + 1), mod, f"{z:+.2f}", str(n)]
        for m, ranked in rep.ranking.items()
        for i, (mod, z, n) in enumerate(ranked)
    ]
    header = ["method", "rank", "model", "mean z", "tasks"]
    title = "Ranking across tasks (mean z-score)"
    return [Section("ranking", title, tables=(Table(header, rows),), caveat=BOB_CAVEAT)]


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


def _agreement(rep: Report) -> list[Section]:
    if not (rep.agreements or rep.flags):
        return []
    tables = (Table(AGREEMENT_HEADER, agreement_rows(rep)),) if rep.agreements else ()
    note = AGREEMENT_NOTE if rep.agreements else ""
    flags = tuple(f.text() for f in rep.flags)
    title = "How far the proxies agree"
    return [Section("agreement", title, note, tables, flags, caveat=BOB_CAVEAT)]


def _trust(rep: Report) -> list[Section]:
    from probekit.report.trust import sections

    return [
        Section("trust", s.title, s.note, tuple(Table(h, rows, t) for t, h, rows in s.tables))
        for s in sections(rep)
    ]


def _deltas(rep: Report) -> list[Section]:
    if not rep.reference or not rep.deltas:
        return []
    rows = [[d["task"], delta_method(d), d["model"], *delta_texts(d)] for d in rep.deltas]
    header = ["task", "method", "model", *DELTA_COLUMNS]
    title = f"Difference to {rep.reference}"
    note = DELTA_NOTE
    if any(d.get("metric") in BOX_METRICS for d in rep.deltas):
        note += " " + BOX_DELTA_NOTE
    return [Section("deltas", title, note, (Table(header, rows),))]


def _num(v: Any, digits: int) -> str:
    return "" if v is None else f"{float(v):.{digits}f}"


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


def _cost(rep: Report) -> list[Section]:
    rows = cost_rows(rep)
    if not rep.costs or not rows:
        return []
    return [Section("cost", "Cost and resolution", COST_NOTE, (Table(COST_HEADER, rows),))]


def _timing(rep: Report) -> list[Section]:
    if not rep.timing:
        return []
    rows = []
    for model, t in rep.timing.items():
        rate = t["images"] / t["extract_s"] if t["extract_s"] > 0 else float("nan")
        rate_text = "-" if math.isnan(rate) else f"{rate:.1f}"
        rows.append(
            [model, f"{t['images']:.0f}", f"{t['extract_s']:.1f}", rate_text, f"{t['eval_s']:.1f}"]
        )
    header = ["model", "images", "extract (s)", "extract images/s", "kNN + probes (s)"]
    return [Section("timing", "Time per backbone", "", (Table(header, rows),))]


def _failures(rep: Report) -> list[Section]:
    lines = tuple(
        f"{e.model} on {e.dataset} ({e.extra.get('stage')}): {e.extra.get('message')}"
        for e in rep.errors
    )
    return [Section("failures", "Failures", lines=lines)] if lines else []


INTRO = (
    "Top-1 accuracy (%) on each task's test split with a 95% bootstrap interval and the "
    "feature (layer/pool) used. Every choice (feature, k, learning rate, weight decay, "
    "epoch, C) was made without the test split: probes on validation data, kNN on "
    "leave-one-out kNN over the train split (or a val split). `a->b`: trained on a, "
    "tested on b."
)


def document(rep: Report, plots: Iterable[str] = ()) -> Document:
    """Every section of the report of `rep`, in the order the writers show them."""
    intro = INTRO + (" " + BEST_NOTE if rep.best else "")
    if any(c.metric in DENSE_METRICS for c in rep.cells):
        intro += "\n\n" + DENSE_NOTE
    if any(c.metric in BOX_METRICS for c in rep.cells):
        intro += "\n\n" + BOX_NOTE
    sections: list[Section] = []
    for part in (_leaderboards, _ranking, _agreement, _trust, _deltas, _cost, _timing, _failures):
        sections += part(rep)
    pngs = tuple(f"![{Path(p).stem}]({Path(p).name})" for p in plots)
    if pngs:
        sections.append(Section("plots", "Plots", lines=pngs, where=frozenset({"markdown"})))
    return Document(intro, sections, rep)


# --------------------------------------------------------------------------- writers


def _md_escape(text: str) -> str:
    return text.replace("*", "\\*")


def _md_table(t: Table, escape: bool) -> str:
    cells = [[_md_escape(c) if escape else c for c in row] for row in t.rows]
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def to_markdown(doc: Document) -> str:
    """report.md: the title, the intro, every section a heading with its note, tables, lines
    and caveat (leaderboard marks escaped)."""
    rep = doc.report
    intro = doc.intro.replace(BEST_NOTE, _md_escape(BEST_NOTE)) if rep.best else doc.intro
    md = ["# probekit triage report", "", intro]
    for s in (s for s in doc.sections if "markdown" in s.where):
        md += ["", f"## {s.title}"] if s.title else []
        if s.kind == "leaderboard":  # its lines are warnings, said above the table
            md += [""] + [f"> warning: {w}" for w in s.lines] + ([""] if s.lines else [])
            md.append(_md_table(s.tables[0], escape=True))
            continue
        md += ["", s.note] if s.note else []
        for t in s.tables:
            md += ["", f"{t.title}:"] if t.title else []
            md += ["", _md_table(t, escape=False)]
        prefix = "" if s.kind == "plots" else "- "
        md += [""] + [prefix + line for line in s.lines] if s.lines else []
        md += ["", f"> {s.caveat}"] if s.caveat else []
    return "\n".join(md) + "\n"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def to_terminal(doc: Document, console: Console) -> None:
    """The terminal's report: every section's tables as rich tables, then its lines, note and
    caveat; BEST_NOTE after the leaderboards."""
    from rich.table import Table as RichTable

    shown = [s for s in doc.sections if "terminal" in s.where]
    boards = [s for s in shown if s.kind == "leaderboard"]
    for s in shown:
        for t in s.tables:
            if s.kind == "leaderboard":
                heading = f"{s.title}: {s.note}"
            else:
                heading = _lower_first(s.title) if not t.title else f"{t.title}: {s.title.lower()}"
            table = RichTable(*t.header, title=heading)
            for row in t.rows:
                table.add_row(*row)
            console.print(table)
        if s.kind == "leaderboard":
            for line in s.lines:
                console.print(f"warning ({s.title}): {line}")
            if s is boards[-1] and doc.report.best:
                console.print(BEST_NOTE)
            continue
        prefix = "FAILED " if s.kind == "failures" else "note: "
        for line in s.lines:
            console.print(prefix + line)
        for said in (s.note, s.caveat):
            if said:
                console.print(said)


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


def _cost_cells(cost: dict[str, Any]) -> list[Any]:
    return [
        str(cost.get("img_size") or ""),
        _num(cost.get("params_m"), 3),
        _num(cost.get("gmacs"), 3),
        _num(cost.get("images_per_s"), 1),
    ]


def result_rows(rep: Report) -> list[list[Any]]:
    """results.csv's rows: each leaderboard entry (with its mean z and cost), then a row per
    few-shot method and shots (the mean over episodes)."""
    z = {(m, mod): s for m, ranked in rep.ranking.items() for mod, s, _ in ranked}
    rows: list[list[Any]] = []
    for c in rep.cells:
        lo, hi = c.ci95 if c.ci95 else ("", "")
        mean_z = "" if (c.method, c.model) not in z else f"{z[(c.method, c.model)]:.4f}"
        cost = _cost_cells(rep.cost_of(c.model, c.task))
        entry = [c.task, c.method, c.model, c.metric, f"{c.value:.6f}", lo, hi, c.feature]
        rows.append([*entry, c.hyper_text(), c.selected_on, c.n, mean_z, *cost, "", ""])
    for r in rep.records:
        if r.kind != "fewshot" or r.metric != "top1":
            continue
        lo, hi = r.extra.get("ci95") or ("", "")
        cost = _cost_cells(rep.cost_of(r.model, r.task))
        entry = [r.task, r.method, r.model, "top1", f"{r.value:.6f}", lo, hi, r.feature, ""]
        rows.append([*entry, "validation", r.n, "", *cost, r.hyper.get("shots")])
        rows[-1].append(r.hyper.get("episodes"))
    return rows


def write_csv(rep: Report, path: Path) -> None:
    """results.csv: `CSV_FIELDS`, a row each of `result_rows`."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        w.writerows(result_rows(rep))


def write_jsonl(rep: Report, path: Path) -> None:
    """Every record, one JSON object a line, written whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in rep.records:
            f.write(json.dumps(r.to_dict()) + "\n")
    tmp.replace(path)
