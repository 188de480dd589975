"""The box probe end to end on cached tokens and boxes: its records, the choices it makes on
validation (planted winners), streaming within a memory budget, VOC's metrics for VOC layouts,
CorLoc's layer choice and LOST's box, and the one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import probekit
from probekit.cli import app
from probekit.errors import ProbekitError

SMALL = {"chunk_rows": 8, "batch_size": 4, "num_workers": 0, "quiet": True}
FAST = {"det_epochs": 2, "det_width": 16, "det_depth": 1, "write": False}


@pytest.fixture(scope="module")
def det_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("det")
    res = probekit.extract(
        "test_vit@random", "digit-boxes:24", cache_dir=root, tokens="all", **SMALL
    )
    return res.store_path


def test_detect_records_every_metric_with_intervals(det_store: str) -> None:
    out = probekit.probe(det_store, method="detect", **FAST)
    store = probekit.open_store(det_store)
    by = {(r.split, r.metric): r for r in out.records}
    curve = [r for r in out.records if r.metric == "val_ap"]
    assert [r.feature for r in curve] == store.token_names  # a pyramid a layer (a ViT)
    for metric in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"):
        r = by[("test", metric)]
        assert r.method == "detect" and r.feature == out.selected["detect"]["feature"]
        assert np.isnan(r.value) or 0 <= r.value <= 1
        assert len(r.extra["boot"]) == 200 and r.n == 6
    ap50 = by[("test", "ap50")]
    lo, hi = ap50.extra["ci95"]
    q = np.quantile([v for v in ap50.extra["boot"] if v is not None], [0.025, 0.975])
    want = (max(0, 2 * ap50.value - q[1]), min(1, 2 * ap50.value - q[0]))
    assert (lo, hi) == pytest.approx(want)
    corloc = by[("test", "corloc")]
    assert 0 <= corloc.value <= 1 and len(corloc.extra["hits"]) == 6
    assert [r.feature for r in out.records if r.metric == "val_corloc"] == store.token_names


def test_detect_from_the_cli_in_one_line_errors(det_store: str, tmp_path: Path) -> None:
    args = ["probe", det_store, "--method", "detect", "--det-epochs", "1", "--det-width", "8"]
    got = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "records")])
    assert got.exit_code == 0, got.output
    assert "box probes" in got.output and "AP50 [95% CI]" in got.output
    bad = CliRunner().invoke(app, ["probe", det_store, "--method", "detect", "--det-scales", "3"])
    assert bad.exit_code == 1 and "powers of 2" in bad.output and "Traceback" not in bad.output
    seg = probekit.extract("test_vit@random", "digit-scenes:12", cache_dir=tmp_path, tokens="all",
                           **SMALL)  # fmt: skip
    with pytest.raises(ProbekitError, match="has no boxes: box probes"):
        probekit.probe(seg.store_path, method="detect", **FAST)


def test_detect_chooses_its_planted_validation_winner(
    det_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation AP planted per (layer set, lr): the unique winner (layer 1 at the second
    lr, whose AP50 is the worst) is chosen over a close second of higher AP50."""
    from probekit.detection import probe as det_probe

    real = det_probe.train_box_heads
    names = probekit.open_store(det_store).token_names

    def planted(data: Any, layers: Any, *args: Any, **kwargs: Any) -> Any:
        t = real(data, layers, *args, **kwargs)
        ap, ap50 = np.full(t.val_ap.shape, 0.2), np.full(t.val_ap.shape, 0.5)
        if layers.label == names[1]:
            ap[0, 1], ap50[0, 1] = 0.6, 0.1
        if layers.label == names[0]:
            ap[0, 0], ap50[0, 0] = 0.6 - 1e-9, 0.9
        t.val_ap, t.val_ap50 = ap, ap50
        return t

    monkeypatch.setattr(det_probe, "train_box_heads", planted)
    out = probekit.probe(det_store, method="detect", det_lrs=[1e-3, 1e-2], **FAST)
    chosen = out.selected["detect"]
    assert chosen["feature"] == names[1] and chosen["lr"] == 1e-2 and chosen["val_ap"] == 0.6


