from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from probekit.cli import app

runner = CliRunner()


def test_backbones_table_and_json() -> None:
    res = runner.invoke(app, ["backbones", "dino*"])
    assert res.exit_code == 0, res.output
    assert "vit_small_patch16_224.dino" in res.output and "8,9,10,11 + head" in res.output
    res = runner.invoke(app, ["backbones", "effnet_lite0", "--json"])
    rows = json.loads(res.output)
    assert rows[0]["timm_name"] == "tf_efficientnet_lite0" and rows[0]["weights"] == "package"


def test_extract_ls_info(cache_dir: Path) -> None:
    args = [
        "extract",
        "-b",
        "test_vit",
        "-d",
        "synthetic:2",
        "--random-init",
        "--layers",
        "last2",
        "--pool",
        "cls,gem",
        "--chunk-rows",
        "4",
        "--num-workers",
        "0",
        "--quiet",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("extracted test_vit@random on synthetic:2: 8 images, 0 invalid")
    assert " s in all, loop " in res.output
    res = runner.invoke(app, args)
    assert res.output.startswith("cache hit: test_vit@random on synthetic:2")
    res = runner.invoke(app, ["ls"])
    assert res.exit_code == 0 and "synthetic:2" in res.output and "yes" in res.output
    store = next(cache_dir.glob("*/*.zarr"))
    res = runner.invoke(app, ["info", str(store)])
    assert res.exit_code == 0, res.output
    assert "layer4/cls (64), layer4/gem (64), layer5/cls (64)" in res.output
    assert "random-init seed=0" in res.output
    meta = json.loads(runner.invoke(app, ["info", str(store), "--json"]).output)
    assert meta["config"]["pools"] == ["cls", "gem"] and meta["status"] == "complete"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["extract", "-b", "dino_vitz16", "-d", "synthetic"], "Did you mean dino_vits16"),
        (["extract", "-b", "test_vit", "-d", "imagenet", "--random-init"], "unknown dataset spec"),
        (
            ["extract", "-b", "test_vit", "-d", "synthetic", "--random-init", "--layers", "last9"],
            "this model has 6",
        ),
        (
            ["extract", "-b", "test_vit", "-d", "synthetic", "--random-init", "--pool", "max"],
            "unknown pool 'max'",
        ),
        (
            ["extract", "-b", "test_vit", "-d", "synthetic", "--weights", "nope.pt"],
            "does not exist",
        ),
        (
            ["extract", "-b", "test_vit", "-d", "synthetic", "--weights", "tests"],
            "is a directory; pass an existing file",
        ),
        (["extract", "-b", "test_vit", "-d", "csv:tests", "--random-init"], "is a directory"),
        (
            ["extract", "-b", "test_vit", "-d", "synthetic", "--random-init", "--pixel-size", "99"],
            "smaller than test_vit's own resize (168 px): use 168 or more",
        ),
        (
            ["triage", "-b", "test_vit@random", "-d", "synthetic", "--pixel-size", "big"],
            "neither a number of pixels nor 'auto'",
        ),
        (["info", "/nonexistent/store.zarr"], "not a probekit feature store"),
    ],
)
def test_user_errors_are_one_line_exit_1(args: list[str], message: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert message in res.output
    assert "Traceback" not in res.output and res.output.startswith("error: ")


def test_offline_hub_backbone_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("probekit.backbones.weights._hub_reachable", lambda timeout=3.0: False)
    res = runner.invoke(app, ["extract", "--backbone", "dino_vits16", "--data", "digits"])
    assert res.exit_code == 1
    assert "cannot be reached" in res.output and "--weights FILE" in res.output


def test_probe_cli_with_transfer(cache_dir: Path) -> None:
    args = [
        "probe",
        "-b",
        "test_resnet",
        "-d",
        "synthetic:12",
        "--random-init",
        "--pool",
        "mean",
        "--layers",
        "last",
        "--epochs",
        "2",
        "--eval-on",
        "synthetic:8",
        "--quiet",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "selection on validation only" in res.output
    assert res.output.count("synthetic:8") >= 3  # extracted, then one transfer row per method
    records = list(cache_dir.glob("synthetic-12/*.probe-*.jsonl"))
    assert len(records) == 1
    rows = [json.loads(x) for x in records[0].read_text().splitlines()]
    assert {r["method"] for r in rows} == {"linear", "logreg"}
    assert {r["dataset"] for r in rows if r["metric"] == "top1"} == {"synthetic:12", "synthetic:8"}
    bad = runner.invoke(app, ["probe", "--method", "svm", *args[1:]])
    from probekit.methods import PROBE_METHODS

    said = f"unknown method 'svm'; use {', '.join(PROBE_METHODS)} or both"
    assert said.startswith("unknown method 'svm'; use linear, logreg, attentive, mlp, linseg")
    assert bad.exit_code == 1 and said in bad.output


def test_help_texts_keep_their_brackets() -> None:
    """Help is rendered as rich markup, where an unescaped [default: ...] vanishes."""
    for cmd, text in [
        ("extract", "timm name[.tag]"),
        ("extract", "[default: on for CUDA]"),
        ("knn", "[default: all stored]"),
        ("triage", "[default: on for 2+ backbones]"),
    ]:
        res = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "250"})
        assert res.exit_code == 0 and text in res.output, (cmd, text)
