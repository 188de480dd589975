"""Representation similarity: debiased linear CKA against the textbook HSIC formula on Gram
matrices, its invariances; mutual kNN against brute force; `compare` matching rows by id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import write_store
from typer.testing import CliRunner

from probekit.cli import app
from probekit.errors import ProbekitError
from probekit.similarity import compare, hsic, linear_cka, mutual_knn


def _hsic_gram(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """The textbook estimators on n x n Gram matrices (Song et al. 2012, eq. 5; Gretton et al.
    2005 for the biased one), written independently of the feature-space code."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    k, l_ = x @ x.T, y @ y.T
    n = len(k)
    if not debiased:
        h = np.eye(n) - np.ones((n, n)) / n
        return float(np.trace(k @ h @ l_ @ h)) / (n - 1) ** 2
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l_, 0)
    one = np.ones(n)
    value = (
        np.trace(k @ l_)
        + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ k @ l_ @ one)
    )
    return float(value / (n * (n - 3)))


@pytest.mark.parametrize("debiased", [True, False])
def test_hsic_and_cka_equal_the_gram_matrix_formulas(debiased: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 7)) + 3.0  # not centered: the functions center
    y = x[:, :5] @ rng.normal(size=(5, 9)) + rng.normal(size=(40, 9))
    assert hsic(x, y, debiased=debiased) == pytest.approx(_hsic_gram(x, y, debiased), rel=1e-10)
    want = _hsic_gram(x, y, debiased) / np.sqrt(
        _hsic_gram(x, x, debiased) * _hsic_gram(y, y, debiased)
    )
    assert linear_cka(x, y, debiased=debiased) == pytest.approx(want, rel=1e-10)


def test_cka_is_one_for_the_same_features_and_invariant_to_rotation_and_scale() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16))
    y = np.tanh(x @ rng.normal(size=(16, 12)))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x @ q * 7.5, x) == pytest.approx(1.0, abs=1e-10)
    base = linear_cka(x, y)
    assert 0.05 < base < 0.95
    assert linear_cka(x @ q, y * 0.01) == pytest.approx(base, rel=1e-9)
    # unrelated features: the debiased estimator is near 0 where the biased one is not
    z = rng.normal(size=(200, 64))
    assert abs(linear_cka(x, z)) < 0.05 < linear_cka(x, z, debiased=False)


def test_mutual_knn_equals_brute_force() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 6))
    y = x + rng.normal(scale=0.7, size=x.shape)
    k = 5

    def brute(a: np.ndarray) -> list[set[int]]:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        s = a @ a.T
        np.fill_diagonal(s, -np.inf)
        return [set(np.argsort(-row)[:k]) for row in s]

    want = np.mean([len(p & q) / k for p, q in zip(brute(x), brute(y), strict=True)])
    assert mutual_knn(x, y, k) == pytest.approx(want)
    assert mutual_knn(x, x, k) == 1.0
    assert 0 < mutual_knn(x, y, k) < 1


