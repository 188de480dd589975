"""The pixel cache (decode once, shared by backbones of one geometry) and device-side decoding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import probekit
from probekit.cache.meta import StoreMeta
from probekit.cache.pixels import PixelSource, PixelStore
from probekit.cache.store import open_store
from probekit.datasets import load_dataset
from probekit.errors import ProbekitError
from probekit.extraction import DeviceCrop, default_workers, geometry_transform, pixels, square
from probekit.extraction.loop import Runner
from probekit.extraction.pixels import build_pixel_store
from probekit.extraction.sources import (
    EncodedSource,
    ImageSource,
    decode_on_device,
    pass_batch,
)
from probekit.specs import ModelSpec
from probekit.triaging.plan import _pixel_size


@pytest.fixture
def jpeg_folder(tmp_path: Path) -> Path:
    """Smooth photo-like JPEGs of mixed sizes (2 classes, train 10 + test 5 each), one PNG."""
    rng = np.random.default_rng(0)
    root = tmp_path / "jpegs"
    for split, n in (("train", 10), ("test", 5)):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                h, w = 120 + 13 * i, 170 - 9 * i
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.stack([xx * (1 + c), yy * 2, (xx + yy) * (2 - c)], -1) % 256
                noise = rng.integers(0, 40, size=(h, w, 3))
                img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
                img.save(d / f"{i}.{'png' if (split, i) == ('test', 0) else 'jpg'}", quality=92)
    return root


def _features(path: str) -> dict[str, np.ndarray]:
    st = open_store(path)
    return {f"{s}:{n}": st.features(s, n) for s in st.splits for n in st.feature_names}


def test_pixel_cache_gives_identical_features_and_is_shared(
    jpeg_folder: Path, tmp_path: Path
) -> None:
    spec = f"imagefolder:{jpeg_folder}"
    kw = dict(random_init=True, quiet=True, pool="mean", layers="last2", chunk_rows=8)
    plain = probekit.extract("test_vit", spec, cache_dir=tmp_path / "a", **kw)
    cached = probekit.extract("test_vit", spec, cache_dir=tmp_path / "b", pixel_cache=True, **kw)
    assert plain.pixels == "decoded" and cached.pixels.startswith("from the pixel cache (built")
    a, b = _features(plain.store_path), _features(cached.store_path)
    assert a.keys() == b.keys()
    for k in a:  # the same uint8 pixels in, so the same numbers out
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # a second backbone with the same geometry (bicubic, 160 px, crop 0.95) reads the pixels
    other = probekit.extract(
        "test_convnext", spec, cache_dir=tmp_path / "b", pixel_cache=True, **kw
    )
    assert other.pixels == "from the pixel cache"
    assert len(list((tmp_path / "b").glob("*/pixels/*.zarr"))) == 1
    # another geometry (bilinear) gets its own pixel store
    probekit.extract("test_resnet", spec, cache_dir=tmp_path / "b", pixel_cache=True, **kw)
    assert len(list((tmp_path / "b").glob("*/pixels/*.zarr"))) == 2
    # pixel stores are not feature stores: `ls` does not list them
    assert len(probekit.list_stores(tmp_path / "b")) == 3


def test_one_pixel_cache_serves_every_geometry_cut_on_the_device(
    jpeg_folder: Path, tmp_path: Path
) -> None:
    spec = f"imagefolder:{jpeg_folder}"
    kw = dict(random_init=True, quiet=True, pool="mean", layers="last2", chunk_rows=8)
    plain = probekit.extract("test_vit", spec, cache_dir=tmp_path / "a", **kw)
    # test_vit resizes to 168 px (bicubic), then crops 160: from 168 px squares that is a crop
    # alone, the same pixels, so the same features
    same = probekit.extract("test_vit", spec, cache_dir=tmp_path / "b", pixel_size=168, **kw)
    assert same.pixels.startswith("from the pixel cache of 168 px squares, cut on the device")
    a, b = _features(plain.store_path), _features(same.store_path)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # from larger squares the crop is resized too: close, not equal; a store of its own
    big = probekit.extract("test_vit", spec, cache_dir=tmp_path / "c", pixel_size=200, **kw)
    assert "of 200 px squares, cut and resized on the device (built now" in big.pixels
    assert big.store_path != same.store_path
    c = _features(big.store_path)
    for k in a:
        cos = (a[k] * c[k]).sum(1) / np.linalg.norm(a[k], axis=1) / np.linalg.norm(c[k], axis=1)
        assert cos.min() > 0.99 and not np.array_equal(a[k], c[k]), k
    # another geometry (bilinear) reads the same squares: one pixel store for both
    other = probekit.extract("test_resnet", spec, cache_dir=tmp_path / "c", pixel_size=200, **kw)
    assert other.pixels == "from the pixel cache of 200 px squares, cut and resized on the device"
    assert len(list((tmp_path / "c").glob("*/pixels/*.zarr"))) == 1
    inputs = {s.path: s.input for s in probekit.list_stores(tmp_path / "c")}
    assert inputs[big.store_path] == "160px from 200px squares"
    inputs = {s.path: s.input for s in probekit.list_stores(tmp_path / "a")}
    assert inputs[plain.store_path] == "160px"
    with pytest.raises(ProbekitError, match="smaller than test_vit's own resize"):
        probekit.extract("test_vit", spec, cache_dir=tmp_path / "c", pixel_size=160, **kw)


@pytest.mark.parametrize(("name", "side"), [("test_vit", 200), ("test_resnet", 240)])
def test_device_crop_is_close_to_the_models_own_resize(
    jpeg_folder: Path, name: str, side: int
) -> None:
    """The crop cut and resized from a larger square against timm's transform on the image:
    a few levels apart on average (two resamplings, an offset of under a pixel); the
    model's crop without its scale (or off centre by 3 px) is far off."""
    import timm

    ds = load_dataset(f"imagefolder:{jpeg_folder}")
    model = timm.create_model(name)
    geo = geometry_transform(timm.data.resolve_data_config({}, model=model))
    crop, sq = geo.cut_from(side), square(side)
    assert crop is not None and crop.size == 160 and crop.cut == round(160 * side / 168)

    def error(cut: object) -> float:
        errs = []
        for i in range(len(ds.splits["train"])):
            img = ds.load_image("train", i)
            want = torch.from_numpy(np.array(geo(img))).permute(2, 0, 1)[None].float()
            got = cut(torch.from_numpy(np.array(sq(img))).permute(2, 0, 1)[None])  # type: ignore[operator]
            assert got.shape == want.shape
            errs.append(float((got.float() - want).abs().mean()))
        return float(np.mean(errs))

    close = error(crop)
    unscaled = error(DeviceCrop(crop.size, crop.size, crop.mode))
    shifted = error(lambda x: crop(x[:, :, 3:, 3:]))  # the centre 1.5 px off on each axis
    assert close < 4.0 and unscaled > 3 * close and shifted > 1.5 * close, (
        close,
        unscaled,
        shifted,
    )


