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
from probekit.datasets import load_dataset
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


def test_masks_without_classes_txt_and_with_labels_beyond_8_bits(tmp_path: Path) -> None:
    """Without classes.txt an unreadable mask is its row's reason, never a traceback while the
    classes are counted; labels beyond 8 bits are a one-line error, never wrapped (257 -> 1)."""
    from probekit.datasets import load_dataset
    from probekit.errors import DatasetError

    root = _plain_seg(tmp_path / "seg")
    (root / "classes.txt").unlink()
    (root / "masks" / "im2.png").write_bytes(b"not a png")
    ds = load_dataset(f"seg:{root}")
    assert ds.class_names == ("0", "1", "2")  # counted on the readable masks
    res = probekit.extract("test_vit", f"seg:{root}", random_init=True, tokens="all", **SMALL)
    reasons = dict(probekit.open_store(res.store_path).invalid("train"))
    assert "im2.png cannot be read" in reasons[str(root / "images" / "im2.png")]
    wide = np.full((40, 48), 257, np.uint16)
    Image.fromarray(wide).save(root / "masks" / "im3.png")
    with pytest.raises(DatasetError, match=r"258 classes: probekit stores masks as 8-bit"):
        load_dataset(f"seg:{root}")


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

    from probekit.dense.linseg import _scores, train_seg_heads
    from probekit.probes.rows import Rows

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
    # with validation rows each head keeps the weights and batch-norm statistics of its best
    # epoch: scoring what came back gives exactly the mIoU and accuracy it was chosen by
    xv, mv = torch.from_numpy(rng.normal(size=(2, 10, 4 * d)).astype(np.float32)), masks[:10]
    kept = train_seg_heads(x, masks, c, grid, d, lrs, wds, **kw, x_val=xv, masks_val=mv)
    assert (kept.epoch >= 1).all() and (kept.epoch <= 3).all()
    miou, acc = _scores(kept, Rows.of(xv), mv, c, d)
    np.testing.assert_array_equal(miou, kept.val_miou)
    np.testing.assert_array_equal(acc, kept.val_acc)


def test_seg_confusions_equal_numpy_on_reference_predictions() -> None:
    import torch
    import torch.nn.functional as F

    from probekit.dense.linseg import SegHeads, _init
    from probekit.probes.rows import Rows
    from probekit.segmentation import image_confusions

    torch.manual_seed(1)
    d, c, grid, size, n = 4, 5, (2, 3), (9, 7), 6
    params = _init(1, 2, d, c, seed=0, device=torch.device("cpu"))
    with torch.no_grad():
        for v in params.values():
            v.add_(torch.randn_like(v))
    heads = SegHeads(
        params,
        torch.randn(1, 2, d),
        torch.rand(1, 2, d) + 0.5,
        grid,
        np.zeros((1, 2)),
        np.zeros((1, 2)),
        np.zeros((1, 2)),
    )
    x = torch.randn(1, n, 6 * d)
    masks = torch.randint(0, c, (n, *size), dtype=torch.uint8)
    masks[:, :, 0] = 255
    got = heads.confusions(Rows.of(x), masks, c, d, per_image=True)
    for g in range(2):
        bn, conv = _reference_head(heads.one(0, g), d, c)
        bn.eval()
        nchw = x[0].reshape(n, 6, d).transpose(1, 2).reshape(n, d, *grid)
        with torch.no_grad():
            pred = F.interpolate(conv(bn(nchw)), size=size, mode="bilinear").argmax(1)
        want = image_confusions(pred.numpy(), masks.numpy(), c)
        np.testing.assert_array_equal(got[0, g].numpy(), want)
        assert want.sum() == (masks != 255).sum().item()  # ignored pixels are not counted
    whole = heads.confusions(Rows.of(x), masks, c, d)
    np.testing.assert_array_equal(whole.numpy(), got.sum(2).numpy())


# --------------------------------------------------------------------------- dense kNN


