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


# --------------------------------------------------------------------------- linear segmentation


def _reference_head(heads, d: int, n_classes: int):  # type: ignore[no-untyped-def]
    """`torch.nn` modules holding head (0, 0): BatchNorm2d + a 1x1 Conv2d."""
    import torch

    p = {k: v[0, 0].detach() for k, v in heads.params.items()}
    bn, conv = torch.nn.BatchNorm2d(d), torch.nn.Conv2d(d, n_classes, 1)
    with torch.no_grad():
        bn.weight.copy_(p["gamma"])
        bn.bias.copy_(p["beta"])
        bn.running_mean.copy_(heads.running_mean[0, 0])
        bn.running_var.copy_(heads.running_var[0, 0])
        conv.weight.copy_(p["weight"][:, :, None, None])
        conv.bias.copy_(p["bias"])
    return bn, conv


def test_seg_logits_and_gradients_equal_batchnorm_conv_and_interpolate() -> None:
    import torch
    import torch.nn.functional as F

    from probekit.dense.linseg import SegHeads, _batch_stats, _init

    torch.manual_seed(0)
    d, c, grid, size = 6, 4, (3, 5), (17, 23)
    params = _init(1, 1, d, c, seed=3, device=torch.device("cpu"))
    with torch.no_grad():
        for v in params.values():
            v.add_(torch.randn_like(v) * 0.3)
    heads = SegHeads(
        params,
        torch.randn(1, 1, d),
        torch.rand(1, 1, d) + 0.5,
        grid,
        np.zeros((1, 1)),
        np.zeros((1, 1)),
        np.zeros((1, 1)),
    )
    x = torch.randn(1, 3, grid[0] * grid[1], d)  # (L, B, T, D)
    nchw = x[0].transpose(1, 2).reshape(3, d, *grid)
    bn, conv = _reference_head(heads, d, c)
    # evaluation: running statistics
    bn.eval()
    want = F.interpolate(conv(bn(nchw)), size=size, mode="bilinear", align_corners=False)
    got = heads.logits(x, size)[0, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # training: the batch's statistics, and the gradients of the loss ignoring 255
    bn.train()
    target = torch.randint(0, c, (3, *size))
    target[:, :2] = 255
    ref = F.interpolate(conv(bn(nchw)), size=size, mode="bilinear", align_corners=False)
    F.cross_entropy(ref, target, ignore_index=255).backward()
    mean, var, unbiased = _batch_stats(x)
    out = heads.logits(x, size, mean, var)[0, 0]
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    loss = F.cross_entropy(out, target, ignore_index=255)
    grads = torch.autograd.grad(loss, [params[k] for k in ("gamma", "beta", "weight", "bias")])
    for g, w in zip(grads, (bn.weight, bn.bias, conv.weight, conv.bias), strict=True):
        torch.testing.assert_close(g[0, 0], w.grad.reshape(g[0, 0].shape), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(unbiased[0, 0], nchw.var((0, 2, 3)))  # what BN's running var takes


def test_batched_seg_heads_equal_heads_trained_one_by_one() -> None:
    import torch

    from probekit.dense.linseg import train_seg_heads

    rng = np.random.default_rng(0)
    n, grid, d, c = 24, (2, 2), 5, 3
    x = torch.from_numpy(rng.normal(size=(2, n, 4 * d)).astype(np.float32))  # two features
    masks = torch.from_numpy(rng.integers(0, c, (n, 6, 6)).astype(np.uint8))
    masks[:, 0] = 255
    lrs, wds = [1e-2, 3e-2], [1e-4, 0.1]
    # (no validation: a pixel's argmax flips with the last float bit, and so may an epoch's
    # mIoU; selection is tested on a real probe below)
    kw = {"epochs": 3, "batch_size": 8, "seed": 1}
    both = train_seg_heads(x, masks, c, grid, d, lrs, wds, **kw)
    for li in range(2):
        for gi, (lr, wd) in enumerate((a, b) for a in lrs for b in wds):
            alone = train_seg_heads(x[li : li + 1], masks, c, grid, d, [lr], [wd], **kw)
            one = both.one(li, gi)
            for k, v in alone.params.items():
                torch.testing.assert_close(one.params[k], v, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(one.running_var, alone.running_var)
