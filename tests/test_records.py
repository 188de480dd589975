"""The one record schema: round trips, the shapes written before it, the kNN selection rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from probekit.errors import ProbekitError
from probekit.records import RECORD_SCHEMA, Record, select_knn
from probekit.report import build_report, load_records
from probekit.specs import ModelSpec, model_label, parse_list, parse_models

OLD_KNN = {  # a KnnRecord line of a `*.knn-*.jsonl` written before the schema
    "backbone": "test_vit",
    "weights": "random-init",
    "dataset": "synthetic:4",
    "split": "test",
    "layer": "layer1",
    "pool": "mean",
    "k": 10,
    "temperature": 0.07,
    "vote": "weighted",
    "metric": "top1",
    "value": 0.75,
    "n": 4,
    "extra": {"ci95": [0.5, 1.0]},
    "backend": "faiss",
}
OLD_PROBE = {  # a ProbeRecord line of a `*.probe-*.jsonl`, as a triage journal kept it
    "kind": "probe",
    "model": "test_vit@random",
    "backbone": "test_vit",
    "weights": "random-init",
    "dataset": "synthetic:8",
    "train_dataset": "synthetic:4",
    "split": "test",
    "layer": "head",
    "pool": "embed",
    "method": "logreg",
    "metric": "top1",
    "value": 0.5,
    "n": 8,
    "config": {"feature": "head/embed", "C": 0.1, "val_top1": 0.6},
    "extra": {"ci95": [0.2, 0.8]},
}
OLD_EXTRACT = {"kind": "extract", "model": "m", "dataset": "d", "seconds": 2.5, "images": 10}


def test_records_written_before_the_schema_read_as_records() -> None:
    knn = Record.from_dict(OLD_KNN)
    assert (knn.kind, knn.method, knn.feature, knn.layer, knn.pool) == (
        "knn",
        "knn",
        "layer1/mean",
        "layer1",
        "mean",
    )
    assert knn.hyper == {"k": 10, "vote": "weighted", "temperature": 0.07}
    assert knn.model == "test_vit@random"  # a random init is named as triage names it
    assert knn.extra == {"ci95": [0.5, 1.0], "backend": "faiss"}
    probe = Record.from_dict(OLD_PROBE)
    assert (probe.task, probe.method, probe.hyper["C"]) == (
        "synthetic:4->synthetic:8",
        "logreg",
        0.1,
    )
    extract = Record.from_dict(OLD_EXTRACT)
    assert extract.kind == "extract" and extract.extra == {"seconds": 2.5, "images": 10}
    for r in (knn, probe, extract):  # and every record survives its JSON round trip
        d = json.loads(json.dumps(r.to_dict()))
        assert d["schema"] == RECORD_SCHEMA
        assert json.dumps(Record.from_dict(d).to_dict()) == json.dumps(r.to_dict())
    with pytest.raises(ProbekitError, match="newer"):
        Record.from_dict({**knn.to_dict(), "schema": RECORD_SCHEMA + 1})
    with pytest.raises(ProbekitError, match="not a probekit record"):
        Record.from_dict({"hello": 1})


def test_old_record_files_load_into_a_report(tmp_path: Path) -> None:
    lines = [
        OLD_KNN,
        {**OLD_KNN, "split": "train", "value": 0.9},
        {**OLD_KNN, "layer": "head", "pool": "embed", "value": 0.9},
        {**OLD_KNN, "layer": "head", "pool": "embed", "split": "train", "value": 0.5},
    ]
    path = tmp_path / "old.knn-12345678.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    rep = build_report(load_records([path]))
    cell = rep.cell("synthetic:4", "knn", "test_vit@random")
    assert cell is not None and (cell.feature, cell.value) == ("layer1/mean", 0.75)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"kind": "knn", "model": "m"}) + "\n")
    with pytest.raises(ProbekitError, match=r"bad\.jsonl:1 is not a probekit record"):
        load_records([tmp_path / "bad.jsonl"])


def test_select_knn_takes_the_best_then_the_smaller_k_then_the_first() -> None:
    base = Record("knn", "m", "d", metric="top1", split="train", method="knn")

    def at(feature: str, k: int, value: float) -> Record:
        return Record(**{**base.__dict__, "feature": feature, "value": value, "hyper": {"k": k}})

    recs = [at("a/x", 20, 0.8), at("b/x", 10, 0.8), at("c/x", 10, 0.8), at("d/x", 5, 0.7)]
    assert select_knn(recs).feature == "b/x"
    assert select_knn([*recs, at("e/x", 200, 0.9)]).feature == "e/x"
    with pytest.raises(ProbekitError):
        select_knn([])


def test_one_model_grammar_and_label_rule() -> None:
    assert ModelSpec.parse("resnet50").label == "resnet50"
    assert ModelSpec.parse("resnet50@random") == ModelSpec("resnet50", random_init=True)
    assert ModelSpec.parse("resnet50@/w/ft.safetensors").label == "resnet50@ft.safetensors"
    assert ModelSpec.parse("resnet50", weights=Path("/w/ft.pth")).label == "resnet50@ft.pth"
    assert ModelSpec.parse("resnet50", random_init=True).label == "resnet50@random"
    with pytest.raises(ValueError, match="not both"):
        ModelSpec.parse("resnet50@random", weights="/w/ft.pth")
    with pytest.raises(ValueError, match="NAME@random"):
        ModelSpec.parse("@random")
    assert model_label("resnet50", "random-init") == "resnet50@random"
    assert model_label("resnet50", "hub", "timm/resnet50.a1_in1k") == "resnet50"
    assert [m.label for m in parse_models("a, b@random ,")] == ["a", "b@random"]
    with pytest.raises(ValueError, match="repeat"):
        parse_models("a,a")
    assert parse_list(" x, ,y ", "things") == ["x", "y"] and parse_list(["x"], "t") == ["x"]
    with pytest.raises(ValueError, match="comma list"):
        parse_list(5, "ks")  # type: ignore[arg-type]
    assert math.isnan(Record("time", "m", "d").value)


def test_kind_and_metric_are_checked() -> None:
    from probekit.errors import ProbekitError
    from probekit.records import METRICS, RECORD_KINDS, Record

    assert "probe" in RECORD_KINDS and "precision@10" in METRICS
    with pytest.raises(ProbekitError, match="kind 'prob'"):
        Record("prob", "m", "d")  # type: ignore[arg-type]
    with pytest.raises(ProbekitError, match="metric 'top-1'"):
        Record.from_dict({**Record("probe", "m", "d", metric="top1").to_dict(), "metric": "top-1"})


def test_records_of_the_previous_version_read_and_report_the_same(tmp_path: Path) -> None:
    """The previous version's triage records give the same report.md and results.csv, and its
    probe record file reads (tests/data/previous)."""
    from probekit.report import write_report

    data = Path(__file__).parent / "data" / "previous"
    rep, files = write_report(
        load_records([data / "results.jsonl"]),
        tmp_path,
        reference="test_resnet@random",
        plots=False,
    )
    assert {c.method for c in rep.cells} == {"knn", "linear", "logreg"}
    before = (data / "report.md").read_text()
    plots = before.index("\n\n## Plots")  # the plots are not drawn here
    assert Path(files["report.md"]).read_text() == before[:plots] + "\n"
    assert Path(files["results.csv"]).read_text() == (data / "results.csv").read_text()
    probes = load_records([data / "probe.jsonl"])
    assert {r.method for r in probes} == {"linear", "logreg"}
    assert all(r.kind == "probe" for r in probes)