def test_patch_labels_equal_a_cell_by_cell_count() -> None:
    import torch

    from probekit.dense.knn import patch_labels

    rng = np.random.default_rng(4)
    masks = rng.integers(0, 3, (2, 12, 10)).astype(np.uint8)
    masks[0, :4, :5] = 255  # the whole first cell of image 0 is ignored
    masks[1, 5:7] = 255
    got = patch_labels(torch.from_numpy(masks), (3, 2), 3).numpy()
    for i in range(2):
        for r in range(3):
            for col in range(2):
                cell = masks[i, 4 * r : 4 * r + 4, 5 * col : 5 * col + 5]
                scored = cell[cell != 255]
                want = (
                    np.bincount(scored, minlength=3) / len(scored) if len(scored) else np.zeros(3)
                )
                np.testing.assert_allclose(got[i, r * 2 + col], want, atol=1e-6)


def test_dense_knn_equals_brute_force_numpy() -> None:
    import torch
    import torch.nn.functional as F

    from probekit.dense.knn import TEMPERATURE, knn_distributions, predict_masks
    from probekit.neighbors.search import l2_normalize, search

    rng = np.random.default_rng(5)
    bank = l2_normalize(rng.normal(size=(40, 8)))
    labels = rng.dirichlet(np.ones(4), 40).astype(np.float32)
    queries = l2_normalize(rng.normal(size=(2 * 6, 8)))
    sims, idx = search(queries, bank, 7)
    dists = knn_distributions(sims, idx, torch.from_numpy(labels), [3, 7])
    full = queries @ bank.T
    for k in (3, 7):
        want = np.zeros((len(queries), 4))
        for q in range(len(queries)):
            top = np.argsort(-full[q])[:k]
            w = np.exp((full[q, top] - full[q, top].max()) / TEMPERATURE)
            want[q] = (w / w.sum()) @ labels[top]
        np.testing.assert_allclose(dists[k].numpy(), want, rtol=1e-4, atol=1e-5)
    pred = predict_masks(dists[3].reshape(2, 6, 4), (2, 3), (8, 9))
    maps = torch.from_numpy(
        dists[3].numpy().reshape(2, 6, 4).transpose(0, 2, 1).reshape(2, 4, 2, 3)
    )
    want_pred = F.interpolate(maps, size=(8, 9), mode="bilinear", align_corners=False).argmax(1)
    np.testing.assert_array_equal(pred.numpy(), want_pred.numpy())


# --------------------------------------------------------------------------- end to end


def test_dense_probes_from_a_store(tmp_path: Path) -> None:
    from probekit.segmentation import class_counts, mean_iou, pixel_accuracy

    res = probekit.extract(
        "test_vit", "digit-scenes:48", random_init=True, layers="last", tokens="all", **SMALL
    )
    out = probekit.probe(
        res.store_path, method="linseg,dense-knn", seg_epochs=2, device="cpu", out=tmp_path
    )
    store = probekit.open_store(res.store_path)
    n_test = len(np.flatnonzero(store.usable("test")))
    for m in ("linseg", "dense-knn"):
        recs = {r.metric: r for r in out.records if r.method == m}
        assert set(recs) == {"val_miou", "miou", "pixel_acc"}
        miou, acc = recs["miou"], recs["pixel_acc"]
        assert miou.split == "test" and miou.n == n_test and miou.feature == "layer5/tokens"
        for r in (miou, acc):
            lo, hi = r.extra["ci95"]
            assert lo <= r.value <= hi
        counts = np.array(miou.extra["class_counts"])  # (images, classes, 3)
        assert counts.shape == (n_test, 11, 3)
        total = counts.sum(0)
        tp, fp, fn = total[:, 0], total[:, 1], total[:, 2]
        present = tp + fp + fn > 0
        assert miou.value == pytest.approx((tp[present] / (tp + fp + fn)[present]).mean())
        assert acc.value == pytest.approx(tp.sum() / (tp + fn).sum())
        assert out.selected[m]["val_miou"] == pytest.approx(recs["val_miou"].value)
    assert out.path is not None and Path(out.path).is_file()
    assert class_counts(np.ones((2, 3, 3))).shape == (2, 3, 3)
    assert mean_iou(np.eye(3)) == 1.0 and pixel_accuracy(np.eye(3)) == 1.0
    rows = out.dense_table()
    assert [r[0] for r in rows[1:]] == ["linseg", "dense-knn"]


