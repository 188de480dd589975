"""Hostile input, checked at the door (CLI and Python API alike, before any model is built);
datasets that cannot give an honest number; faults that deserve a word. (Damaged stores:
test_damage.py.)"""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import CLI, faulty, make_image
from safetensors.torch import save_file
from typer.testing import CliRunner

import probekit
from probekit.cli import app
from probekit.errors import (
    DatasetError,
    OptionError,
    ProbekitError,
    ProbekitWarning,
    StoreError,
    WeightsError,
)

SMALL = {"chunk_rows": 256, "num_workers": 0, "quiet": True}


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300", **(env or {})})
    return result.exit_code, result.output


def _one_line_error(args: list[str], *needles: str) -> None:
    code, said = _cli(*args)
    assert code == 1, said
    assert said.startswith("error: ") and len(said.strip().splitlines()) == 1, said
    assert "Traceback" not in said
    for n in needles:
        assert n in said, said


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("digits")
    return probekit.extract("test_resnet@random", "digits", cache_dir=root, **SMALL).store_path


# ------------------------------------------------------------------ inputs checked at the door


@pytest.mark.parametrize("size", ["0", "-3"])
def test_img_size_must_be_positive(size: str, cache_dir: Path) -> None:
    _one_line_error(
        ["extract", "-b", "test_resnet@random", "-d", "digits", "--img-size", size],
        "img_size must be a positive number of pixels",
    )
    with pytest.raises(OptionError, match="img_size"):
        probekit.extract("test_resnet@random", "digits", img_size=int(size))
    assert not cache_dir.exists()  # refused before anything was made


def test_img_size_must_be_whole_patches(cache_dir: Path) -> None:
    args = ["extract", "-b", "test_vit@random", "-d", "digits", "--img-size", "7"]
    _one_line_error(args, "use a multiple of 16")
    with pytest.raises(OptionError, match=r"use a multiple of 16 \(e\.g\. 16\)"):
        probekit.extract("test_vit@random", "digits", img_size=7)
    with pytest.raises(OptionError, match=r"e\.g\. 48"):
        probekit.triage("test_vit@random", "digits", img_size=50, log=None)
    assert not cache_dir.exists()


def test_num_workers_must_not_be_negative() -> None:
    _one_line_error(
        ["extract", "-b", "test_resnet@random", "-d", "digits", "--num-workers", "-2"],
        "num_workers must be 0 or more",
    )


def test_cache_dir_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = ["extract", "-b", "test_resnet@random", "-d", "digits"]
    _one_line_error([*args, "--cache-dir", str(afile)], "is a file, not a directory")
    monkeypatch.setenv("PROBEKIT_CACHE", str(afile))
    _one_line_error(args, "PROBEKIT_CACHE", "is a file")
    _one_line_error(["ls"], "PROBEKIT_CACHE", "is a file")
    with pytest.raises(StoreError, match="is a file"):
        probekit.extract("test_resnet@random", "digits")


def test_text_file_named_safetensors(tmp_path: Path) -> None:
    fake = tmp_path / "w.safetensors"
    fake.write_text("not tensors")
    args = ["extract", "-b", "test_resnet", "--weights", str(fake), "-d", "digits"]
    _one_line_error(args, "is not a safetensors file")
    with pytest.raises(WeightsError, match="is not a safetensors file"):
        probekit.extract(f"test_resnet@{fake}", "digits")


def test_weights_from_a_url_are_downloaded_once_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(1)
    sd = timm.create_model("test_resnet").state_dict()
    file = tmp_path / "given" / "w.safetensors"
    file.parent.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(file))
    url = file.as_uri()  # file:// is fetched like http(s):// (torch.hub's downloader)
    res = probekit.extract("test_resnet", "synthetic:4", weights=url, **SMALL)
    weights = probekit.open_store(res.store_path).info.weights
    assert weights["source"] == "url" and weights["ref"] == url
    from probekit.backbones.weights import sha256_file

    assert weights["sha256"] == sha256_file(file)
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "w.safetensors").is_file()
    direct = probekit.extract("test_resnet", "synthetic:4", weights=file, **SMALL)
    a, b = probekit.open_store(res.store_path), probekit.open_store(direct.store_path)
    np.testing.assert_array_equal(a.features("test"), b.features("test"))  # the same weights
    assert probekit.extract("test_resnet", "synthetic:4", weights=url, **SMALL).cache_hit


def test_url_that_cannot_be_fetched_is_one_line() -> None:
    url = "http://probekit.invalid/w.safetensors"
    args = ["extract", "-b", "test_resnet", "--weights", url, "-d", "digits"]
    _one_line_error(args, f"from {url}", "pass it with --weights FILE")


def test_extract_takes_the_model_grammar_of_triage(cache_dir: Path) -> None:
    code, said = _cli(
        "extract", "-b", "test_resnet@random", "-d", "synthetic:2", "--num-workers", "0"
    )
    assert code == 0 and "test_resnet@random" in said


