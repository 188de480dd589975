"""`probekit triage`, `probekit report` and `probekit demo`, including the README's commands."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from probekit.cache.store import open_store
from probekit.cli import app
from probekit.metrics import decode_outcomes
from probekit.report import build_report, load_records

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"
# the README's backbones, swapped for tiny random-init timm models (no weights offline)
TINY = {
    "dino_vits16": "test_vit",
    "clip_vitb16": "test_vit2",
    "convnext_tiny": "test_convnext",
    "resnet50": "test_resnet",
}


def _tiny(text: str) -> str:
    return re.sub(
        r"\b(dino_vits16|clip_vitb16|convnext_tiny|resnet50)(@random)?\b",
        lambda m: f"{TINY[m.group(1)]}@random",
        text,
    )


def _folder(root: Path, n_train: int, n_test: int, seed: int) -> Path:
    """Two classes told apart by colour: bright-red-ish vs dark-blue-ish noisy images."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls, base in (("cat", (200, 60, 40)), ("dog", (40, 60, 200))):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                px = np.clip(rng.normal(base, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
    return root


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _commands(block: str) -> list[str]:
    joined = block.replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.strip()]


def _png_ok(path: Path) -> None:
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert img.shape[0] > 150 and img.shape[1] > 150
    assert img.std() > 10  # drawn on, not a blank canvas