def test_dense_probe_errors_are_one_line() -> None:
    from typer.testing import CliRunner

    from probekit.cli import app

    plain = probekit.extract("test_vit", "synthetic:2", random_init=True, tokens="all", **SMALL)
    with pytest.raises(probekit.ProbekitError, match="no masks"):
        probekit.probe(plain.store_path, method="linseg")
    run = CliRunner().invoke(app, ["probe", plain.store_path, "--method", "dense-knn"])
    assert run.exit_code == 1 and "no masks" in run.output and "Traceback" not in run.output
    seg = probekit.extract("test_vit", "digit-scenes:12", random_init=True, **SMALL)
    with pytest.raises(probekit.ProbekitError, match="no token arrays"):
        probekit.probe(seg.store_path, method="linseg")
    with pytest.raises(probekit.ProbekitError, match="dense_ks"):
        probekit.probe(seg.store_path, method="dense-knn", dense_ks=[0])


def test_paired_dense_delta_matches_direct_computation() -> None:
    from probekit.segmentation import class_counts, image_confusions, mean_iou, paired_dense_delta

    rng = np.random.default_rng(6)
    truth = rng.integers(0, 4, (30, 8, 8))
    good = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, 4, truth.shape))
    bad = np.where(rng.random(truth.shape) < 0.4, truth, rng.integers(0, 4, truth.shape))
    a, b = image_confusions(good, truth, 4), image_confusions(bad, truth, 4)
    out = paired_dense_delta(class_counts(a), class_counts(b), n_boot=300)
    delta, lo, hi = out["miou"]
    assert delta == pytest.approx(mean_iou(a.sum(0)) - mean_iou(b.sum(0)))
    assert 0 < lo <= delta <= hi
    same = paired_dense_delta(class_counts(a), class_counts(a), n_boot=50)
    assert same["miou"] == (0.0, 0.0, 0.0)


def test_triage_ranks_backbones_on_a_dense_task(tmp_path: Path) -> None:
    import csv

    from probekit.segmentation import paired_dense_delta
    from probekit.triaging import triage

    result = triage(
        "test_vit@random,test_resnet@random",
        "digit-scenes:48,digits",
        methods="knn,linseg,dense-knn",
        layers="last",
        img_size=64,
        reference="test_vit@random",
        out=tmp_path / "r",
        log=None,
        quiet=True,
    )
    rep = result.report
    assert not rep.errors, [e.extra for e in rep.errors]
    # dense methods on the dense task only, kNN on both (digit-scenes' image labels vary)
    assert {(c.task, c.method, c.metric) for c in rep.cells} == {
        ("digits", "knn", "top1"),
        ("digit-scenes:48", "knn", "top1"),
        *(
            ("digit-scenes:48", m, k)
            for m in ("linseg", "dense-knn")
            for k in ("miou", "pixel_acc")
        ),
    }
    assert rep.methods_of("digit-scenes:48", "miou") == ["linseg", "dense-knn"]
    # the reference delta's paired interval comes from the two entries' per-image counts
    d = next(x for x in rep.deltas if x["method"] == "linseg" and x["metric"] == "miou")
    a = rep.cell("digit-scenes:48", "linseg", "test_resnet@random", "miou")
    b = rep.cell("digit-scenes:48", "linseg", "test_vit@random", "miou")
    assert a is not None and b is not None and a.outcomes and b.outcomes
    want = paired_dense_delta(
        np.array(a.outcomes["class_counts"]), np.array(b.outcomes["class_counts"])
    )
    assert d["delta"] == pytest.approx(a.value - b.value) == pytest.approx(want["miou"][0])
    assert d["delta_ci95"] == pytest.approx(list(want["miou"][1:]))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## digit-scenes:48: miou" in md and "linseg (miou)" in md
    with open(tmp_path / "r" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    dense = {(r["method"], r["metric"]) for r in rows if r["task"] == "digit-scenes:48"}
    assert {("linseg", "miou"), ("dense-knn", "pixel_acc")} <= dense
    curves = {k for k in rep.curves if k[1] == "linseg"}
    assert curves  # validation mIoU by layer
    # tokens were asked for by dense probes alone: stored for the dataset with masks only
    stores = {r.dataset: r.extra["store"] for r in result.records if r.kind == "extract"}
    assert probekit.open_store(stores["digit-scenes:48"]).token_names
    assert not probekit.open_store(stores["digits"]).token_names


def _split_seg(root: Path, tops: tuple[int, int] = (3, 3)) -> Path:
    """images/{train,test} + masks/ (labels below tops[0] in train, tops[1] in test)."""
    rng = np.random.default_rng(4)
    for split, n, top in (("train", 8, tops[0]), ("test", 4, tops[1])):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"im{i}.png")
            labels = rng.integers(0, top, (40, 48)).astype(np.uint8)
            Image.fromarray(labels, mode="L").save(root / "masks" / split / f"im{i}.png")
    (root / "classes.txt").write_text("sky\ngrass\nroad\n")
    return root