def test_corloc_tests_the_layer_of_the_best_validation_corloc(
    det_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from probekit.detection import records

    names = probekit.open_store(det_store).token_names
    real = records.corloc
    calls: list[int] = []

    def planted(truth: Any, boxes: Any) -> Any:
        value, hits = real(truth, boxes)
        calls.append(len(truth))
        if len(calls) <= len(names):  # the validation curve, a layer a call
            return (0.9 if len(calls) == 2 else 0.1), hits
        return value, hits

    monkeypatch.setattr(records, "corloc", planted)
    out = probekit.probe(det_store, method="detect", **FAST)
    (test,) = [r for r in out.records if r.metric == "corloc"]
    assert test.feature == names[1] and test.hyper["val_corloc"] == 0.9


def test_a_streamed_probe_equals_a_resident_one(det_store: str) -> None:
    held = probekit.probe(det_store, method="detect", features=["layer1/tokens"], **FAST)
    streamed = probekit.probe(
        det_store, method="detect", features=["layer1/tokens"], memory_mb=1, **FAST
    )
    a = {(r.split, r.metric, r.feature): r.value for r in held.records}
    b = {(r.split, r.metric, r.feature): r.value for r in streamed.records}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k


def test_lost_finds_the_block_that_differs() -> None:
    from probekit.detection.corloc import lost_box

    rng = np.random.default_rng(0)
    background = rng.normal(0, 0.1, (8, 8, 16)) + np.eye(16)[0] * 3
    # the object's tokens point away from the background's (centred features): it is the
    # region of the lowest degree, and the only one its patches correlate with
    background[2:5, 3:7] = rng.normal(0, 0.1, (3, 4, 16)) - np.eye(16)[0] * 3
    box = lost_box(background.reshape(64, 16), (8, 8), (128, 128))
    np.testing.assert_allclose(box, [3 * 16, 2 * 16, 7 * 16, 5 * 16])


def test_voc_layouts_get_vocs_ap50_beside_cocos(tmp_path: Path) -> None:
    from test_det_data import _voc

    root = _voc(tmp_path / "voc")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join("adefgh"))
    for stem in "defgh":
        (root / "Annotations" / f"{stem}.xml").write_text(
            (root / "Annotations" / "a.xml").read_text()
        )
        (root / "JPEGImages" / f"{stem}.jpg").write_bytes((root / "JPEGImages/a.jpg").read_bytes())
    res = probekit.extract("test_vit@random", f"det:{root}", cache_dir=tmp_path / "c",
                           tokens="all", **SMALL)  # fmt: skip
    out = probekit.probe(res.store_path, method="detect", **FAST)
    metrics = {r.metric: r.value for r in out.records if r.split == "test"}
    assert {"voc07_ap50", "voc_ap50", "ap50"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in ("voc07_ap50", "voc_ap50"))