@pytest.mark.slow
def test_readme_quickstart_and_triage_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    """The README's commands, run as written with tiny models and data; the report files hold."""
    monkeypatch.chdir(tmp_path)
    quick = _commands(_blocks("bash")[0])
    assert quick == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo: install\n\t\$\(BIN\)/probekit demo$", makefile, flags=re.M)

    # `make demo` = `probekit demo`, on a tiny configuration
    monkeypatch.setattr("probekit.demo.DEMO_BACKBONES", ("effnet_lite0", "test_resnet@random"))
    monkeypatch.setattr("probekit.demo.DEMO_DATASETS", ("lfw-faces",))
    monkeypatch.setattr("probekit.demo.DEMO_TRANSFERS", ())
    monkeypatch.setattr("probekit.demo.DEMO_IMG_SIZE", 64)
    monkeypatch.setattr(
        "probekit.demo.DEMO_DENSE", ("digit-scenes:48", ("test_resnet@random",), "last")
    )
    monkeypatch.setattr(
        "probekit.demo.DEMO_DETECT",
        ("digit-boxes:24", ("test_resnet@random",), "last2", {"det_epochs": 1, "det_width": 8}),
    )
    res = runner.invoke(app, ["demo", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "report: probekit-demo/report.md" in res.output.replace(str(tmp_path) + "/", "")
    demo_files = ("report.md", "results.csv", "results.jsonl", "layers.png", "heatmap.png")
    for name in (*demo_files, "cost.png"):
        assert (tmp_path / "probekit-demo" / name).is_file(), name
    demo_md = (tmp_path / "probekit-demo" / "report.md").read_text()
    assert "| effnet_lite0 |" in demo_md
    # the cost beside accuracy, and the size each entry was evaluated at
    assert "## Cost and resolution" in demo_md and "GMACs/image" in demo_md
    assert "| effnet_lite0 (64px, pretrained 224px) |" in demo_md
    assert "cost and resolution" in res.output
    # few-shot episodes at the demo's shots, on the real photos and packaged weights
    assert "## Few-shot" in demo_md and "| effnet_lite0 | logreg |" in demo_md
    assert (tmp_path / "probekit-demo" / "fewshot.png").is_file()
    # dense probes on the built-in dense dataset, in a report of their own
    dense_md = (tmp_path / "probekit-demo" / "dense" / "report.md").read_text()
    assert "## digit-scenes:48: miou" in dense_md and "| test_resnet@random |" in dense_md
    # box probes on the built-in detection dataset, in a report of their own
    detect_md = (tmp_path / "probekit-demo" / "detect" / "report.md").read_text()
    assert "## digit-boxes:24: ap50" in detect_md and "| test_resnet@random |" in detect_md

    # the online flow, with tiny models and generated folders for PATH and OTHER
    path = _folder(tmp_path / "pets", 10, 6, seed=0)
    other = _folder(tmp_path / "other", 10, 6, seed=1)
    triage_block = next(b for b in _blocks("bash") if "probekit triage" in b)
    cmds = [
        _tiny(c)
        .replace("imagefolder:PATH", f"imagefolder:{path}")
        .replace("imagefolder:OTHER", f"imagefolder:{other}")
        for c in _commands(triage_block)
    ]
    assert [c.split()[:2] for c in cmds] == [["probekit", "triage"]] * 2 + [["probekit", "report"]]
    first = runner.invoke(app, [*shlex.split(cmds[0])[1:], "--quiet"])
    assert first.exit_code == 0, first.output
    shutil.move("probekit-report", "other-run")  # the "other run" the report command combines
    second = runner.invoke(app, [*shlex.split(cmds[1])[1:], "--quiet"])
    assert second.exit_code == 0, second.output
    assert "difference to test_vit@random" in second.output
    assert "mean z-score" in second.output and "favour CNNs over ViTs" in second.output
    rep = Path("probekit-report")
    for name in ("report.md", "results.csv", "results.jsonl"):
        assert (rep / name).stat().st_size > 0
    for name in ("layers.png", "heatmap.png", "ranking.png"):
        _png_ok(rep / name)
    md = (rep / "report.md").read_text()
    task = f"imagefolder:{path}"
    assert f"## {task}" in md and f"## {task}->imagefolder:{other}" in md
    assert "## Difference to test_vit@random" in md and "## Time per backbone" in md
    # every leaderboard entry keeps its test images' outcomes: the deltas are paired
    report = build_report(load_records([rep / "results.jsonl"]), reference="test_vit@random")
    assert len(report.deltas) == 3 * 3 * 3
    assert all(d["delta_ci95"][0] <= d["delta"] <= d["delta_ci95"][1] for d in report.deltas)
    for c in report.cells:
        assert c.outcomes is not None, (c.task, c.method, c.model)
        scored, right = decode_outcomes(c.outcomes)
        assert scored.sum() == c.n and right[scored].mean() == pytest.approx(c.value)
    csv_rows = (rep / "results.csv").read_text().splitlines()
    # 4 backbones x 3 methods x 3 tasks (PATH, OTHER, PATH->OTHER)
    models = {r.split(",")[2] for r in csv_rows[1:]}
    assert models == {
        "test_vit@random",
        "test_vit2@random",
        "test_convnext@random",
        "test_resnet@random",
    }
    assert len(csv_rows) - 1 == 4 * 3 * 3
    assert "cache hit" in second.output  # the first command's stores are reused

    third = runner.invoke(app, shlex.split(cmds[2])[1:])
    assert third.exit_code == 0, third.output
    combined = (Path("combined") / "results.csv").read_text().splitlines()
    assert len(combined) == len(csv_rows)  # the same measurements: the later run replaces them

    # the Python block, with the same substitutions
    code = _tiny(next(b for b in _blocks("python") if "probekit.triage(" in b))
    code = code.replace("imagefolder:PATH", f"imagefolder:{path}")
    exec(compile(code.replace("print(", "(lambda *a: None)("), "README", "exec"), {})


@pytest.mark.slow
def test_readme_python_block_runs_as_written(cache_dir: Path) -> None:
    """The README's step-by-step Python block (packaged weights, built-in data), at 64 px."""
    code = next(b for b in _blocks("python") if "probekit.open_store(" in b)
    assert "img_size=128" in code
    printed: list[tuple] = []
    scope = {"print": lambda *a: printed.append(a)}
    exec(compile(code.replace("img_size=128", "img_size=64"), "README", "exec"), scope)
    train = scope["train"]
    assert train.dtype == np.float16 and train.shape == (1437, 320)  # digits' train split
    (knn_top1,), (selected, probe_top1) = printed
    assert 0.5 < knn_top1 <= 1.0 and 0.8 < probe_top1 <= 1.0  # ImageNet weights, 10 classes
    assert selected["feature"] in scope["store"].feature_names


def test_triage_chooses_among_the_features_asked_for(tmp_path: Path, cache_dir: Path) -> None:
    from probekit.triaging import triage

    kw: dict[str, Any] = dict(methods="knn,logreg", layers="last2", pool="mean", quiet=True)
    result = triage(
        "test_resnet@random",
        "synthetic:12",
        transfer="synthetic:12->synthetic:8",
        features="last2/mean,head/embed",
        out=tmp_path / "r",
        log=None,
        **kw,
    )
    rep = result.report
    assert not rep.errors and len(rep.cells) == 4  # knn, logreg x the dataset, the transfer
    assert all(c.feature in ("last2/mean", "head/embed") for c in rep.cells)
    evaluated = {r.feature for r in result.records if r.kind == "knn"}
    assert evaluated == {"last2/mean", "head/embed"}
    # a feature the store cannot make is this backbone's failure, in one line
    lacking = triage(
        "test_resnet@random",
        "synthetic:12",
        features="last3/mean",
        out=tmp_path / "s",
        log=None,
        **kw,
    )
    assert {e.extra["stage"] for e in lacking.report.errors} == {"knn", "probe"}
    assert all("lacks layer2/mean" in e.extra["message"] for e in lacking.report.errors)


@pytest.mark.slow
def test_triage_reports_a_failed_backbone_and_goes_on(tmp_path: Path, cache_dir: Path) -> None:
    from probekit.triaging import triage

    lines: list[str] = []
    result = triage(
        ["test_resnet@random", "test_vit@/nowhere/weights.safetensors", "no_such_model"],
        "synthetic:12",
        transfer="synthetic:12->synthetic:8",
        methods="knn,logreg",
        layers="last2",
        pool="mean",
        out=tmp_path / "r",
        quiet=True,
        log=lines.append,
    )
    rep = result.report
    assert rep.models == ["test_resnet@random", "test_vit@weights.safetensors", "no_such_model"]
    failed = {e.model: e.extra["message"] for e in rep.errors}
    assert set(failed) == {"test_vit@weights.safetensors", "no_such_model"}
    assert "weights" in failed["test_vit@weights.safetensors"]
    assert "no_such_model" in failed["no_such_model"]
    assert {(c.task, c.method) for c in rep.cells} == {
        ("synthetic:12", "knn"),
        ("synthetic:12", "logreg"),
        ("synthetic:12->synthetic:8", "knn"),
        ("synthetic:12->synthetic:8", "logreg"),
    }
    md = Path(result.files["report.md"]).read_text()
    assert "## Failures" in md and "no_such_model on synthetic:12" in md
    # the kNN entry and its transfer use the feature chosen by leave-one-out on train
    recs = [r for r in result.records if r.kind == "knn" and r.metric == "top1"]
    sel = [r for r in recs if r.split == "train"]
    best = max(sel, key=lambda r: (r.value, -r.hyper["k"]))
    for task in ("synthetic:12", "synthetic:12->synthetic:8"):
        cell = rep.cell(task, "knn", "test_resnet@random")
        assert cell is not None
        assert (cell.feature, cell.hyper["k"]) == (best.feature, best.hyper["k"])
    # records hold everything: `probekit report` rebuilds the same leaderboard
    res = runner.invoke(app, ["report", str(tmp_path / "r"), "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again" / "results.csv").read_text() == Path(
        result.files["results.csv"]
    ).read_text()
    rows = [json.loads(x) for x in Path(result.files["results.jsonl"]).read_text().splitlines()]
    # one backbone alone: no agreement or similarity (they need 3 and 2 backbones)
    assert {r["kind"] for r in rows} == {"extract", "knn", "probe", "error", "time", "structure"}


def test_triage_pixel_size_auto_decodes_once_for_every_geometry(
    tmp_path: Path, cache_dir: Path
) -> None:
    from probekit.triaging import triage

    # each model's own preprocessing (crop 0.95 of 160 px), bicubic and bilinear: two geometries
    kw = dict(methods="knn", layers="last1", pool="mean", quiet=True, plots=False)
    kw["img_size"] = "native"
    models = ["test_vit@random", "test_resnet@random"]
    lines: list[str] = []
    triage(models, "synthetic:4", out=tmp_path / "a", log=lines.append, **kw)
    assert any("2 geometries" in x and "--pixel-size auto" in x for x in lines), lines
    assert len(list(cache_dir.glob("*/pixels/*.zarr"))) == 2
    lines.clear()
    result = triage(
        models, "synthetic:4", out=tmp_path / "b", pixel_size="auto", log=lines.append, **kw
    )
    assert not any("geometries" in x for x in lines)
    assert len(list(cache_dir.glob("*/pixels/*.zarr"))) == 3  # one more: 168 px squares
    extracted = [r for r in result.records if r.kind == "extract"]
    assert [r.model for r in extracted] == models
    for r in extracted:
        pixels = r.extra["pixels"]
        assert pixels.startswith("from the pixel cache of 168 px squares, cut"), pixels
        assert open_store(r.extra["store"]).meta["config"]["preprocessing"]["pixel_size"] == 168


def test_triage_bad_input_is_one_line(tmp_path: Path) -> None:
    for args, msg in [
        (["--backbones", "test_vit", "--data", "synthetic", "--methods", "svm"], "unknown methods"),
        (["--backbones", "test_vit", "--data", "nope"], "unknown dataset spec"),
        (["--backbones", "a,a", "--data", "synthetic"], "backbones repeat"),
        (["--backbones", "a", "--data", "synthetic", "--transfer", "x"], "SOURCE->TARGET"),
        (["-b", "a", "-d", "digits", "--transfer", "digits->digits"], "from a dataset to itself"),
        (["--backbones", "a", "--data", "synthetic", "--reference", "b"], "not among --backbones"),
    ]:
        res = runner.invoke(app, ["triage", *args, "--out", str(tmp_path / "r")])
        assert res.exit_code == 1, (args, res.output)
        assert res.output.startswith("error: ") and msg in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "no such results" in res.output