def test_verify_names_a_mask_label_beyond_the_classes(tmp_path: Path) -> None:
    """A mask chunk rewritten with label 99 (3 classes) decodes, but verify names it, and the
    dense probes' reader refuses it."""
    import zarr

    root = _split_seg(tmp_path / "seg")
    res = probekit.extract("test_vit", f"seg:{root}", random_init=True, tokens="all", **SMALL)
    assert probekit.verify(res.store_path).ok
    arr = zarr.open_array(str(Path(res.store_path) / "train/masks"), mode="r+")
    mask = arr[0]
    mask[0, 0] = 99
    arr[0] = mask
    found = probekit.verify(res.store_path)
    assert not found.ok and "train/masks chunks (0,) (holds values" in found.summary()
    # the dense probes' reader refuses it too, in one line, never a traceback or a number
    for method in ("linseg", "dense-knn"):
        with pytest.raises(StoreError, match=r"train/masks hold label 99, beyond the 3 classes"):
            probekit.probe(res.store_path, method=method, write=False)
    assert probekit.verify(res.store_path, repair=True).ok
    probekit.probe(res.store_path, method="dense-knn", write=False)


def test_verify_finds_a_token_shard_or_mask_shard_copied_over_another(tmp_path: Path) -> None:
    """Sharded arrays too: train's shard of chunk 0 copied over chunk 1's (4 rows each, both
    valid files) opens and decodes, but its crc32 is not the one recorded for chunk 1; verify
    names that chunk of that array, and a repair gives back the same dense kNN numbers."""
    root = _split_seg(tmp_path / "seg")
    small = {**SMALL, "chunk_rows": 4}
    res = probekit.extract("test_vit", f"seg:{root}", random_init=True, tokens="all", **small)
    store = Path(res.store_path)
    clean = probekit.probe(res.store_path, method="dense-knn", dense_ks=[3], write=False)
    tokens = probekit.open_store(store).token_names[-1]
    for array in (tokens, "masks"):
        shard = store / "train" / array / "c"
        (shard / "1/0/0").write_bytes((shard / "0/0/0").read_bytes())
        found = probekit.verify(res.store_path)
        assert [(d["array"], d["chunks"], d["reason"]) for d in found.report["damage"]] == [
            (array, (1,), "values differ from those written (crc32)")
        ]
        assert probekit.verify(res.store_path, repair=True).ok
    again = probekit.probe(res.store_path, method="dense-knn", dense_ks=[3], write=False)
    assert [r.value for r in again.records] == [r.value for r in clean.records]


def test_a_test_class_without_train_pixels_is_warned(tmp_path: Path) -> None:
    """As classification says a test class with no train image, the dense probes say a test
    class with no train pixel: never predicted, its IoU is 0."""
    from probekit.errors import ProbekitWarning

    root = _split_seg(tmp_path / "seg", tops=(2, 3))
    res = probekit.extract("test_vit", f"seg:{root}", random_init=True, tokens="all", **SMALL)
    with pytest.warns(ProbekitWarning, match=r"1 test classes have no train pixels \('road'\)"):
        out = probekit.probe(res.store_path, method="dense-knn", dense_ks=[3], write=False)
    (miou,) = [r for r in out.records if r.metric == "miou"]
    assert any("no train pixels" in w for w in miou.extra["warnings"])
