"""Transferability scores against independent computations: LogME's evidence against
scikit-learn's BayesianRidge log marginal likelihood (hyperpriors 0, no intercept: the same
quantity, see `transferability.logme`), H-score against the sum of the generalized eigenvalues
of the between-class and total covariances (scipy), and its invariance under a linear map."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import probekit
from probekit.cli import app
from probekit.errors import OptionError
from probekit.transferability import transferability
from probekit.transferability.hscore import hscore
from probekit.transferability.logme import class_evidence, logme


def _data(n: int, d: int, seed: int, spread: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    return rng.normal(size=(n, d)) + np.eye(4)[y] @ rng.normal(size=(4, d)) * spread, y


@pytest.mark.parametrize(("n", "d"), [(200, 16), (50, 80), (300, 5)])
def test_logme_evidence_equals_bayesian_ridge(n: int, d: int) -> None:
    from sklearn.linear_model import BayesianRidge

    f, y = _data(n, d, seed=n + d)
    ours = class_evidence(f, y)
    for k in range(4):
        ref = BayesianRidge(
            alpha_1=0, alpha_2=0, lambda_1=0, lambda_2=0, fit_intercept=False,
            compute_score=True, tol=1e-12, max_iter=100_000,
        ).fit(f, (y == k).astype(float))  # fmt: skip
        assert ours[k] * n == pytest.approx(ref.scores_[-1], rel=1e-8, abs=1e-8)
    assert logme(f, y) == pytest.approx(np.mean([ours[k] for k in range(4)]))


def test_logme_and_hscore_rank_separable_features_above_noise() -> None:
    good, y = _data(300, 12, seed=1, spread=2.0)
    noise = np.random.default_rng(2).normal(size=good.shape)
    assert logme(good, y) > logme(noise, y)
    assert hscore(good, y) > hscore(noise, y)


def test_hscore_equals_the_generalized_eigenvalues_and_ignores_a_linear_map() -> None:
    from scipy.linalg import eigh

    f, y = _data(400, 10, seed=3)
    fc = f - f.mean(0)
    cov_f = fc.T @ fc / len(f)
    means = np.stack([fc[y == k].mean(0) for k in range(4)])
    weights = np.bincount(y) / len(y)
    cov_g = (means.T * weights) @ means
    assert hscore(f, y) == pytest.approx(float(eigh(cov_g, cov_f, eigvals_only=True).sum()))
    mixed = f @ np.random.default_rng(4).normal(size=(10, 10))
    assert hscore(mixed, y) == pytest.approx(hscore(f, y), rel=1e-6)
    assert 0 <= hscore(f, y) <= 3  # at most C - 1


def test_transferability_on_a_store_records_every_feature_and_the_parameter_count(
    tmp_path: object,
) -> None:
    res = probekit.extract(
        "test_resnet@random", "digits", cache_dir=str(tmp_path), quiet=True, num_workers=0
    )
    out = transferability(res.store_path)
    store = probekit.open_store(res.store_path)
    assert list(out.rows) == store.feature_names
    x = store.read_rows("train", "head/embed", np.flatnonzero(store.usable("train")))
    y = store.labels("train")[store.usable("train")]
    assert out.rows["head/embed"]["logme"] == pytest.approx(logme(x.astype(np.float64), y))
    (params,) = [r for r in out.records if r.metric == "params"]
    assert params.value == store.info.backbone.params > 0
    assert {r.method for r in out.records} == {"logme", "hscore", "params"}
    with pytest.raises(OptionError, match="unknown transferability score 'leep'"):
        transferability(res.store_path, scores="leep")
    got = CliRunner().invoke(app, ["transfer", res.store_path, "--scores", "logme"])
    assert got.exit_code == 0 and "logme" in got.output and "parameters" in got.output