def test_knn_and_probe_refuse_out_of_range_numbers(digits_store: str) -> None:
    _one_line_error(
        ["knn", digits_store, "--memory-mb", "-5"], "memory_mb must be a positive number"
    )
    _one_line_error(["probe", digits_store, "--tol", "-1"], "tol must be a positive number")
    with pytest.raises(OptionError, match="memory_mb"):
        probekit.knn(digits_store, memory_mb=0)
    with pytest.raises(OptionError, match="tol"):
        probekit.probe(digits_store, tol=-1.0)


def test_one_value_or_a_list(digits_store: str) -> None:
    def top1(result: probekit.KnnResult) -> list[float]:
        return [r.value for r in result.records if r.metric == "top1"]

    assert top1(probekit.knn(digits_store, ks=5, write=False)) == top1(
        probekit.knn(digits_store, ks=[5], write=False)
    )
    assert top1(probekit.knn(digits_store, ks="10", write=False)) == top1(
        probekit.knn(digits_store, ks=[10], write=False)
    )
    with pytest.raises(OptionError, match="integer or a list of integers"):
        probekit.knn(digits_store, ks=[5, "x"])  # type: ignore[list-item]
    one = probekit.probe(digits_store, features="layer3/mean", method="logreg", write=False)
    assert {r.feature for r in one.records if r.split == "test"} == {"layer3/mean"}
    with pytest.raises(StoreError, match="unknown feature 'layer9/cls'"):
        probekit.probe(digits_store, features="layer9/cls")


# ------------------------------------------------------------ datasets that cannot be honest


def _folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                make_image(rng).save(d / f"{i}.png")
    return root


def test_knn_refuses_one_class_as_probe_does(tmp_path: Path) -> None:
    root = _folder(tmp_path / "one", {"train": {"cat": 4}, "test": {"cat": 2}})
    res = probekit.extract("test_resnet@random", f"imagefolder:{root}", **SMALL)
    for run in (probekit.knn, probekit.probe):
        with pytest.raises(
            ProbekitError, match=r"fewer than 2 classes \(1: 'cat'\); .* at least 2"
        ):
            run(res.store_path)
    _one_line_error(["knn", res.store_path], "fewer than 2 classes")


def test_test_class_without_train_images_is_said_with_its_cap(tmp_path: Path) -> None:
    layout = {"train": {"cat": 10, "dog": 10}, "test": {"cat": 2, "dog": 2, "fox": 2}}
    root = _folder(tmp_path / "fox", layout)
    res = probekit.extract("test_resnet@random", f"imagefolder:{root}", **SMALL)
    said = "1 test classes have no train images ('fox'): their 2 test images can never be "
    with pytest.warns(ProbekitWarning, match="top-1 is at most 66.7%"):
        knn = probekit.knn(res.store_path, ks=1)
    assert all(said in r.extra["warnings"][0] for r in knn.records)
    with pytest.warns(ProbekitWarning, match="'fox'"):
        pr = probekit.probe(res.store_path, method="logreg")
    test = [r for r in pr.records if r.split == "test"]
    assert test and all(said in r.extra["warnings"][0] for r in test)
    top1 = [r.value for r in test if r.metric == "top1"]
    assert max(top1) <= 4 / 6 + 1e-9  # the cap holds
    report = probekit.build_report(knn.records + pr.records)
    task = f"imagefolder:{root}"
    assert report.warnings[task] == [knn.records[0].extra["warnings"][0]]
    from probekit.report.render import render_markdown

    assert f"> warning: {said}" in render_markdown(report)


def _csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path


def test_duplicates_and_overlap_are_warned_with_counts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        make_image(rng).save(tmp_path / f"{i}.png")
    rows = [(f"{i}.png", "ab"[i % 2], "train") for i in range(4)]
    rows += [("0.png", "a", "train"), ("4.png", "a", "test"), ("5.png", "b", "test")]
    rows += [("1.png", "b", "test"), ("2.png", "a", "test")]  # also in train
    ds = probekit.load_dataset(f"csv:{_csv(tmp_path / 'd.csv', rows)}")
    assert ds.warnings == (
        "1 images of train are listed more than once (same path)",
        "2 images of test are also in train (same path)",
    )
    with pytest.warns(ProbekitWarning) as said:
        res = probekit.extract("test_resnet@random", ds, **SMALL)
    assert [str(w.message) for w in said] == [f"{ds.spec}: {w}" for w in ds.warnings]
    info = probekit.open_store(res.store_path).info
    assert info.dataset.warnings == ds.warnings
    with pytest.warns(ProbekitWarning):
        knn = probekit.knn(res.store_path, ks=1)
    assert all(list(ds.warnings) == r.extra["warnings"][:2] for r in knn.records)


