"""Dense probes end to end: masks in the store (every image path, bad masks, resume), the
linear segmentation and dense kNN probes against plain references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
from conftest import CLI, assert_same_store, faulty
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

import probekit
from probekit.data import load_dataset
from probekit.errors import InvalidImageError, StoreError

SMALL = {"chunk_rows": 8, "batch_size": 4, "num_workers": 0, "quiet": True}


def _nearest_reference(model: str, mask: np.ndarray) -> np.ndarray:
    """The mask through timm's own eval transform of `model` with nearest interpolation, as
    an image of grey levels (an independent path from `Geometry.mask`)."""
    cfg = resolve_model_data_config(timm.create_model(model, pretrained=False))
    t = create_transform(**{**cfg, "interpolation": "nearest"}, is_training=False)
    steps = t.transforms[:-2]  # minus ToTensor, Normalize
    img = Image.fromarray(np.repeat(mask[..., None], 3, axis=2))
    for step in steps:
        img = step(img)
    return np.asarray(img)[..., 0]


@pytest.mark.parametrize("pixel_cache", [False, True])
def test_stored_masks_take_the_image_geometry_on_every_path(pixel_cache: bool) -> None:
    ds = load_dataset("digit-scenes:12")
    res = probekit.extract(
        "test_resnet",
        ds,
        random_init=True,
        layers="last",
        tokens="all",
        pixel_cache=pixel_cache,
        **SMALL,
    )
    store = probekit.open_store(res.store_path)
    assert store.mask_shape == (160, 160) and store.check().ok
    assert ds.masks is not None
    for split in ("train", "test"):
        got = store.masks(split)
        want = np.stack([_nearest_reference("test_resnet", m) for m in ds.masks[split]])
        np.testing.assert_array_equal(got, want)
        rows = np.array([1, 2])
        np.testing.assert_array_equal(store.masks(split, rows), want[rows])
    # a store without masks says so
    plain = probekit.extract("test_resnet", "synthetic:2", random_init=True, **SMALL)
    with pytest.raises(StoreError, match="no masks"):
        probekit.open_store(plain.store_path).masks("train")


def _plain_seg(root: Path, n: int = 6) -> Path:
    """images/ + masks/ pairs of generated images (labels 0-2)."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)).save(
            root / "images" / f"im{i}.png"
        )
        labels = rng.integers(0, 3, (40, 48)).astype(np.uint8)
        Image.fromarray(labels, mode="L").save(root / "masks" / f"im{i}.png")
    (root / "classes.txt").write_text("sky\ngrass\nroad\n")
    return root


def test_bad_masks_mark_their_rows_invalid_with_the_reason(tmp_path: Path) -> None:
    root = _plain_seg(tmp_path / "seg")
    Image.fromarray(np.zeros((30, 48), np.uint8), mode="L").save(root / "masks" / "im1.png")
    Image.fromarray(np.full((40, 48), 7, np.uint8), mode="L").save(root / "masks" / "im4.png")
    res = probekit.extract("test_vit", f"seg:{root}", random_init=True, tokens="all", **SMALL)
    store = probekit.open_store(res.store_path)
    reasons = dict(store.invalid("train"))
    assert set(reasons) == {str(root / "images" / "im1.png"), str(root / "images" / "im4.png")}
    assert "im1.png is 48x30, the image 48x40" in reasons[str(root / "images" / "im1.png")]
    assert "label 7, beyond the 3 classes" in reasons[str(root / "images" / "im4.png")]
    assert (store.masks("train")[[1, 4]] == 255).all()
    assert res.invalid == 2
    with pytest.raises(InvalidImageError, match=r"im1\.png is 48x30"):
        probekit.extract(
            "test_vit", f"seg:{root}", random_init=True, strict=True, overwrite=True, **SMALL
        )


@pytest.mark.slow
def test_killed_mask_extraction_resumes_to_the_same_store(tmp_path: Path) -> None:
    args = [
        "extract",
        "-b",
        "test_vit",
        "-d",
        "digit-scenes:12",
        "--random-init",
        "--tokens",
        "2",
        "--layers",
        "last",
        "--chunk-rows",
        "4",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--quiet",
    ]
    clean_env = faulty({**os.environ, "PROBEKIT_CACHE": str(tmp_path / "clean"), "KILL_AT": "0"})
    subprocess.run([sys.executable, "-c", CLI, *args], env=clean_env, check=True)
    clean = str(next((tmp_path / "clean").glob("*/*.zarr")))
    env = faulty({**os.environ, "PROBEKIT_CACHE": str(tmp_path / "killed"), "KILL_AT": "2"})
    run = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True)
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    env["KILL_AT"] = "0"
    rerun = subprocess.run(
        [sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed (1 chunks were done)" in rerun.stdout
    path = str(next((tmp_path / "killed").glob("*/*.zarr")))
    assert_same_store(path, clean)
    assert probekit.open_store(path).masks("test").shape == (3, 160, 160)
