"""Label-free and cluster metrics: RankMe against its formula on a matrix of known spectrum,
k-means NMI and ARI against direct numpy formulas on the same clusters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_store

from probekit.errors import ProbekitError
from probekit.structure import kmeans_clusters, rankme, structure


def test_rankme_is_the_entropy_of_a_known_spectrum() -> None:
    rng = np.random.default_rng(0)
    s = np.array([5.0, 3.0, 1.0, 0.5, 0.0, 0.0])
    u, _ = np.linalg.qr(rng.normal(size=(50, 6)))
    v, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    x = u @ np.diag(s) @ v.T  # (50, 6) with singular values s
    p = s / s.sum() + 1e-7
    assert rankme(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert rankme(x.T) == pytest.approx(rankme(x), rel=1e-6)  # wide: the SVD route
    assert rankme(np.outer(rng.normal(size=40), rng.normal(size=8))) == pytest.approx(1, abs=1e-3)
    assert rankme(rng.normal(size=(20000, 8))) == pytest.approx(8, rel=0.01)


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
    """2 I(A; B) / (H(A) + H(B)) from the contingency table."""
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    p = table / table.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    ent = -(pa[pa > 0] * np.log(pa[pa > 0])).sum() - (pb[pb > 0] * np.log(pb[pb > 0])).sum()
    return float(2 * mi / ent)


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index from pair counts."""
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)

    def pairs(v: np.ndarray) -> float:
        return float((v * (v - 1) / 2).sum())

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([table.sum()]))
    return (index - expected) / ((rows + cols) / 2 - expected)


def test_kmeans_nmi_and_ari_equal_their_formulas(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 3
    y = rng.integers(0, 4, 400)
    x = (centres[y] + rng.normal(size=(400, 16))).astype(np.float32)
    mixed = rng.normal(size=(400, 16)).astype(np.float32)  # no class structure
    path = write_store(
        tmp_path / "s.zarr",
        {"test": ({"layer0/mean": x, "layer1/mean": mixed, "head/embed": x[:, :8]}, y)},
        list("abcd"),
    )
    res = structure(path)
    for name, feats in (("layer0/mean", x), ("layer1/mean", mixed)):
        clusters = kmeans_clusters(feats, 4, 0)
        assert res.rows[name]["nmi"] == pytest.approx(_nmi(y, clusters), rel=1e-9)
        assert res.rows[name]["ari"] == pytest.approx(_ari(y, clusters), rel=1e-9)
        assert res.rows[name]["rankme"] == pytest.approx(rankme(feats), rel=1e-9)
    assert res.rows["layer0/mean"]["nmi"] > 0.9 > 0.1 > res.rows["layer1/mean"]["nmi"]
    assert {r.metric for r in res.records} == {"rankme", "nmi", "ari"}
    assert all(r.kind == "structure" and r.n == 400 for r in res.records)
    with pytest.raises(ProbekitError, match="no 'val' split"):
        structure(path, split="val")


def test_structure_cli_prints_a_table_and_records(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from probekit.cli import app

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 90)
    x = rng.normal(size=(90, 8)).astype(np.float32)
    path = write_store(tmp_path / "s.zarr", {"test": (x, y)}, list("abc"))
    runner = CliRunner()
    got = runner.invoke(app, ["structure", str(path)])
    assert got.exit_code == 0 and "RankMe" in got.output and "head/embed" in got.output
    js = runner.invoke(app, ["structure", str(path), "--json"])
    metrics = [json.loads(line)["metric"] for line in js.output.strip().splitlines()]
    assert js.exit_code == 0 and metrics == ["rankme", "nmi", "ari"]
    bad = runner.invoke(app, ["structure", str(path), "--features", "layer9/cls"])
    assert bad.exit_code == 1 and "layer9/cls" in bad.output
