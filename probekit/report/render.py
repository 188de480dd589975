"""Reports written: the report document (`document.py`) as report.md, results.csv and
results.jsonl, and the plots, from a computed `Report`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from probekit.records import Record
from probekit.report.compute import Cell, Report, build_report
from probekit.report.document import (
    COST_HEADER,
    COST_NOTE,
    CSV_FIELDS,
    cost_rows,
    document,
    leaderboard_rows,
    to_markdown,
    write_csv,
    write_jsonl,
)

__all__ = [
    "COST_HEADER",
    "COST_NOTE",
    "CSV_FIELDS",
    "cost_rows",
    "leaderboard_rows",
    "render_markdown",
    "write_report",
]


def render_markdown(rep: Report, plots: Sequence[str] = ()) -> str:
    """report.md of `rep` (its document's Markdown)."""
    return to_markdown(document(rep, plots))


def _plots(rep: Report, out: Path) -> list[str]:
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

    pngs = [plot_layers(rep, out / "layers.png"), plot_heatmap(rep, out / "heatmap.png")]
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
    return pngs


def write_report(
    records: Iterable[Record | Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    reference: str | None = None,
    plots: bool = True,
    cells: list[Cell] | None = None,
) -> tuple[Report, dict[str, str]]:
    """Write report.md, results.csv, results.jsonl and the PNG plots; return what was written.
    `cells`: the leaderboard's, computed from these records already."""
    rep = build_report(records, reference, cells=cells)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(rep, out / "results.jsonl")  # the records first: a plot that fails keeps them
    write_csv(rep, out / "results.csv")
    files = {"results.jsonl": str(out / "results.jsonl"), "results.csv": str(out / "results.csv")}
    pngs = _plots(rep, out) if plots and rep.cells else []
    files.update({Path(p).name: p for p in pngs})
    (out / "report.md").write_text(to_markdown(document(rep, pngs)))
    files["report.md"] = str(out / "report.md")
    return rep, files