def _pair_of_stores(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Store a holds x; store b the same images rotated and stored in another order (ids
    permuted), its row of image test5 marked invalid."""
    rng = np.random.default_rng(3)
    n = 60
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = rng.integers(0, 3, n)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    perm = rng.permutation(n)
    a = write_store(tmp_path / "a.zarr", {"test": (x, y)}, ["p", "q", "r"], backbone="a")
    b = write_store(
        tmp_path / "b.zarr",
        {"test": (x[perm] @ q.astype(np.float32), y[perm])},
        ["p", "q", "r"],
        backbone="b",
    )
    ids = zarr.open_array(str(b / "test/ids"))
    ids[:] = np.array([f"test{i}" for i in perm])
    valid = zarr.open_array(str(b / "test/valid"))
    flags = np.ones(n, bool)
    flags[int(np.flatnonzero(perm == 5)[0])] = False
    valid[:] = flags
    return a, b, x, q


def test_compare_matches_images_by_id_and_drops_invalid_rows(tmp_path: Path) -> None:
    a, b, x, q = _pair_of_stores(tmp_path)
    res = compare([a, b], k=5)
    (pair,) = res.pairs
    assert pair.n == 59  # image test5 is invalid in b: dropped from both
    # matched by id, b is a rotation of a: the same representation
    assert pair.cka == pytest.approx(1.0, abs=1e-5)
    assert pair.mutual_knn == pytest.approx(1.0)
    keep = np.arange(60) != 5
    assert pair.cka == pytest.approx(linear_cka(x[keep], x[keep] @ q), abs=1e-5)
    recs = res.records()
    assert [r.metric for r in recs] == ["cka", "mutual_knn"]
    assert recs[0].model == "a" and recs[0].extra["model_b"] == "b" and recs[0].n == 59
    with pytest.raises(ProbekitError, match="no 'val' split"):
        compare([a, b], split="val")
    with pytest.raises(ProbekitError, match="given twice"):
        compare([a, a])
    with pytest.raises(ProbekitError, match="k must be a positive"):
        compare([a, b], k=0)
    with pytest.raises(ProbekitError, match="nothing to compare"):
        compare([a])


def test_compare_cli_prints_a_table_and_json(tmp_path: Path) -> None:
    a, b, _, _ = _pair_of_stores(tmp_path)
    runner = CliRunner()
    got = runner.invoke(app, ["compare", str(a), str(b), "--json", "--k", "5"])
    assert got.exit_code == 0, got.output
    (line,) = [json.loads(s) for s in got.output.strip().splitlines()]
    assert set(line) == {"store_a", "feature_a", "store_b", "feature_b", "n", "cka", "mutual_knn"}
    assert line["n"] == 59 and line["cka"] == pytest.approx(1.0, abs=1e-5)
    table = runner.invoke(app, ["compare", str(a), str(b), "--k", "5"])
    assert table.exit_code == 0 and "CKA" in table.output and "1.000" in table.output
    bad = runner.invoke(app, ["compare", str(a), str(b), "--split", "val"])
    assert bad.exit_code == 1 and "no 'val' split" in bad.output


def test_concatenation_probe_pays_where_each_backbone_knows_half(tmp_path: Path) -> None:
    """a sees which pair of classes (y // 2), b which class within the pair (y % 2), stored
    in another order: alone each gets about half, side by side nearly all."""
    from probekit.similarity import concat_probe

    rng = np.random.default_rng(4)
    n = 800
    y = rng.integers(0, 4, n)
    xa = (np.eye(2)[y // 2] * 3 + rng.normal(size=(n, 2))).astype(np.float32)
    xb = (np.eye(2)[y % 2] * 3 + rng.normal(size=(n, 2))).astype(np.float32)
    perm = rng.permutation(n)
    cut = 600
    a = write_store(
        tmp_path / "a.zarr",
        {"train": (xa[:cut], y[:cut]), "test": (xa[cut:], y[cut:])},
        list("pqrs"),
        backbone="a",
    )
    tr, te = perm[perm < cut], perm[perm >= cut]  # b: the same images, shuffled
    b = write_store(
        tmp_path / "b.zarr",
        {"train": (xb[tr], y[tr]), "test": (xb[te], y[te])},
        list("pqrs"),
        backbone="b",
    )
    zarr.open_array(str(b / "train/ids"))[:] = np.array([f"train{i}" for i in tr])
    zarr.open_array(str(b / "test/ids"))[:] = np.array([f"test{i - cut}" for i in te])
    gain = concat_probe(a, b)
    assert 0.35 < gain.top1_a < 0.65 and 0.35 < gain.top1_b < 0.65
    assert gain.top1_both > 0.9 and gain.n == n - cut
    assert gain.gain == pytest.approx(gain.top1_both - max(gain.top1_a, gain.top1_b))
    assert 0 < gain.gain_ci95[0] < gain.gain < gain.gain_ci95[1] and gain.mcnemar_p < 1e-6
    rec = gain.record("d", "test")
    assert rec.metric == "concat_gain" and rec.extra["model_b"] == "b"
    with pytest.raises(ProbekitError, match="two different stores"):
        concat_probe(a, a)
    res = compare([a, b], concat=True)
    (ens,) = res.ensembles
    assert ens.top1_both == gain.top1_both
    assert [r.metric for r in res.records()] == ["cka", "mutual_knn", "concat_gain"]
    from typer.testing import CliRunner

    from probekit.cli import app

    out = CliRunner().invoke(app, ["compare", str(a), str(b), "--concat"])
    assert out.exit_code == 0 and "side by side" in out.output
