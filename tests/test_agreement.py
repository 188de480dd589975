"""How far the proxies agree: rank correlations between methods equal scipy's, their bootstrap
intervals resample the test images of every entry together, gap flags, and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from probekit.metrics import encode_outcomes
from probekit.report import build_report, load_records, render_markdown, write_report


def _rec(model: str, method: str, right: np.ndarray, dataset: str = "d") -> dict[str, Any]:
    scored = np.ones(len(right), bool)
    return {
        "schema": 2,
        "kind": "probe",
        "model": model,
        "dataset": dataset,
        "split": "test",
        "feature": "layer2/mean",
        "method": method,
        "metric": "top1",
        "value": float(right.mean()),
        "n": len(right),
        "hyper": {"feature": "layer2/mean", "val_top1": 0.5},
        "extra": {"ci95": [0.0, 1.0], "outcomes": encode_outcomes(scored, right, "fp")},
    }


def _records(n: int = 600, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Five backbones; linear ranks them by their skill, logreg nearly so, and knn ranks the
    last one (a masked-image model, say) far down."""
    rng = np.random.default_rng(seed)
    skill = {"a": 0.55, "b": 0.62, "c": 0.70, "d": 0.78, "mae": 0.85}
    recs, acc = [], {}
    for model, p in skill.items():
        for method, shift in (("linear", 0.0), ("logreg", 0.01), ("knn", 0.0)):
            q = 0.45 if (method == "knn" and model == "mae") else p + shift
            right = rng.random(n) < q
            recs.append(_rec(model, method, right))
            acc[(method, model)] = right.mean()
    return recs, acc


def test_rank_correlations_equal_scipy_with_image_bootstrap_intervals() -> None:
    recs, acc = _records()
    rep = build_report(recs)
    models = ["a", "b", "c", "d", "mae"]
    by_pair = {(g.method_a, g.method_b): g for g in rep.agreements}
    assert set(by_pair) == {("knn", "linear"), ("knn", "logreg"), ("linear", "logreg")}
    for (ma, mb), g in by_pair.items():
        x = [acc[(ma, m)] for m in models]
        y = [acc[(mb, m)] for m in models]
        assert g.models == tuple(models)
        assert g.spearman == pytest.approx(spearmanr(x, y).statistic)
        assert g.kendall == pytest.approx(kendalltau(x, y).statistic)
        assert g.spearman_ci95 is not None and g.kendall_ci95 is not None
        assert g.spearman_ci95[0] <= g.spearman <= g.spearman_ci95[1]
    # linear and logreg agree; kNN's ranking is not theirs
    assert by_pair[("linear", "logreg")].spearman == 1.0
    assert by_pair[("knn", "linear")].spearman < 0.6
    (flag,) = rep.flags
    assert (flag.model, flag.low, flag.high) == ("mae", "knn", "logreg")
    assert "knn underrates this model" in flag.text()
    md = render_markdown(rep)
    assert "## How far the proxies agree" in md and "Spearman" in md and "mae on d" in md


def test_the_interval_widens_with_fewer_test_images() -> None:
    wide = build_report(_records(n=60, seed=1)[0]).agreements
    narrow = build_report(_records(n=6000, seed=1)[0]).agreements

    def width(g: Any) -> float:
        return float(g.kendall_ci95[1] - g.kendall_ci95[0])

    for a, b in zip(wide, narrow, strict=True):
        if (a.method_a, a.method_b) == ("knn", "linear"):
            assert width(a) > width(b)


def test_agreement_needs_three_backbones_and_is_made_anew_from_records(tmp_path: Path) -> None:
    recs, _ = _records()
    two = [r for r in recs if r["model"] in ("a", "b")]
    assert build_report(two).agreements == []
    no_outcomes = [{**r, "extra": {"ci95": [0.0, 1.0]}} for r in recs]
    g = build_report(no_outcomes).agreements[0]
    assert g.spearman_ci95 is None and not np.isnan(g.spearman)  # no images: no interval
    rep, files = write_report(recs, tmp_path / "out")
    assert (
        "methods.png" in files and "![methods](methods.png)" in Path(files["report.md"]).read_text()
    )
    kinds = [r.kind for r in rep.records]
    assert kinds.count("agreement") == 2 * 3  # spearman and kendall, three pairs
    again = build_report(load_records([tmp_path / "out"]))
    assert [r for r in again.records if r.kind == "agreement"] == [
        r for r in rep.records if r.kind == "agreement"
    ]
    sp = next(r for r in rep.records if r.kind == "agreement" and r.metric == "spearman")
    assert sp.method == "knn vs linear" and sp.n == 5 and len(sp.extra["ci95"]) == 2


def test_vectorized_rank_correlations_equal_scipy_with_ties() -> None:
    from probekit.report.agreement import rank_correlations

    rng = np.random.default_rng(5)
    a = rng.integers(0, 4, size=(50, 6)).astype(float)  # many ties
    b = rng.integers(0, 4, size=(50, 6)).astype(float)
    rho, tau = rank_correlations(a, b)
    for i in range(50):
        want_rho, want_tau = spearmanr(a[i], b[i]).statistic, kendalltau(a[i], b[i]).statistic
        if np.isnan(want_rho):
            assert np.isnan(rho[i])
        else:
            assert rho[i] == pytest.approx(want_rho) and tau[i] == pytest.approx(want_tau)


def test_triage_report_says_how_far_to_trust_it(tmp_path: Path) -> None:
    """A triage of three backbones: agreement, calibration, label-free structure and
    similarity sections, their records and plots."""
    import probekit

    res = probekit.triage(
        ["test_resnet@random", "test_vit@random", "test_convnext@random"],
        ["synthetic:24"],
        img_size=64,
        layers="last2",
        out=tmp_path / "rep",
        cache_dir=tmp_path / "cache",
        quiet=True,
        log=None,
    )
    md = Path(res.files["report.md"]).read_text()
    for title in (
        "## How far the proxies agree",
        "## Calibration of the probes",
        "## Without labels: effective rank and clusters",
        "## How alike the backbones are",
    ):
        assert title in md
    assert {"methods.png", "reliability.png", "similarity.png"} <= set(res.files)
    kinds: dict[str, set[str]] = {}
    for r in res.records:
        kinds.setdefault(r.kind, set()).add(r.metric)
    assert kinds["agreement"] == {"spearman", "kendall"}
    assert kinds["compare"] == {"cka", "mutual_knn"}
    assert kinds["structure"] == {"rankme", "nmi", "ari"}
    assert {"ece", "ece_ts"} <= kinds["probe"]
    pairs = {(r.model, r.extra["model_b"]) for r in res.records if r.kind == "compare"}
    assert len(pairs) == 3  # every pair of the three backbones
    # the records read back give the same report sections
    again = probekit.build_report(probekit.load_records([tmp_path / "rep"]))
    assert sorted(r.to_dict()["value"] for r in again.records if r.kind == "compare") == sorted(
        r.value for r in res.records if r.kind == "compare"
    )
