"""Reports from records: selection never on test, z-score ranking, reference deltas, merging."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probekit.errors import ProbekitError
from probekit.metrics import encode_outcomes, mcnemar_p, paired_bootstrap_ci
from probekit.report import (
    build_report,
    leaderboard_rows,
    load_records,
    model_label,
    render_markdown,
    write_report,
)


def _knn(model: str, dataset: str, split: str, layer: str, k: int, value: float) -> dict[str, Any]:
    return {
        "backbone": model,
        "weights": "hub",
        "dataset": dataset,
        "split": split,
        "layer": layer,
        "pool": "mean",
        "k": k,
        "temperature": 0.07,
        "vote": "weighted",
        "metric": "top1",
        "value": value,
        "n": 100,
        "extra": {"ci95": [value - 0.05, value + 0.05]} if split == "test" else {},
    }


def _probe(model: str, dataset: str, value: float, ci: tuple[float, float]) -> dict[str, Any]:
    return {
        "backbone": model,
        "weights": "hub",
        "dataset": dataset,
        "split": "test",
        "layer": "layer2",
        "pool": "mean",
        "method": "logreg",
        "metric": "top1",
        "value": value,
        "n": 100,
        "config": {"feature": "layer2/mean", "C": 0.5, "val_top1": 0.9},
        "extra": {"ci95": list(ci)},
    }


def test_knn_entry_is_chosen_on_leave_one_out_not_on_test() -> None:
    recs = [
        # test favours layer1 k=20; the selection split (train, leave-one-out) favours layer3 k=10
        _knn("a", "d", "test", "layer1", 20, 0.95),
        _knn("a", "d", "test", "layer3", 10, 0.80),
        _knn("a", "d", "train", "layer1", 20, 0.70),
        _knn("a", "d", "train", "layer3", 10, 0.90),
    ]
    rep = build_report(recs)
    cell = rep.cell("d", "knn", "a")
    assert cell is not None
    assert (cell.feature, cell.hyper["k"], cell.value) == ("layer3/mean", 10, 0.80)
    assert cell.selected_on == "leave-one-out on train"
    # a val split, when there is one, is preferred to leave-one-out
    recs.append(_knn("a", "d", "val", "layer1", 20, 0.99))
    recs.append(_knn("a", "d", "val", "layer3", 10, 0.10))
    assert build_report(recs).cell("d", "knn", "a").feature == "layer1/mean"  # type: ignore[union-attr]


def test_zscore_ranking_matches_numpy_and_reference_deltas() -> None:
    rng = np.random.default_rng(0)
    acc = rng.uniform(0.3, 0.95, size=(4, 3))  # models x datasets
    models, datasets = ["m0", "m1", "m2", "m3"], ["d0", "d1", "d2"]
    recs = [
        _probe(m, d, float(acc[i, j]), (acc[i, j] - 0.02, acc[i, j] + 0.02))
        for i, m in enumerate(models)
        for j, d in enumerate(datasets)
    ]
    rep = build_report(recs, reference="m0")
    z = (acc - acc.mean(0)) / acc.std(0)  # per dataset over models, population std (BoB)
    expect = dict(zip(models, z.mean(1), strict=True))
    got = {m: s for m, s, n in rep.ranking["logreg"]}
    assert got == pytest.approx(expect)
    assert [m for m, _, _ in rep.ranking["logreg"]] == sorted(models, key=lambda m: -expect[m])
    assert all(n == 3 for _, _, n in rep.ranking["logreg"])
    for d in rep.deltas:
        i, j = models.index(d["model"]), datasets.index(d["task"])
        assert d["delta"] == pytest.approx(acc[i, j] - acc[0, j])
        assert d["ci_overlap"] == (abs(acc[i, j] - acc[0, j]) <= 0.04)
    assert len(rep.deltas) == 9
    with pytest.raises(ProbekitError, match="reference 'nope'"):
        build_report(recs, reference="nope")


def test_reference_deltas_pair_the_test_images() -> None:
    rng = np.random.default_rng(1)
    scored = rng.random(200) < 0.95  # a few invalid images, the same for both models
    ref_right = rng.random(int(scored.sum())) < 0.6
    new_right = ref_right | (rng.random(len(ref_right)) < 0.3)  # right wherever ref is, and more
    recs = []
    for model, right in (("ref", ref_right), ("new", new_right)):
        r = _probe(model, "d", float(right.mean()), (0.0, 1.0))  # leaderboard CIs overlap
        r["extra"]["outcomes"] = encode_outcomes(scored, right, "fp")
        recs.append(r)
    (d,) = build_report(recs, reference="ref").deltas
    assert d["delta"] == pytest.approx(new_right.mean() - ref_right.mean())
    assert d["delta_ci95"] == list(paired_bootstrap_ci(new_right, ref_right))
    assert d["mcnemar_p"] == mcnemar_p(new_right, ref_right) < 1e-6
    assert 0 < d["delta_ci95"][0] < d["delta"] < d["delta_ci95"][1] and d["ci_overlap"]
    # outcomes of other rows (another dataset's, or none recorded) are not paired
    recs[1]["extra"]["outcomes"] = encode_outcomes(scored, new_right, "other")
    assert build_report(recs, reference="ref").deltas[0]["delta_ci95"] is None
    del recs[1]["extra"]["outcomes"]
    assert build_report(recs, reference="ref").deltas[0]["delta_ci95"] is None


def test_leaderboard_marks_the_best_and_those_within_noise_of_it() -> None:
    rng = np.random.default_rng(2)
    scored = np.ones(400, bool)
    top = rng.random(400) < 0.8
    near = top.copy()
    near[np.flatnonzero(top)[:6]] = False  # 0.5 points below the best: 6 lost, 4 won
    near[np.flatnonzero(~top)[:4]] = True
    lost4 = top.copy()
    lost4[np.flatnonzero(top)[-4:]] = False  # 4 lost, none won: p = 2 / 2**4, chance
    far = top & (rng.random(400) < 0.8)  # about 16 points below
    recs = []
    for model, right in (("far", far), ("top", top), ("near", near), ("lost4", lost4)):
        r = _probe(model, "d", float(right.mean()), (0.0, 1.0))
        r["extra"]["outcomes"] = encode_outcomes(scored, right, "fp")
        recs.append(r)
    recs.append(_probe("top", "alone", 0.5, (0.4, 0.6)))  # a column of one entry: no mark
    rep = build_report(recs)
    assert rep.best == {("d", "logreg", m, "top1") for m in ("top", "near", "lost4")}
    rows = {r[0]: r[1] for r in leaderboard_rows(rep, "d")}
    assert rows["top"].startswith(f"{100 * top.mean():.2f}* ")
    assert rows["near"].startswith(f"{100 * near.mean():.2f}* ") and "*" not in rows["far"]
    md = render_markdown(rep)
    assert "\\*: the best of its column" in md and "McNemar" in md
    assert f"{100 * top.mean():.2f}\\* " in md
    assert not build_report(recs[-1:]).best


def test_records_merge_later_wins_and_transfer_is_its_own_task(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(_probe("x", "d", 0.5, (0.4, 0.6))) + "\n")
    later = _probe("x", "d", 0.7, (0.6, 0.8))
    transfer = dict(_probe("x", "e", 0.3, (0.2, 0.4)), train_dataset="d")
    b.write_text("\n".join(json.dumps(r) for r in (later, transfer)) + "\n")
    recs = load_records([a, b])
    rep = build_report(recs)
    assert rep.cell("d", "logreg", "x").value == 0.7  # type: ignore[union-attr]
    assert rep.cell("d->e", "logreg", "x").value == 0.3  # type: ignore[union-attr]
    assert rep.tasks == ["d", "d->e"]
    rep2, files = write_report(recs, tmp_path / "out")
    assert set(files) >= {"report.md", "results.csv", "results.jsonl"}
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith(
        "d,logreg,x,top1,0.700000,0.6,0.8,layer2/mean,C=0.5"
    )
    # the written results.jsonl reads back to the same report
    again = build_report(load_records([tmp_path / "out"]))
    assert [(c.task, c.value) for c in again.cells] == [(c.task, c.value) for c in rep2.cells]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ProbekitError, match=r"bad\.jsonl:1 is not a JSON record"):
        load_records([bad])
    with pytest.raises(ProbekitError, match="no such results"):
        load_records([tmp_path / "missing.jsonl"])


def test_model_labels() -> None:
    assert model_label("resnet50", "hub") == "resnet50"
    assert model_label("resnet50", "random") == "resnet50@random"
    assert model_label("resnet50", "file", "/w/ft.safetensors") == "resnet50@ft.safetensors"