@pytest.mark.parametrize(
    ("mode", "pil"), [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)]
)
def test_device_crop_equals_pils_crop_and_resize(mode: str, pil: int) -> None:
    """The step alone, against PIL on the same square: noise (bicubic overshoots and must clamp
    as PIL does) and a smooth image, batched, within one level everywhere."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:200, 0:200]
    smooth = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    squares = np.stack([rng.integers(0, 256, (200, 200, 3), dtype=np.uint8), smooth])
    got = DeviceCrop(190, 160, mode)(torch.from_numpy(squares).permute(0, 3, 1, 2))
    assert got.dtype == torch.uint8 and got.shape == (2, 3, 160, 160)
    for img, out in zip(squares, got, strict=True):
        want = np.array(Image.fromarray(img).crop((5, 5, 195, 195)).resize((160, 160), pil))
        diff = np.abs(out.permute(1, 2, 0).numpy().astype(int) - want)
        assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    # a crop alone is exact, and cut at torchvision's CenterCrop offset
    cut = DeviceCrop(160, 160, mode)(torch.from_numpy(squares).permute(0, 3, 1, 2))
    assert torch.equal(cut.permute(0, 2, 3, 1), torch.from_numpy(squares[:, 20:180, 20:180]))


def test_triage_pixel_size_auto_is_the_largest_resize() -> None:
    specs = [ModelSpec("test_vit", random_init=True)]
    assert _pixel_size("auto", specs, None) == 168
    specs.append(ModelSpec("tf_efficientnet_lite0", random_init=True))
    assert _pixel_size("auto", specs, None) == 256  # 224 / 0.875
    # an input size asked for is evaluated with the protocol's ratio: 192 / 0.875
    assert _pixel_size("auto", specs[:1], 192) == 219
    assert _pixel_size("300", specs, None) == 300 and _pixel_size(None, specs, None) is None


def test_default_workers_follow_the_cores_and_what_else_runs(
    jpeg_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = ("decode", "cuda", "cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert [default_workers(j) for j in jobs] == [12, 10, 6]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks of torchrun share the host
    assert [default_workers(j) for j in jobs] == [3, 1, 1]
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)))
    assert [default_workers(j) for j in jobs] == [32, 32, 8]

    # extract: every core builds the pixel cache (nothing else runs), half of them beside a
    # model on the CPU; a number asked for is used for both
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    seen: list[tuple[str, int]] = []
    real_build, real_run = pixels.build_pixel_store, Runner.run

    def build(*args, **kw):  # type: ignore[no-untyped-def]
        seen.append(("build", kw["num_workers"]))
        return real_build(*args, **{**kw, "num_workers": 0})

    def run(self: Runner, *args, **kw):  # type: ignore[no-untyped-def]
        seen.append(("loop", self.workers))
        return real_run(self, *args, **kw)

    monkeypatch.setattr(pixels, "build_pixel_store", build)
    monkeypatch.setattr(Runner, "run", run)
    spec = f"imagefolder:{jpeg_folder}"
    kw = dict(random_init=True, quiet=True, device="cpu", pool="mean", layers="last1")
    probekit.extract("test_vit", spec, cache_dir=tmp_path / "a", pixel_cache=True, **kw)
    probekit.extract(
        "test_vit", spec, cache_dir=tmp_path / "b", pixel_cache=True, num_workers=0, **kw
    )
    assert seen == [("build", 12), ("loop", 6), ("build", 0), ("loop", 0)]


def test_pixel_store_holds_what_the_loader_gives_and_resumes(
    jpeg_folder: Path, tmp_path: Path
) -> None:
    ds = load_dataset(f"imagefolder:{jpeg_folder}")
    bb = probekit.create_backbone("test_vit", random_init=True)
    geo = geometry_transform(dict(bb.data_config))
    size = (160, 160)
    store, built, _ = build_pixel_store(
        ds, geo, geo.describe(), size, cache_dir=tmp_path, chunk_rows=4
    )
    assert built and store.is_complete
    n = len(ds.splits["train"])
    want = ImageSource(ds, "train", geo, size).__getitems__(list(range(n)))[0]
    got = np.asarray(store.array("train", "pixels")[:])
    np.testing.assert_array_equal(got, want.permute(0, 2, 3, 1).numpy())
    # a run killed after some chunks: flags reset (and pixels lost) for chunks 1 and 3
    done = store.array("train", "done")
    pix = store.array("train", "pixels")
    for c in (1, 3):
        done[c] = False
        pix[4 * c : 4 * c + 4] = 0
    store.update_meta(status="partial")
    again, built2, _ = build_pixel_store(
        ds, geo, geo.describe(), size, cache_dir=tmp_path, chunk_rows=4
    )
    assert built2 and again.path == store.path
    np.testing.assert_array_equal(np.asarray(again.array("train", "pixels")[:]), got)
    assert build_pixel_store(ds, geo, geo.describe(), size, cache_dir=tmp_path)[1] is False
    assert PixelStore.open(tmp_path / "nowhere.zarr") is None
    # the file reader (contiguous rows) and Zarr (any rows) agree; a chunk Zarr never wrote
    # (all fill value) reads as zeros
    src = PixelSource(store.path, "train")
    assert src.raw
    fast = src.__getitems__(list(range(2, 11)))[0].numpy()
    order = [10, 3, 2, 7, 5, 4, 9, 8, 6]
    slow = src.__getitems__(order)[0].numpy()
    np.testing.assert_array_equal(fast[[o - 2 for o in order]], slow)
    np.testing.assert_array_equal(fast.transpose(0, 2, 3, 1), got[2:11])
    (store.path / "train" / "pixels" / "c" / "1" / "0" / "0" / "0").unlink()
    assert not src.__getitems__([4, 5, 6, 7])[0].any()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision")  # its decoders work
def test_device_decode_matches_the_cpu_reader(jpeg_folder: Path) -> None:
    """The GPU decode path, run on the CPU device: nvJPEG's job done by libjpeg here."""
    from torchvision.io import ImageReadMode, decode_jpeg

    ds = load_dataset(f"imagefolder:{jpeg_folder}")
    bb = probekit.create_backbone("test_vit", random_init=True)
    geo = geometry_transform(dict(bb.data_config))
    idx = list(range(len(ds.splits["test"])))
    Path(ds.splits["test"].ids[1]).write_bytes(b"\xff\xd8\xff" + b"\0" * 64)
    source = EncodedSource(ds, "test")
    encoded, valid, reasons = source.__getitems__(idx)
    items = encoded.items()
    assert items[0].ndim == 3  # the PNG: decoded on the host, resized on the device
    assert items[2].ndim == 1  # a JPEG travels as bytes, all of a batch's in one tensor
    assert bytes(items[2].numpy()) == Path(ds.splits["test"].ids[2]).read_bytes()
    assert items[1].numel() == 0 and not valid[1] and reasons[1]
    # through a worker process: one tensor of bytes, the same batch
    loader = torch.utils.data.DataLoader(
        source, batch_sampler=[idx], collate_fn=pass_batch, num_workers=1
    )
    moved, valid2, reasons2 = next(iter(loader))
    assert torch.equal(moved.data, encoded.data) and list(moved.offsets) == encoded.offsets
    assert valid2.tolist() == valid.tolist() and reasons2 == reasons
    # what a CUDA loader's page-locking does to the batch's structure (pinning itself stubbed:
    # no CUDA here): still an Encoded with plain offsets, the same items
    from torch.utils.data._utils.pin_memory import pin_memory

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
        pinned, valid3, reasons3 = pin_memory((encoded, valid, reasons))
    assert type(pinned) is type(encoded) and pinned.offsets == encoded.offsets
    assert all(torch.equal(a, b) for a, b in zip(pinned.items(), items, strict=True))
    assert valid3.tolist() == valid.tolist() and reasons3 == reasons
    got, ok, why = decode_on_device(encoded, valid, reasons, geo, (160, 160), "cpu")
    want, ok_cpu, _ = ImageSource(ds, "test", geo, (160, 160)).__getitems__(idx)
    assert ok.tolist() == ok_cpu.tolist() and not ok[1] and why[1]
    diff = (got.float() - want.float()).abs()[ok]
    # tensor and PIL resizes round differently: close, not equal
    assert diff.mean() < 1.5 and torch.quantile(diff.flatten(), 0.99) <= 8
    # images of one size share one geometry call: exactly what the geometry gives each alone
    alone = {
        i: decode_jpeg(t, mode=ImageReadMode.RGB) if t.ndim == 1 else t
        for i, t in enumerate(items)
        if ok[i]
    }
    assert len({tuple(img.shape) for img in alone.values()}) < len(alone)  # sizes shared
    for i, img in alone.items():
        assert torch.equal(got[i], geo(img)), i
    assert not got[1].any()


