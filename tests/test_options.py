"""Options declared once: checked in the API before any work (one-line errors from Python and
the CLI alike), the extraction plan resolved without running anything, a light CLI start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import probekit
from probekit.cli import app
from probekit.datasets import load_dataset
from probekit.distributed import SINGLE
from probekit.errors import OptionError, ProbekitError
from probekit.extraction import ExtractOptions, ExtractPlan
from probekit.neighbors import KnnOptions
from probekit.probes import ProbeOptions
from probekit.specs import ModelSpec

runner = CliRunner()
MISSING = "/nonexistent/store.zarr"  # an option error must come before the store is opened


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: probekit.probe(MISSING, optimizer="adam"), "unknown optimizer 'adam'"),
        (lambda: probekit.probe(MISSING, dtype="bf16"), "unknown dtype 'bf16'"),
        (lambda: probekit.probe(MISSING, method="svm"), "unknown method 'svm'"),
        (lambda: probekit.probe(MISSING, holdout=1.5), "holdout must be a fraction"),
        (lambda: probekit.probe(MISSING, tol=-1), "tol must be a positive number"),
        (lambda: probekit.probe(MISSING, lrs=[]), "lrs must be a non-empty list"),
        (lambda: probekit.probe(MISSING, epoch=3), "probe has no option 'epoch'. Did you mean"),
        (lambda: probekit.knn(MISSING, vote_method="x"), "unknown vote 'x'"),
        (lambda: probekit.knn(MISSING, ks=[0]), "k must be positive integers"),
        (lambda: probekit.knn(MISSING, ks="x"), "ks takes an integer or a list of integers"),
        (lambda: probekit.knn(MISSING, memory_mb=-5), "memory_mb must be a positive number"),
        (lambda: probekit.knn(MISSING, backend="annoy"), "unknown kNN backend 'annoy'"),
        (lambda: probekit.knn(MISSING, temperature=0), "temperature must be > 0"),
        (lambda: probekit.extract("test_vit", "nope", batch_size=0), "batch_size must be"),
        (lambda: probekit.extract("test_vit", "nope", img_size=-3), "img_size must be"),
        (lambda: probekit.extract("test_vit", "nope", num_workers=-2), "num_workers must be"),
        (lambda: probekit.extract("test_vit", "nope", dtype="int8"), "unknown dtype 'int8'"),
        (lambda: probekit.extract("test_vit", "nope", layer="all"), "no option 'layer'"),
    ],
)
def test_bad_options_are_value_errors_before_any_work(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OptionError, match=message) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, ProbekitError)
    assert "\n" not in str(info.value)


def test_options_take_one_value_or_a_list() -> None:
    assert KnnOptions(ks=5).ks == (5,)
    assert KnnOptions(ks="20,10").ks == (10, 20)
    assert KnnOptions(ks=[200, 10, 10]).ks == (10, 200)
    assert KnnOptions(features="layer9/cls").features == ("layer9/cls",)
    assert ProbeOptions(features="layer9/cls").features == ("layer9/cls",)
    assert ProbeOptions(method="logreg").methods == ("logreg",)
    assert ProbeOptions(method="both").methods == ("linear", "logreg")
    assert ProbeOptions(method="logreg,linear").methods == ("logreg", "linear")
    base = ExtractOptions(layers="all", pool="mean")
    assert ExtractOptions.of(base, batch_size=8) == ExtractOptions(
        layers="all", pool="mean", batch_size=8
    )
    with pytest.raises(OptionError, match="decode='gpu'"):
        ExtractOptions(decode="gpu", pixel_cache=True)


def test_cli_reports_the_api_check_in_one_line(tmp_path: Path) -> None:
    for args, message in [
        (["probe", MISSING, "--optimizer", "adam"], "unknown optimizer 'adam'; use sgd or adamw."),
        (["knn", MISSING, "--vote", "x"], "unknown vote 'x'; use weighted, majority or both."),
        (["knn", MISSING, "--k", "0"], "k must be positive integers"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 1, res.output
        assert message in res.output and "Traceback" not in res.output


def test_plan_resolves_on_the_meta_device_without_running_anything(tmp_path: Path) -> None:
    ds = load_dataset("synthetic:4")
    opts = ExtractOptions(layers="last2", pool="cls,mean", cache_dir=tmp_path, device="cpu")
    plan = ExtractPlan.resolve(ModelSpec.parse("test_vit@random"), ds, opts)
    assert plan.model.label == "test_vit@random" and plan.layers == (4, 5)
    assert plan.pools == ("cls", "mean") and plan.size == (160, 160)
    assert plan.policy.device == "cpu" and plan.policy.precision == "fp32"
    assert plan.config.feature_names == [
        "layer4/cls",
        "layer4/mean",
        "layer5/cls",
        "layer5/mean",
        "head/embed",
    ]
    assert plan.path.parent == tmp_path / ds.name and plan.path.name.startswith("test_vit-")
    assert not any(tmp_path.iterdir())  # nothing written
    assert all(p.device == torch.device("meta") for p in plan.skeleton.model.parameters())
    # the key is the store's: extracting that plan writes exactly there
    res = probekit.extract("test_vit@random", ds, options=opts, quiet=True)
    assert res.store_path == str(plan.path) and res.backbone == "test_vit@random"
    # a pixel_size below the model's own resize is stopped while planning
    with pytest.raises(ProbekitError, match="smaller than test_vit's own resize"):
        ExtractPlan.resolve(
            ModelSpec("test_vit", random_init=True), ds, ExtractOptions.of(opts, pixel_size=100)
        )


def test_one_process_is_a_group_of_one() -> None:
    assert (SINGLE.rank, SINGLE.world, SINGLE.is_main, SINGLE.is_group) == (0, 1, True, False)
    assert SINGLE.all_gather({"a": 1}) == [{"a": 1}] and SINGLE.broadcast(3) == 3
    SINGLE.barrier()  # nothing to wait for


def test_the_command_line_starts_without_torch_timm_or_faiss() -> None:
    heavy = "('torch', 'timm', 'faiss', 'numba', 'sklearn')"
    # a module the probe methods load lazily (`probekit._lazy.lazy_module`) is not loaded
    code = (
        f"import sys; from probekit.cli import app; print([m for m in {heavy} if m in "
        "sys.modules and type(sys.modules[m]).__name__ != '_LazyModule'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"probekit {probekit.__version__}"


def test_a_probe_method_is_one_module_and_one_registry_entry(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registered, a method defined outside probekit runs in `probe`, the CLI and a triage,
    and gets its column in the report, its curve and its records."""
    from probekit.methods import PROBE_METHODS, ProbeMethod

    entry = ProbeMethod("ncm", "nearest class mean", "nearest class mean, val top-1", "probe_ncm")
    monkeypatch.setitem(PROBE_METHODS, "ncm", entry)
    ext = probekit.extract("test_resnet@random", "synthetic:12", pool="mean", quiet=True)
    res = probekit.probe(ext.store_path, method="ncm", write=False)
    assert set(res.selected) == {"ncm"} and 0 <= res.value("top1", method="ncm") <= 1
    assert res.selected["ncm"]["feature"] in probekit.open_store(ext.store_path).feature_names
    cli = runner.invoke(app, ["probe", ext.store_path, "--method", "ncm,logreg"])
    assert cli.exit_code == 0, cli.output
    assert "ncm" in cli.output and "logreg" in cli.output
    out = tmp_path / "r"
    result = probekit.triage(
        "test_resnet@random", "synthetic:12", methods="knn,ncm", pool="mean", out=out, log=None
    )
    assert result.report.methods == ["knn", "ncm"]
    assert result.report.cell("synthetic:12", "ncm", "test_resnet@random") is not None
    assert any(k[1] == "ncm" for k in result.report.curves)
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert any(",ncm,test_resnet@random,top1," in row for row in csv_rows)
