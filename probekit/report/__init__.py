"""Reports from result records: leaderboards, layer curves, z-score ranking, reference deltas.

    compute.py  records -> `Report` (what every table and plot shows; never draws)
    render.py   `Report` -> report.md, results.csv, results.jsonl and the plots

Selection follows the probes' rule, never the test split: a probe record is already the one
chosen on validation; for kNN the feature, k and vote are chosen on the selection records
(leave-one-out kNN on the train split, or a `val` split) and only then read on test.
"""

from __future__ import annotations

from probekit.methods import METHODS
from probekit.report.compute import (
    BEST_NOTE,
    BOB_CAVEAT,
    DELTA_COLUMNS,
    DELTA_NOTE,
    Cell,
    Report,
    build_report,
    delta_method,
    delta_texts,
    load_records,
)
from probekit.report.render import CSV_FIELDS, leaderboard_rows, render_markdown, write_report
from probekit.specs import model_label

__all__ = [
    "BEST_NOTE",
    "BOB_CAVEAT",
    "CSV_FIELDS",
    "DELTA_COLUMNS",
    "DELTA_NOTE",
    "METHODS",
    "Cell",
    "Report",
    "build_report",
    "delta_method",
    "delta_texts",
    "leaderboard_rows",
    "load_records",
    "model_label",
    "render_markdown",
    "write_report",
]