def test_built_in_sets_are_checked_by_content() -> None:
    from probekit.datasets.common import split_arrays as _split_arrays

    images = np.random.default_rng(0).integers(0, 255, (6, 4, 4, 3), dtype=np.uint8)
    images[5] = images[0]  # one test image is a train image
    labels = np.array([0, 1, 0, 1, 0, 0])
    ds = _split_arrays("x", images, labels, ["a", "b"], np.arange(4), np.array([4, 5]))
    assert ds.warnings == ("1 images of test are also in train (same pixels)",)
    assert probekit.load_dataset("digits").warnings == ()


def test_one_image_with_two_labels_names_the_lines(tmp_path: Path) -> None:
    make_image(np.random.default_rng(0)).save(tmp_path / "x.png")
    make_image(np.random.default_rng(1)).save(tmp_path / "y.png")
    rows = [("x.png", "a", "train"), ("y.png", "b", "train"), ("x.png", "b", "test")]
    spec = f"csv:{_csv(tmp_path / 'd.csv', rows)}"
    with pytest.raises(DatasetError, match=r"two labels \('a' and 'b', lines 2 and 4\)"):
        probekit.load_dataset(spec)
    _one_line_error(["extract", "-b", "test_resnet@random", "-d", spec], "lines 2 and 4")


# ------------------------------------------------------------------- faults that need a word


@pytest.mark.slow
def test_ctrl_c_says_what_was_kept_and_resume_finishes(tmp_path: Path) -> None:
    """Ctrl-C at a point in the work, not a moment: the chunk writer sends SIGINT to the CLI
    right after its second chunk is whole (tests/faults: SIGINT_AFTER)."""
    log = tmp_path / "kills.log"
    env = faulty(
        {**os.environ, "PROBEKIT_CACHE": str(tmp_path / "cache"), "SIGINT_AFTER": "2",
         "KILL_LOG": str(log)}
    )  # fmt: skip
    args = ["extract", "-b", "test_resnet@random", "-d", "digits", "--chunk-rows", "64"]
    args += ["--batch-size", "16", "--num-workers", "0"]
    # a Ctrl-C reaches the CLI as in a terminal: SIGINT at its default, even where this test
    # runs in the background of a shell (which starts it with SIGINT ignored, inherited)
    proc = subprocess.run(
        [sys.executable, "-c", CLI, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    err = proc.stderr
    assert log.read_text().split() == ["sigint:2"]
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: ") and line.endswith(
        "chunks kept; run the same command to resume."
    ), err
    kept, total = (int(w) for w in line.split()[1:4:2])
    assert 2 <= kept < total == 23 + 6  # digits: 1437 train, 360 test rows in 64-row chunks
    res = probekit.extract(
        "test_resnet@random",
        "digits",
        chunk_rows=64,
        num_workers=0,
        quiet=True,
        cache_dir=tmp_path / "cache",
    )
    assert not res.cache_hit and res.resumed_chunks >= kept


def _read_only(monkeypatch: pytest.MonkeyPatch, under: Path) -> None:
    """Directories under `under` read as not writable (tests run as root, who may write
    anywhere: the decision is what is tested)."""
    import probekit.cache.location as location

    real = location.writable

    def writable(path: object) -> bool:
        return not str(path).startswith(str(under)) and real(path)

    monkeypatch.setattr(location, "writable", writable)
    monkeypatch.setattr("probekit.extraction.writable", writable)


def test_read_only_cache_reads_complete_stores(
    digits_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(digits_store).parent.parent
    _read_only(monkeypatch, root)
    before = sorted(p.name for p in Path(digits_store).parent.iterdir())
    res = probekit.extract("test_resnet@random", "digits", cache_dir=root, **SMALL)
    assert res.cache_hit
    with pytest.warns(ProbekitWarning, match="read-only: the knn records were"):
        knn = probekit.knn(digits_store, ks=5)
    assert knn.path is None and knn.records
    kept = probekit.knn(digits_store, ks=5, out=tmp_path / "records")
    assert kept.path is not None and Path(kept.path).parent == tmp_path / "records"
    assert sorted(p.name for p in Path(digits_store).parent.iterdir()) == before  # no lock
    with pytest.warns(ProbekitWarning, match="read-only"):
        code, said = _cli("knn", digits_store, "--k", "5")
    assert code == 0, said
    assert "records: not written (read-only store; see --out)" in said
    with pytest.raises(StoreError, match=r"read-only and has no store .* --cache-dir"):
        probekit.extract("test_resnet@random", "synthetic:2", cache_dir=root, **SMALL)


def test_records_on_a_full_disk_leave_nothing(
    digits_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Path.write_text

    def full(self: Path, *a: object, **k: object) -> int:
        if self.name.endswith(".jsonl.tmp"):
            real(self, "")  # the file is made, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", full)

    def probe() -> object:
        return probekit.probe(digits_store, method="logreg", features="head/embed")

    for run in (lambda: probekit.knn(digits_store, ks=5), probe):
        with pytest.raises(StoreError, match=r"cannot write the (knn|probe) records .*free space"):
            run()
    _one_line_error(["knn", digits_store], "cannot write the knn records", "No space left")
    assert not list(Path(digits_store).parent.glob("*.tmp"))
