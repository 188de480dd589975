"""`torchrun` extraction (gloo on the CPU): ranks split the store's chunks; results equal one
process byte for byte; a run killed midway finishes with another number of processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import CLI, faulty

ARGS = [
    "extract",
    "-b",
    "test_resnet",
    "-d",
    "synthetic:20",
    "--random-init",
    "--layers",
    "last2",
    "--pool",
    "mean",
    "--chunk-rows",
    "8",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--quiet",
]


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # one thread everywhere: the same arithmetic in every process, so bytes can be compared
    return faulty({**env, "PROBEKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra})


def _run(script: Path, cache: Path, procs: int, **extra: str) -> subprocess.CompletedProcess[str]:
    if procs == 1:
        cmd = [sys.executable, str(script), *ARGS]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            str(script),
            *ARGS,
        ]
    return subprocess.run(cmd, env=_env(cache, **extra), capture_output=True, text=True)


def _files(cache: Path) -> dict[str, bytes]:
    """Every array file of the one store under `cache` (the root metadata holds timestamps)."""
    root = next(cache.glob("*/*.zarr"))
    return {
        str(f.relative_to(root)): f.read_bytes()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.relative_to(root) != Path("zarr.json")
    }


@pytest.mark.slow
def test_torchrun_store_is_byte_identical_and_resumes_with_other_process_counts(
    tmp_path: Path,
) -> None:
    script = tmp_path / "probekit_killer.py"
    script.write_text(CLI)
    one = _run(script, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(script, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("extracted test_resnet") == 1  # rank 0 reports
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    meta = zarr.open_group(str(next((tmp_path / "two").glob("*/*.zarr")))).attrs["probekit"]
    assert meta["status"] == "complete" and meta["processes"] == 2  # type: ignore[index]

    # rank 1 dies on its second chunk (half written); torchrun stops the job
    killed = _run(script, tmp_path / "killed", 2, KILL_RANK="1", KILL_AT="2")
    assert killed.returncode != 0
    store = next((tmp_path / "killed").glob("*/*.zarr"))
    group = zarr.open_group(str(store))
    done = {s: np.asarray(group[f"{s}/done"][:]) for s in ("train", "test")}
    assert not all(d.all() for d in done.values())
    # rerun in one process: it finishes the missing chunks and nothing else
    again = _run(script, tmp_path / "killed", 1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stdout
    assert _files(tmp_path / "killed") == _files(tmp_path / "one")


@pytest.mark.slow
def test_sharded_knn_equals_one_process(tmp_path: Path) -> None:
    """Each rank searches its chunk-aligned shard of the database; merged, the records equal
    those of one process, for a query split and for leave-one-out on the train split."""
    script = tmp_path / "probekit_cli.py"
    script.write_text(CLI)
    assert _run(script, tmp_path / "c", 1).returncode == 0
    store = next((tmp_path / "c").glob("*/*.zarr"))
    for split in ("test", "train"):
        knn_args = ["knn", str(store), "--k", "3,10", "--vote", "both", "--test-split", split]
        outs = []
        for procs in (1, 2):
            launcher = (
                [sys.executable]
                if procs == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc-per-node={procs}",
                ]
            )
            res = subprocess.run(
                [*launcher, str(script), *knn_args],
                env=_env(tmp_path / "c"),
                capture_output=True,
                text=True,
            )
            assert res.returncode == 0, res.stderr[-3000:]
            assert res.stdout.count("records:") == 1
            records = res.stdout.split("records:")[1].strip().split()[0]
            outs.append(Path(records).read_text())
        assert outs[0] == outs[1]
        assert len(outs[0].splitlines()) > 10


@pytest.mark.slow
def test_torchrun_triage_reports_what_one_process_reports(tmp_path: Path) -> None:
    script = tmp_path / "probekit_cli.py"
    script.write_text(CLI)
    args = [
        "triage",
        "--backbones",
        "test_resnet@random,test_vit@random",
        "--data",
        "synthetic:12",
        "--methods",
        "knn,logreg",
        "--layers",
        "last2",
        "--no-plots",
        "--quiet",
    ]
    csv = []
    for procs, launcher in (
        (1, [sys.executable]),
        (2, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]),
    ):
        out = tmp_path / f"report{procs}"
        res = subprocess.run(
            [*launcher, str(script), *args, "--out", str(out)],
            env=_env(tmp_path / f"cache{procs}"),
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count("report: ") == 1
        csv.append((out / "results.csv").read_text())
    # every column the same but the measured extraction throughput (a timing)
    import csv as csv_module

    tables = [list(csv_module.reader(text.splitlines())) for text in csv]
    at = tables[0][0].index("images_per_s")
    same = [[row[:at] + row[at + 1 :] for row in table] for table in tables]
    assert same[0] == same[1] and len(same[0]) == 5


@pytest.mark.slow
def test_torchrun_on_webdataset_shards_equals_one_process(tmp_path: Path) -> None:
    """Ranks read their chunks' images from tar shards by byte range (`wds:`): the store equals
    one process's byte for byte."""
    import io

    import webdataset as wds

    from probekit.datasets import load_dataset

    ds = load_dataset("synthetic:5")
    shards = tmp_path / "shards"
    shards.mkdir()
    for split in ("train", "test"):
        with wds.TarWriter(str(shards / f"{split}-000.tar")) as sink:
            for i, y in enumerate(ds.splits[split].labels):
                buf = io.BytesIO()
                ds.load_image(split, i).save(buf, format="PNG")
                sink.write({"__key__": f"{split}{i:03d}", "png": buf.getvalue(), "cls": int(y)})
    script = tmp_path / "probekit_cli.py"
    script.write_text(CLI)
    args = [a if a != "synthetic:20" else f"wds:{shards}" for a in ARGS]
    for procs, cache in ((1, "one"), (2, "two")):
        cmd = [sys.executable, str(script), *args]
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={procs}", str(script), *args]  # fmt: skip
        run = subprocess.run(cmd, env=_env(tmp_path / cache), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    meta = zarr.open_group(str(next((tmp_path / "two").glob("*/*.zarr")))).attrs["probekit"]
    assert meta["processes"] == 2  # type: ignore[index]
