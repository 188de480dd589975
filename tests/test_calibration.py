"""Calibration of fitted probes: ECE against a direct numpy binning, temperature scaling
against a grid search, and the ece / ece_ts records of `probekit.probe`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_store

from probekit import probe
from probekit.metrics import expected_calibration_error, fit_temperature


def _ece_loop(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Bin by bin with explicit (lo, hi] edges, as the definition reads."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    conf, right = p.max(1), p.argmax(1) == labels
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.sum() / len(labels) * abs(right[inside].mean() - conf[inside].mean())
    return total


def _nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(1, keepdims=True)
    return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]).mean())


def test_ece_equals_a_direct_binning() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 3000)
    logits = rng.normal(size=(3000, 6)) * 2
    logits[np.arange(3000), y] += rng.normal(2.0, 1.0, 3000)  # right more often than not
    for scale in (0.3, 1.0, 4.0):
        z = logits * scale
        assert expected_calibration_error(z, y) == pytest.approx(_ece_loop(z, y), abs=1e-12)
    perfect = np.full((10, 2), -50.0)
    perfect[np.arange(10), np.arange(10) % 2] = 50.0
    assert expected_calibration_error(perfect, np.arange(10) % 2) == pytest.approx(0, abs=1e-12)


def test_temperature_minimizes_the_validation_cross_entropy() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 2000)
    logits = rng.normal(size=(2000, 4))
    logits[np.arange(2000), y] += 1.0
    over = logits * 5  # overconfident: the best temperature is about 5
    t = fit_temperature(over, y)
    grid = np.exp(np.linspace(-2, 3, 2001))
    best = grid[np.argmin([_nll(over, y, g) for g in grid])]
    assert t == pytest.approx(best, rel=5e-3)
    assert _nll(over, y, t) <= _nll(over, y, 1.0)
    assert expected_calibration_error(over / t, y) < expected_calibration_error(over, y) / 2


def test_probe_records_ece_before_and_after_temperature_scaling(tmp_path: Path) -> None:
    # 60 noisy dimensions, 500 train images, hardly any regularization: an overfit, and so
    # overconfident, logistic regression
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 60)) * 0.2
    y = rng.integers(0, 3, 900)
    x = (centres[y] + rng.normal(size=(900, 60))).astype(np.float32)
    path = write_store(
        tmp_path / "s.zarr", {"train": (x[:500], y[:500]), "test": (x[500:], y[500:])}, list("abc")
    )
    res = probe(path, method="both", lrs=[0.1], wds=[0.0], epochs=3, cs=[1e3], write=False)
    for m in ("linear", "logreg"):
        recs = {r.metric: r for r in res.records if r.method == m}
        for metric in ("ece", "ece_ts"):
            r = recs[metric]
            assert 0 <= r.value <= 1 and r.n == 400 and r.split == "test"
            assert sum(r.extra["bins"]["count"]) == 400
            # the value is the ECE its own reliability bins give
            b = r.extra["bins"]
            gaps = [
                n * abs(a - c)
                for c, a, n in zip(b["confidence"], b["accuracy"], b["count"], strict=True)
                if n
            ]
            assert r.value == pytest.approx(sum(gaps) / 400, abs=1e-12)
        assert recs["ece"].extra["temperature"] == 1.0
        assert recs["ece_ts"].extra["temperature"] > 0
    # logistic regression with almost no regularization is overconfident; scaling fixes most
    lr = {r.metric: r for r in res.records if r.method == "logreg"}
    assert lr["ece"].value > 0.1
    assert lr["ece_ts"].extra["temperature"] > 1
    assert lr["ece_ts"].value < lr["ece"].value
    # three epochs of linear heads are underconfident: a temperature below 1 fixes most
    lin = {r.metric: r for r in res.records if r.method == "linear"}
    assert lin["ece_ts"].extra["temperature"] < 1
    assert lin["ece_ts"].value < lin["ece"].value / 2
    assert "refit" in lr["ece_ts"].extra["temperature_fit_on"]
