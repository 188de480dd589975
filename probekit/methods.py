"""The registry of evaluation methods: kNN and the probe methods, by name. The CLI, triage,
report and plots read it (it imports nothing heavy: each probe's code loads when it runs).

A probe method is a module with `select(data: ProbeData, options: ProbeOptions) -> Selection`
(fit on the fit part, choose on validation) and one entry here; evaluation on test is shared.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["METHODS", "PROBE_METHODS", "ProbeMethod", "all_methods", "method_title"]


@dataclass(frozen=True)
class ProbeMethod:
    """One probe method: its name, what it is (help texts), its plot title and its module."""

    name: str
    summary: str
    title: str  # the layer curve's panel title
    module: str  # holds `select(data, options) -> Selection`
    shown: tuple[str, ...] = ()  # the chosen hyperparameters a leaderboard entry shows

    def select(self) -> Callable[..., Any]:
        fn: Callable[..., Any] = importlib.import_module(self.module).select
        return fn


PROBE_METHODS: dict[str, ProbeMethod] = {
    m.name: m
    for m in (
        ProbeMethod(
            "linear",
            "batched linear heads (DINOv2's protocol: lr x wd grid, best epoch on validation)",
            "linear heads, val top-1",
            "probekit.probes.linear",
            ("lr", "wd", "epoch", "optimizer"),
        ),
        ProbeMethod(
            "logreg",
            "multinomial logistic regression (L-BFGS along a C path, refit on train + val)",
            "logistic regression, val top-1",
            "probekit.probes.logreg",
            ("C",),
        ),
    )
}
# the methods a triage runs by default, in the order of a report's columns
METHODS = ("knn", *PROBE_METHODS)


def all_methods() -> tuple[str, ...]:
    """Every method there is now (kNN, then the registry's probes, in its order)."""
    return ("knn", *PROBE_METHODS)


def method_title(method: str) -> str:
    """The layer curve's title of a method's panel."""
    if method == "knn":
        return "kNN test top-1"
    entry = PROBE_METHODS.get(method)
    return entry.title if entry is not None else method
