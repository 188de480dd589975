"""Probes on cached features, in three stages: the data (fit and validation parts, feature
statistics), each method's selection on validation (`probekit.methods` names them: linear
heads, logistic regression), and one evaluation on test (and transfer targets) for all.

Every hyperparameter (feature, lr, wd, epoch, C) is chosen on a validation holdout carved from
the train split (or a real `val` split); the chosen probe is evaluated once on the test split.

    run.py      `probe`: the data, every method's selection, one evaluation on test
    rows.py     Rows (standardized features, held or streamed), statistics, the holdout
    base.py     ProbeOptions, ProbeData, Selection        options.py  a method's own options
    grid.py     the grid trainer (every head trained over cached rows, best epoch and head)
    linear.py, logreg.py, attentive.py, mlp.py: the methods (`probekit.methods` names them)

Names load on first use: the CLI reads the methods' options without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probekit._lazy import lazy_names

if TYPE_CHECKING:
    from probekit.defaults import DEFAULT_CS, DEFAULT_LRS, DEFAULT_WDS
    from probekit.metrics import bootstrap_ci
    from probekit.probes.base import Feature, ProbeData, ProbeOptions, Selection
    from probekit.probes.linear import LinearHeads, train_linear_heads
    from probekit.probes.logreg import fit_logreg, logreg_objective
    from probekit.probes.rows import Rows, feature_stats, holdout_split, memory_budget
    from probekit.probes.run import ProbeRecord, ProbeResult, probe

__all__ = [
    "DEFAULT_CS",
    "DEFAULT_LRS",
    "DEFAULT_WDS",
    "Feature",
    "LinearHeads",
    "ProbeData",
    "ProbeOptions",
    "ProbeRecord",
    "ProbeResult",
    "Rows",
    "Selection",
    "bootstrap_ci",
    "feature_stats",
    "fit_logreg",
    "holdout_split",
    "logreg_objective",
    "memory_budget",
    "probe",
    "train_linear_heads",
]

__getattr__ = lazy_names(
    globals(),
    {
        "DEFAULT_CS": "probekit.defaults",
        "DEFAULT_LRS": "probekit.defaults",
        "DEFAULT_WDS": "probekit.defaults",
        "Feature": "probekit.probes.base",
        "LinearHeads": "probekit.probes.linear",
        "ProbeData": "probekit.probes.base",
        "ProbeOptions": "probekit.probes.base",
        "ProbeRecord": "probekit.probes.run",
        "ProbeResult": "probekit.probes.run",
        "Rows": "probekit.probes.rows",
        "Selection": "probekit.probes.base",
        "bootstrap_ci": "probekit.metrics",
        "feature_stats": "probekit.probes.rows",
        "fit_logreg": "probekit.probes.logreg",
        "holdout_split": "probekit.probes.rows",
        "logreg_objective": "probekit.probes.logreg",
        "memory_budget": "probekit.probes.rows",
        "probe": "probekit.probes.run",
        "train_linear_heads": "probekit.probes.linear",
    },
)
