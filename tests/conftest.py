"""Shared fixtures: a private cache per test, generated image folders, tiny timm models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache root and an empty, offline Hugging Face cache."""
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    torch.set_num_threads(2)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def hide_modules(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    """Imports of modules named `prefix...` fail, as if the package were not installed."""
    import builtins
    import importlib

    real_import, real_import_module = builtins.__import__, importlib.import_module

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        level = args[3] if len(args) > 3 else kwargs.get("level", 0)
        if name.startswith(prefix) and level == 0:  # absolute imports only
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    def fake_import_module(name: str, package: str | None = None) -> object:
        if name.startswith(prefix):
            raise ImportError(name)
        return real_import_module(name, package)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(importlib, "import_module", fake_import_module)


def make_image(rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """PATH/<split>/<class>/<image>: 2 classes, train 6 + test 4 images, mixed sizes/formats."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                make_image(rng, (40 + 7 * i, 36 + 5 * i)).save(
                    d / f"{i}.{'png' if i % 2 else 'jpg'}"
                )
    return root


def write_store(
    path: Path,
    splits: dict[str, tuple[np.ndarray | dict[str, np.ndarray], np.ndarray]],
    class_names: list[str],
    feature: str = "head/embed",
    backbone: str = "arrays",
    chunk_rows: int | None = None,
    num_layers: int | None = None,
) -> Path:
    """A complete feature store holding given arrays: splits = {name: (x (N, D), y (N,))},
    x either one array (stored as `feature`) or {feature name: array}; `num_layers`: the
    model's (for lastN/POOL features)."""
    from probekit.cache.arrays import store_from_arrays

    def named(x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return x if isinstance(x, dict) else {feature: x}

    store_from_arrays(
        str(path),
        {s: (named(x), y) for s, (x, y) in splits.items()},
        class_names,
        backbone=backbone,
        chunk_rows=chunk_rows,
        num_layers=num_layers,
    )
    return path


# `python -c CLI <probekit CLI args>` with `env=faulty(...)`: the CLI, with the faults of
# tests/faults/sitecustomize.py (KILL_AT, KILL_RANK, FULL_AT) in it and in its writer process
CLI = """
import sys
from probekit.cli import main
sys.argv = ["probekit"] + sys.argv[1:]
main()
"""
FAULTS = str(Path(__file__).parent / "faults")


def faulty(env: dict[str, str]) -> dict[str, str]:
    """`env` with the fault injection of tests/faults on the Python path."""
    path = [FAULTS, *filter(None, [env.get("PYTHONPATH")])]
    return {**env, "PYTHONPATH": os.pathsep.join(path)}


def assert_child_dies_with_parent(module: str, cls: str) -> None:
    """Start helper `module.cls` in a process, SIGKILL that process: the helper must be gone (or
    a zombie for whoever inherited it to reap). It is told at once (the parent-death signal);
    the 60 s bound only ends the wait on a loaded machine, it is not what is tested."""
    parent_code = (
        f"import time\nfrom {module} import {cls}\nh = {cls}()\n"
        "print(h._proc.pid, flush=True)\ntime.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    with parent.stdout:
        child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(1200):
        try:
            if Path(f"/proc/{child}/stat").read_text().split(") ")[1][0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    pytest.fail("the helper process outlived its parent")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run where CUDA is; elsewhere they are skipped, never failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def arrays_of(path: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, arr in _walk(zarr.open_group(path, mode="r")):
        values = np.asarray(arr[:])
        out[key] = values.tobytes() if values.dtype.kind in "biuf" else values.tolist()
    return out


def _chunk_files(path: str) -> dict[str, bytes]:
    """Every file of the store but the root metadata (which holds timestamps)."""
    root = Path(path)
    return {
        str(f.relative_to(root)): f.read_bytes()
        for f in root.rglob("*")
        if f.is_file() and f.relative_to(root) != Path("zarr.json")
    }


def assert_same_store(path: str, clean: str) -> None:
    """`path` holds what an uninterrupted run wrote to `clean`: the same files, every array but
    the features byte for byte, and the features within 1 ulp: a CPU forward in another
    process rarely rounds a value apart (seen in CI, not reproduced on demand)."""
    got, want = arrays_of(path), arrays_of(clean)
    assert got.keys() == want.keys()
    features = {k for k, a in _walk(zarr.open_group(clean, mode="r")) if a.dtype.kind == "f"}
    assert features and all("/" in k for k in features)
    group, ref = zarr.open_group(path, mode="r"), zarr.open_group(clean, mode="r")
    for key in want:
        if key in features:
            np.testing.assert_array_max_ulp(np.asarray(group[key][:]), np.asarray(ref[key][:]), 1)
        else:
            assert got[key] == want[key], key
    files, ref_files = _chunk_files(path), _chunk_files(clean)
    assert files.keys() == ref_files.keys()  # the same chunks, no stray temporary files
    for name, data in files.items():
        if name.partition("/c/")[0] not in features:
            assert data == ref_files[name], name


def _walk(g: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
    out = []
    for name, node in g.members():
        if isinstance(node, zarr.Group):
            out += _walk(node, f"{prefix}{name}/")
        else:
            out.append((f"{prefix}{name}", node))
    return out
