"""The CUDA path: run by benchmarks/gpu_check.sh on a GPU machine; skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import probekit
from probekit.cache.store import open_store

pytestmark = pytest.mark.gpu


@pytest.fixture
def jpegs(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 13)):
        for c in range(2):
            d = tmp_path / "j" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                yy, xx = np.mgrid[0:180, 0:240]
                base = np.stack([xx * (1 + c), yy * 2, xx + yy], -1) % 256
                px = np.clip(base + rng.integers(0, 30, (180, 240, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.jpg", quality=90)
    return tmp_path / "j"


def _feats(path: str) -> dict[str, np.ndarray]:
    st = open_store(path)
    return {
        f"{s}:{n}": st.features(s, n).astype(np.float64)
        for s in st.splits
        for n in st.feature_names
    }


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).min())


KW = dict(random_init=True, quiet=True, layers="last2", pool="cls,mean", dtype="float32")


@pytest.mark.parametrize("model", ["test_vit", "test_resnet", "test_convnext"])
def test_cuda_fp32_features_match_the_cpu(model: str, jpegs: Path, tmp_path: Path) -> None:
    spec = f"imagefolder:{jpegs}"
    cpu = probekit.extract(model, spec, device="cpu", cache_dir=tmp_path / "c", **KW)
    gpu = probekit.extract(
        model, spec, device="cuda", precision="fp32", cache_dir=tmp_path / "g", **KW
    )
    a, b = _feats(cpu.store_path), _feats(gpu.store_path)
    for k in a:  # TF32 may be on for convolutions: close, not equal
        np.testing.assert_allclose(b[k], a[k], rtol=2e-2, atol=2e-2, err_msg=k)


def test_compiled_bf16_matches_eager_with_one_graph(jpegs: Path, tmp_path: Path) -> None:
    """53 + 26 images at batch 16: partial last batches are padded, so nothing recompiles."""
    import torch._dynamo

    spec = f"imagefolder:{jpegs}"
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile fails the test
        comp = probekit.extract(
            "test_vit",
            spec,
            device="cuda",
            compile=True,
            batch_size=16,
            cache_dir=tmp_path / "a",
            **KW,
        )
    assert comp.compile_seconds > 0 and "compile" in comp.summary()
    eager = probekit.extract(
        "test_vit",
        spec,
        device="cuda",
        compile=False,
        batch_size=16,
        cache_dir=tmp_path / "b",
        **KW,
    )
    a, b = _feats(comp.store_path), _feats(eager.store_path)
    for k in a:
        assert _cos(a[k], b[k]) > 0.99, k


def test_gpu_decode_and_pixel_cache_match_cpu_decoding(jpegs: Path, tmp_path: Path) -> None:
    spec = f"imagefolder:{jpegs}"
    kw = dict(KW, device="cuda", precision="fp32")
    base = probekit.extract("test_vit", spec, cache_dir=tmp_path / "a", **kw)
    dev = probekit.extract("test_vit", spec, cache_dir=tmp_path / "b", decode="gpu", **kw)
    pix = probekit.extract("test_vit", spec, cache_dir=tmp_path / "c", pixel_cache=True, **kw)
    assert dev.pixels == "decoded on the GPU" and pix.pixels.startswith("from the pixel cache")
    # other pixels, other features: a store of their own, never a cache hit for CPU decoding
    assert Path(dev.store_path).name != Path(base.store_path).name
    assert Path(pix.store_path).name == Path(base.store_path).name
    a, b, c = _feats(base.store_path), _feats(dev.store_path), _feats(pix.store_path)
    for k in a:
        np.testing.assert_allclose(c[k], a[k], rtol=1e-4, atol=1e-4, err_msg=k)  # same pixels
        assert _cos(a[k], b[k]) > 0.98, k  # nvJPEG + tensor resize: close to PIL's


def test_shared_pixel_cache_cut_on_cuda_compiled_matches_the_cpu(
    jpegs: Path, tmp_path: Path
) -> None:
    """Crops cut and resized from 200 px squares inside the compiled graph on CUDA (fp32, so
    only TF32 and kernel order differ) against the same on the CPU, eager."""
    spec = f"imagefolder:{jpegs}"
    kw = dict(KW, pixel_size=200, batch_size=16)
    cpu = probekit.extract("test_vit", spec, device="cpu", cache_dir=tmp_path / "c", **kw)
    gpu = probekit.extract(
        "test_vit",
        spec,
        device="cuda",
        precision="fp32",
        compile=True,
        cache_dir=tmp_path / "g",
        **kw,
    )
    assert "of 200 px squares, cut and resized on the device (built now" in gpu.pixels
    a, b = _feats(cpu.store_path), _feats(gpu.store_path)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=2e-2, atol=2e-2, err_msg=k)


def test_knn_on_cuda_matches_faiss_cpu() -> None:
    from probekit.neighbors import l2_normalize, search

    rng = np.random.default_rng(0)
    db = l2_normalize(rng.standard_normal((5000, 64)).astype(np.float32))
    q = l2_normalize(rng.standard_normal((300, 64)).astype(np.float32))
    s1, i1 = search(q, db, 20, backend="faiss")
    s2, i2 = search(q, db, 20, backend="torch")
    np.testing.assert_allclose(s2, s1, atol=1e-4)
    assert (i1 == i2).mean() > 0.999


def test_probes_on_cuda_match_the_cpu(tmp_path: Path) -> None:
    res = {}
    for dev in ("cpu", "cuda"):
        ext = probekit.extract(
            "test_resnet",
            "synthetic:24",
            random_init=True,
            quiet=True,
            device="cpu",
            layers="last",
            pool="mean",
            cache_dir=tmp_path,
        )
        res[dev] = probekit.probe(ext.store_path, method="logreg", device=dev, write=False)
    assert res["cpu"].selected["logreg"]["C"] == res["cuda"].selected["logreg"]["C"]
    assert (
        abs(
            res["cpu"].value("top1", method="logreg", split="test")
            - res["cuda"].value("top1", method="logreg", split="test")
        )
        < 0.05
    )


def test_streamed_probes_on_cuda_match_held_ones(tmp_path: Path) -> None:
    """Linear heads and logreg on CUDA, features held on the device vs streamed to it."""
    ext = probekit.extract(
        "test_resnet",
        "synthetic:768",
        random_init=True,
        quiet=True,
        device="cpu",
        layers="all",
        pool="mean",
        cache_dir=tmp_path,
    )
    kw = {"device": "cuda", "write": False, "epochs": 3, "cs": [1e-3, 1e-2, 0.1, 1.0]}
    held = probekit.probe(ext.store_path, **kw)
    streamed = probekit.probe(ext.store_path, memory_mb=1, **kw)
    for m in ("linear", "logreg"):
        assert streamed.selected[m].get("features_streamed") is True
        assert "features_streamed" not in held.selected[m]
    assert streamed.selected["logreg"]["C"] == held.selected["logreg"]["C"]
    assert (
        abs(
            streamed.value("top1", method="logreg", split="test")
            - held.value("top1", method="logreg", split="test")
        )
        <= 0.01
    )


def test_pixel_reader_buffers_are_page_locked_and_reused_only_after_the_copy(
    jpegs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 4 with 2 reader threads: 20 train batches through 8 buffers, each read into
    again while the device still works on later batches; features equal the threads' read."""

    from probekit.cache.pixels import PixelSource
    from probekit.cache.reader import PixelReader

    spec = f"imagefolder:{jpegs}"
    kw = dict(KW, device="cuda", precision="fp32", batch_size=4, num_workers=1, pixel_cache=True)
    by_process = probekit.extract("test_vit", spec, cache_dir=tmp_path / "p", **kw)
    by_threads = probekit.extract(
        "test_vit", spec, cache_dir=tmp_path / "t", pixel_reader="threads", **kw
    )
    a, b = _feats(by_process.store_path), _feats(by_threads.store_path)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
    pixels = next((tmp_path / "p").glob("*/pixels/*.zarr"))
    with PixelReader() as reader:
        read = reader.read(PixelSource(pixels, "train"), [[0, 1, 2]], threads=1, hold=1, pin=True)
        images, _, _ = next(read)
        assert images.is_pinned()  # so copies to the device are asynchronous
        read.close()
