"""A probe method defined outside probekit, for the registry test: nearest class mean on
standardized features (a linear classifier: W = class means, b = -|mean|^2 / 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probekit.probes import ProbeData, Selection
from probekit.probes.options import MethodOptions
from probekit.probes.rows import linear_scores


@dataclass(frozen=True)
class Options(MethodOptions):
    """Nearest class mean has no options."""


def select(data: ProbeData, options: Options) -> Selection:
    best = None
    curve = []
    for name in data.names:
        fit, val = data.fit([name]), data.val([name])
        x = (
            next(iter(fit.blocks()))[0]
            if fit.resident
            else fit.take(torch.arange(fit.n).numpy())[0]
        )
        onehot = torch.nn.functional.one_hot(data.fit_y, data.n_classes).to(x.dtype)
        means = (onehot.T @ x) / onehot.sum(0).clamp(min=1)[:, None]  # (C, D)
        w, b = means, -0.5 * means.square().sum(1)
        acc, _ = linear_scores(val, data.val_y, w, b)
        curve.append((name, {}, acc))
        if best is None or acc > best[0]:
            best = (acc, name, w, b)
    assert best is not None
    acc, name, w, b = best
    config = {"feature": name, "val_top1": acc}
    return Selection(
        "ncm", data.feats[name], w, b, config, curve, lambda: data.fit([name]), data.fit_y
    )