def test_decode_gpu_needs_cuda(jpeg_folder: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(probekit.ProbekitError, match="needs a CUDA device"):
        probekit.extract(
            "test_vit", f"imagefolder:{jpeg_folder}", random_init=True, decode="gpu", quiet=True
        )


@pytest.mark.parametrize("cache", [dict(pixel_cache=True), dict(pixel_size=200)])
def test_decode_gpu_and_the_pixel_cache_exclude_each_other(jpeg_folder: Path, cache: dict) -> None:
    with pytest.raises(probekit.ProbekitError, match="use one of them"):
        probekit.extract(
            "test_vit", f"imagefolder:{jpeg_folder}", random_init=True, decode="gpu", **cache
        )


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """Real photos as big JPEGs (4 of 1200x900: drafts apply) and small ones (4 of 300x220)."""
    from skimage import data as skdata

    photos = [skdata.coffee(), skdata.chelsea(), skdata.astronaut(), skdata.rocket()]
    root = tmp_path / "photos"
    for i, p in enumerate(photos):
        for split, size in (("big", (1200, 900)), ("small", (300, 220))):
            d = root / split / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(p).resize(size, Image.Resampling.BICUBIC).save(
                d / f"{i}.jpg", quality=92
            )
    return root


def test_read_image_drafts_only_jpegs_at_least_twice_the_target(photo_folder: Path) -> None:
    from probekit.datasets import read_image

    big = next((photo_folder / "big").rglob("*.jpg"))
    assert read_image(big).size == (1200, 900)
    assert read_image(big, draft=200).size == (300, 225)  # 1/4: the short side stays >= 200
    assert read_image(big, draft=300).size == (600, 450)  # 1/2 (1/4 would be 225 < 300)
    assert read_image(big, draft=451).size == (1200, 900)  # under twice the target: exact
    small = next((photo_folder / "small").rglob("*.jpg"))
    assert read_image(small, draft=110).size == (150, 110)
    assert np.array_equal(np.asarray(read_image(small, draft=111)), np.asarray(read_image(small)))
    png = photo_folder / "x.png"
    Image.open(big).save(png)
    assert read_image(png, draft=100).size == (1200, 900)  # only JPEGs are drafted
    # a geometry's drafts keep its resize target and key a pixel cache of their own
    sq = square(256).drafted()
    assert sq.draft == 256 and sq.describe() != square(256).describe() and square(256).draft is None
    squash = geometry_transform({"input_size": (3, 64, 64), "crop_pct": 1.0, "crop_mode": "squash"})
    assert squash.drafted() is squash  # not a short-side resize: decoded exactly


def test_draft_decoding_is_close_to_exact_and_stored_apart(
    photo_folder: Path, tmp_path: Path
) -> None:
    """decode='draft': features close to the exact decoding's (cosine), another store and
    another pixel cache; where no JPEG is twice the target, the same features as exact."""
    kw = dict(random_init=True, quiet=True, layers="last", pool="mean", cache_dir=tmp_path / "c")
    feats = {}
    for split in ("big", "small"):
        spec = f"imagefolder:{photo_folder / split}"
        exact = probekit.extract("test_vit", spec, **kw)
        draft = probekit.extract("test_vit", spec, decode="draft", **kw)
        assert draft.store_path != exact.store_path
        assert "draft-decoded" in StoreMeta.read(Path(draft.store_path)).input_text()
        feats[split] = (_features(exact.store_path), _features(draft.store_path))
        # through the pixel cache: the same stores, the same features; the drafts' pixel cache
        # is not the exact decoding's
        for decode, res in (("draft", draft), ("cpu", exact)):
            again = probekit.extract(
                "test_vit", spec, decode=decode, pixel_cache=True, overwrite=True, **kw
            )
            assert "(built now" in again.pixels and again.store_path == res.store_path
            for k, v in _features(again.store_path).items():
                np.testing.assert_array_equal(v, feats[split][0 if decode == "cpu" else 1][k])
    for k, a in feats["small"][0].items():  # 220 px short sides: never twice test_vit's resize
        np.testing.assert_array_equal(feats["small"][1][k], a)
    for k, a in feats["big"][0].items():
        b = feats["big"][1][k].astype(np.float64)
        a = a.astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert not np.array_equal(a, b) and cos.min() > 0.99, (k, cos)
    with pytest.raises(ProbekitError, match="draft"):
        probekit.extract("test_vit", f"imagefolder:{photo_folder}", decode="fast", **kw)


def test_a_damaged_pixel_chunk_is_decoded_again_never_read_as_zeros(
    jpeg_folder: Path, tmp_path: Path
) -> None:
    """A deleted pixel chunk is found before the store is read and decoded again; a chunk
    overwritten with another's bytes (the right size) is found by verify's crc32, marked, and
    decoded again by the next extraction: the features are those of a clean store."""
    spec = f"imagefolder:{jpeg_folder}"
    kw = dict(random_init=True, quiet=True, pool="mean", layers="last2", chunk_rows=8)
    clean = probekit.extract("test_vit", spec, cache_dir=tmp_path / "a", **kw)
    want = _features(clean.store_path)
    first = probekit.extract("test_vit", spec, cache_dir=tmp_path / "b", pixel_cache=True, **kw)
    (pixel_path,) = (tmp_path / "b").glob("*/pixels/*.zarr")
    ps = PixelStore.open(pixel_path)
    assert ps is not None and probekit.verify(pixel_path).ok
    chunk = ps.chunk_file("train", 0)
    original = chunk.read_bytes()
    chunk.unlink()
    assert ps.damaged_chunks() == {"train": [0]}
    again = probekit.extract(
        "test_vit", spec, cache_dir=tmp_path / "b", pixel_cache=True, overwrite=True, **kw
    )
    assert "built" in again.pixels and chunk.read_bytes() == original
    for k, v in _features(again.store_path).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    changed = bytearray(original)
    changed[1000:1100] = bytes(100)  # the right size, other pixels
    chunk.write_bytes(bytes(changed))
    assert ps.damaged_chunks() == {}  # not seen without reading
    found = probekit.verify(pixel_path)
    assert not found.ok and "train/pixels chunks [0]" in found.summary()
    fixed = probekit.verify(pixel_path, repair=True)
    assert fixed.ok and "for decoding again" in fixed.summary()
    probekit.extract(
        "test_vit", spec, cache_dir=tmp_path / "b", pixel_cache=True, overwrite=True, **kw
    )
    assert chunk.read_bytes() == original and probekit.verify(pixel_path).ok
    assert first.store_path == again.store_path