def test_triage_reports_detection_leaderboards_curves_and_paired_deltas(tmp_path: Path) -> None:
    """Two backbones on digit-boxes: leaderboards of AP, AP50, AP75 and CorLoc, a validation
    AP curve a backbone, deltas to the reference whose paired interval is the quantiles of
    the two probes' AP on the same resamples, results.csv rows; the records read back from
    results.jsonl give the same report (every layer's curve point kept)."""
    from probekit.report import build_report, load_records

    res = probekit.triage(
        ["test_vit@random", "test_convnext@random"], "digit-boxes:24", methods="detect",
        layers="all", reference="test_vit@random", out=tmp_path / "rep", cache_dir=tmp_path / "c",
        quiet=True, log=None, probe_options={"det_epochs": 2, "det_width": 16},
    )  # fmt: skip
    rep = res.report
    for metric in ("ap", "ap50", "ap75", "corloc"):
        assert rep.shows("digit-boxes:24", metric)
    curves = [k for k in rep.curves if k[1] == "detect"]
    assert len(curves) == 2 and all(len(rep.curves[k]) >= 2 for k in curves)
    (delta,) = [d for d in rep.deltas if d["metric"] == "ap50"]
    boot = {
        r.model: np.array(r.extra["boot"], dtype=float)
        for r in rep.records
        if r.metric == "ap50" and r.split == "test"
    }
    diff = boot["test_convnext@random"] - boot["test_vit@random"]
    lo, hi = np.quantile(diff[np.isfinite(diff)], [0.025, 0.975])
    point = delta["delta"]
    np.testing.assert_allclose(delta["delta_ci95"], [2 * point - hi, 2 * point - lo])
    csv = (tmp_path / "rep" / "results.csv").read_text().splitlines()
    rows = {tuple(line.split(",")[1:4:2]) for line in csv[1:]}
    assert {("detect", m) for m in ("ap", "ap50", "ap75", "corloc")} <= rows
    again = build_report(load_records([tmp_path / "rep" / "results.jsonl"]), "test_vit@random")
    assert again.curves == rep.curves and again.deltas == rep.deltas


def test_a_box_delta_needs_the_same_images_and_resamples() -> None:
    from probekit.report.compute import _box_delta

    a = {"boot": [0.5, 0.6, 0.7, None], "key": ["fp", 0, "d"], "value": 0.55}
    b = {"boot": [0.4, 0.4, 0.5, 0.1], "key": ["fp", 0, "d"], "value": 0.4}
    d = _box_delta(a, b)
    lo, hi = np.quantile([0.1, 0.2, 0.2], [0.025, 0.975])
    assert d is not None and d[0] == pytest.approx(0.15)
    assert d[1:] == pytest.approx((0.3 - hi, 0.3 - lo))  # the basic interval about 0.15
    assert _box_delta(a, {**b, "key": ["other", 0, "d"]}) is None
    assert _box_delta(a, {**b, "key": ["fp", 1, "d"]}) is None  # other resamples
    hits = _box_delta({"hits": [1, 1, 0], "dataset": "x"}, {"hits": [0, 1, 0], "dataset": "x"})
    assert hits is not None and hits[0] == pytest.approx(1 / 3)


def test_batched_heads_train_as_heads_trained_one_by_one(det_store: str) -> None:
    """Two learning rates trained together end where each ends trained alone: the same
    minibatches, each head its own AdamW state."""
    import torch

    from probekit.detection import probe as det_probe
    from probekit.detection.data import DetData, layer_sets, set_rows
    from probekit.probes.base import ProbeOptions

    store = probekit.open_store(det_store)
    data = DetData.prepare(store, ProbeOptions.of(method="detect"))
    (layers, *_) = layer_sets(store, (2.0, 1.0, 0.5))
    x = set_rows(store, "train", layers, data.fit_rows, 2**30, data.device)
    boxes = data.boxes("train", data.fit_rows)

    def trained(lrs: tuple[float, ...]) -> dict[str, torch.Tensor]:
        opts = det_probe.Options(lrs=lrs, wds=(1e-4,), epochs=2, width=8, depth=1)
        t = det_probe.train_box_heads(data, layers, opts, x, boxes)
        return {k: v.detach() for k, v in t.grid.heads.params.items()}

    both = trained((1e-3, 3e-2))
    for g, lr in enumerate((1e-3, 3e-2)):
        alone = trained((lr,))
        for name, value in alone.items():
            # AdamW divides by each gradient's own scale, so rounding (grouped against plain
            # convolutions) moves a weight of small gradients by a little of what AdamW can
            # move it: at most 0.5% of the tensor's scale or of lr x steps, where larger
            steps = 2 * -(-len(data.fit_rows) // 8)
            gap = float((both[name][g] - value[0]).abs().max())
            assert gap <= 5e-3 * max(float(value[0].abs().max()), lr * steps), (name, gap)
    assert not torch.allclose(both["cls.weight"][0], both["cls.weight"][1])
