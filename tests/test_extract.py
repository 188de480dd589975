from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr
from conftest import CLI, arrays_of, assert_same_store, faulty
from safetensors.torch import save_file
from timm.data import create_transform, resolve_model_data_config

import probekit
from probekit.datasets import load_dataset
from probekit.errors import InvalidImageError, ProbekitWarning, StoreError
from probekit.extraction import parse_pools

SMALL = {"chunk_rows": 8, "batch_size": 4, "num_workers": 0, "quiet": True}


def _reference(name: str, spec: str, split: str, layers: list[int], pools: list[str]) -> dict:
    """timm's own transform and forward in fp32, pooled with numpy: independent of probekit."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    transform = create_transform(**resolve_model_data_config(model))
    ds = load_dataset(spec)
    x = torch.stack([transform(ds.load_image(split, i)) for i in range(len(ds.splits[split]))])
    prefix = getattr(model, "num_prefix_tokens", 0) > 0
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for i in layers:
            kw = {"return_prefix_tokens": True} if prefix else {}
            (inter,) = model.forward_intermediates(
                x, indices=[i], norm=True, intermediates_only=True, **kw
            )
            spatial, tokens = inter if prefix else (inter, None)
            sp = spatial.numpy()
            mean = sp.mean(axis=(2, 3))
            for p in pools:
                if p == "mean":
                    out[f"layer{i}/mean"] = mean
                elif p == "gem":
                    out[f"layer{i}/gem"] = (np.clip(sp, 1e-6, None) ** 3).mean(axis=(2, 3)) ** (
                        1 / 3
                    )
                elif p == "cls":
                    out[f"layer{i}/cls"] = tokens[:, 0].numpy()
                elif p == "cls+mean":
                    out[f"layer{i}/cls+mean"] = np.concatenate([tokens[:, 0].numpy(), mean], 1)
        out["head/embed"] = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    return out


@pytest.mark.parametrize(
    ("name", "pools"),
    [
        ("test_vit", ["cls", "mean", "cls+mean", "gem"]),  # a ViT with a class token
        ("test_resnet", ["mean", "gem"]),  # a CNN
        ("test_convnext", ["mean"]),  # a hierarchical (staged) model
        ("test_maxvit", ["mean"]),  # a hierarchical transformer
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stored_features_equal_timm_forward(name: str, pools: list[str], dtype: str) -> None:
    spec = "synthetic:3"
    res = probekit.extract(
        name, spec, random_init=True, layers="all", pool=",".join(pools), dtype=dtype, **SMALL
    )  # type: ignore[arg-type]
    store = probekit.open_store(res.store_path)
    n_layers = store.meta["config"]["layers"]
    for split in ("train", "test"):
        ref = _reference(name, spec, split, n_layers, pools)
        assert set(ref) == set(store.feature_names)
        for key, want in ref.items():
            got = store.features(split, key)
            assert got.dtype == np.dtype(dtype)
            tol = 1e-4 if dtype == "float32" else 2e-3
            np.testing.assert_allclose(
                got.astype(np.float64),
                want,
                rtol=tol,
                atol=tol * (np.abs(want).max() + 1e-3),
                err_msg=key,
            )
        assert store.labels(split).tolist() == load_dataset(spec).splits[split].labels.tolist()


def test_rerun_is_a_cache_hit_and_other_configs_are_not(cache_dir: Path) -> None:
    first = probekit.extract("test_vit", "synthetic:2", random_init=True, pixel_cache=True, **SMALL)
    assert first.pixels.startswith("from the pixel cache (built now")
    mtimes = {p: p.stat().st_mtime_ns for p in Path(first.store_path).rglob("*")}
    again = probekit.extract("test_vit", "synthetic:2", random_init=True, **SMALL)
    assert again.cache_hit and again.store_path == first.store_path
    assert again.pixels == first.pixels  # how the store was made, not how it was looked up
    assert {p: p.stat().st_mtime_ns for p in Path(first.store_path).rglob("*")} == mtimes
    other = probekit.extract("test_vit", "synthetic:2", random_init=True, layers="last2", **SMALL)
    assert not other.cache_hit and other.store_path != first.store_path
    f32 = probekit.extract("test_vit", "synthetic:2", random_init=True, dtype="float32", **SMALL)
    assert f32.store_path not in (first.store_path, other.store_path)
    assert len(probekit.list_stores(cache_dir)) == 3


def test_store_opens_with_plain_zarr() -> None:
    res = probekit.extract("test_resnet", "synthetic:2", random_init=True, pool="mean", **SMALL)
    g = zarr.open_group(res.store_path, mode="r")
    meta = g.attrs["probekit"]
    assert meta["status"] == "complete" and meta["class_names"] == [f"class{i}" for i in range(4)]
    feats = g["train/head/embed"][:]
    assert feats.shape == (4, meta["feature_dims"]["head/embed"]) and feats.dtype == np.float16
    assert g["test/labels"][:].tolist() == [0, 1, 2, 3]
    assert all(g["train/done"][:])


def test_cls_pool_on_a_cnn_falls_back_to_mean() -> None:
    with pytest.warns(ProbekitWarning, match="needs a class token"):
        assert parse_pools("cls", has_class_token=False)[0] == ("mean",)
    assert parse_pools("cls,mean", has_class_token=False)[0] == ("mean",)  # silent: mean asked
    assert parse_pools("cls+mean,gem", has_class_token=True)[0] == ("cls+mean", "gem")


def test_invalid_images_are_listed_not_fatal(image_folder: Path) -> None:
    bad = image_folder / "train" / "cat"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    good = (image_folder / "train" / "dog" / "0.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    spec = f"imagefolder:{image_folder}"
    res = probekit.extract("test_resnet", spec, random_init=True, pool="mean", **SMALL)
    store = probekit.open_store(res.store_path)
    invalid = dict(store.invalid("train"))
    assert {Path(p).name for p in invalid} >= {"zero.jpg", "text.jpg"}
    assert all(reason for reason in invalid.values())
    assert res.invalid == len(invalid) and store.meta["invalid"] == len(invalid)
    valid = store.valid("train")
    feats = store.features("train", "head/embed")
    assert not feats[~valid].any() and feats[valid].any()
    with pytest.raises(InvalidImageError, match="strict"):
        probekit.extract(
            "test_resnet", spec, random_init=True, pool="mean", strict=True, overwrite=True, **SMALL
        )


def test_changed_dataset_is_detected(image_folder: Path) -> None:
    spec = f"imagefolder:{image_folder}"
    probekit.extract("test_resnet", spec, random_init=True, pool="mean", **SMALL)
    (image_folder / "test" / "cat" / "new.png").write_bytes(
        (image_folder / "test" / "cat" / "1.png").read_bytes()
    )
    with pytest.raises(StoreError, match="changed since"):
        probekit.extract("test_resnet", spec, random_init=True, pool="mean", **SMALL)
    res = probekit.extract(
        "test_resnet", spec, random_init=True, pool="mean", overwrite=True, **SMALL
    )
    assert probekit.open_store(res.store_path).meta["splits"]["test"] == 5


def test_fp16_overflow_is_kept_in_float32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    sd["layer4.0.downsample.2.weight"] *= (
        1e7  # the last stage and the pooled embedding blow past fp16's 65504
    )
    path = tmp_path / "huge.safetensors"
    save_file(sd, str(path))
    with pytest.warns(ProbekitWarning, match="overflows float16"):
        res = probekit.extract("test_resnet", "synthetic:2", weights=path, pool="mean", **SMALL)
    store = probekit.open_store(res.store_path)
    assert "head/embed" in store.meta["float32_features"]
    feats = store.features("train", "head/embed")
    assert feats.dtype == np.float32 and np.isfinite(feats).all() and np.abs(feats).max() > 65504
    assert store.features("train", "layer1/mean").dtype == np.float16  # untouched layers stay


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [1, 3, 5])
def test_killed_run_resumes_to_identical_arrays(tmp_path: Path, kill_at: int) -> None:
    args = [
        "extract",
        "-b",
        "test_vit",
        "-d",
        "synthetic:6",
        "--random-init",
        "--chunk-rows",
        "4",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--quiet",
    ]
    # the uninterrupted run: the same command in the same kind of process
    clean_env = faulty({**os.environ, "PROBEKIT_CACHE": str(tmp_path / "clean"), "KILL_AT": "0"})
    subprocess.run([sys.executable, "-c", CLI, *args], env=clean_env, check=True)
    clean_path = str(next((tmp_path / "clean").glob("*/*.zarr")))
    env = faulty(
        {**os.environ, "PROBEKIT_CACHE": str(tmp_path / "killed"), "KILL_AT": str(kill_at)}
    )
    run = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True)
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    path = next((tmp_path / "killed").glob("*/*.zarr"))
    with pytest.raises(StoreError, match="incomplete"):
        probekit.open_store(path)
    done_before = int(
        sum(zarr.open_group(str(path))[f"{s}/done"][:].sum() for s in ("train", "test"))
    )
    assert done_before == kill_at - 1  # the half-written chunk is not counted as done
    env["KILL_AT"] = "0"
    rerun = subprocess.run(
        [sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed ({done_before} chunks were done)" in rerun.stdout or done_before == 0
    assert_same_store(str(path), clean_path)


def test_store_interrupted_before_its_metadata_is_rebuilt(cache_dir: Path) -> None:
    first = probekit.extract("test_resnet", "synthetic:2", random_init=True, pool="mean", **SMALL)
    want = arrays_of(first.store_path)
    path = Path(first.store_path)
    shutil.rmtree(path)
    zarr.open_group(str(path), mode="w").create_array("junk", shape=(1,), dtype="int8")
    again = probekit.extract("test_resnet", "synthetic:2", random_init=True, pool="mean", **SMALL)
    assert not again.cache_hit and arrays_of(again.store_path) == want


@pytest.mark.network
def test_hub_backbone_extracts_when_online() -> None:
    res = probekit.extract("dino_vits16", "digits", layers="last", quiet=True)
    store = probekit.open_store(res.store_path)
    assert store.meta["weights"]["source"] == "hub"
    assert store.features("train", "layer11/cls").shape == (1437, 384)


# ten kills at named points of the work, in this order, each run resuming the last one's
TEN_KILLS = (
    ("KILL_POINT", "start"),  # before probekit is imported
    ("KILL_POINT", "model"),  # the model built, no store yet
    ("KILL_POINT", "store"),  # the store created, no chunk written
    ("KILL_AT", "1"),  # in the middle of the run's first chunk write
    ("KILL_AT", "2"),  # in the middle of its second (the first whole)
    ("KILL_AFTER", "1"),  # right after its first chunk is whole
    ("KILL_AT", "3"),
    ("KILL_AFTER", "2"),
    ("KILL_AT", "1"),
    ("KILL_POINT", "finish"),  # every chunk written, the store not yet marked complete
)


@pytest.mark.slow
def test_ten_kills_at_named_points_then_identical_store(tmp_path: Path) -> None:
    """SIGKILL the same extraction 10 times, each at a named point of the work (before the
    imports, after the model load, after the store's creation, in the middle of a chunk write
    and between chunks, before the store is marked complete), rerunning each time; then let it
    finish: the store is byte for byte a clean run's. The kills are triggered by the work
    reaching each point, never by a clock, so a loaded machine changes nothing."""
    args = [
        "extract",
        "-b",
        "test_vit",
        "-d",
        "synthetic:24",
        "--random-init",
        "--chunk-rows",
        "8",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--quiet",
    ]
    cmd = [sys.executable, "-c", CLI, *args]
    clean_env = faulty({**os.environ, "PROBEKIT_CACHE": str(tmp_path / "clean")})
    subprocess.run(cmd, env=clean_env, check=True, capture_output=True)
    clean_path = str(next((tmp_path / "clean").glob("*/*.zarr")))
    log = tmp_path / "kills.log"
    base = faulty({**os.environ, "PROBEKIT_CACHE": str(tmp_path / "killed"), "KILL_LOG": str(log)})
    for key, value in TEN_KILLS:
        run = subprocess.run(cmd, env={**base, key: value}, capture_output=True, text=True)
        assert run.returncode == -9, (key, value, run.stderr[-2000:])  # killed, every time
    said = {"KILL_POINT": "{}", "KILL_AT": "chunk:{}", "KILL_AFTER": "after:{}"}
    assert log.read_text().splitlines() == [said[k].format(v) for k, v in TEN_KILLS]
    final = subprocess.run(cmd, env=base, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    path = str(next((tmp_path / "killed").glob("*/*.zarr")))
    assert probekit.open_store(path).is_complete
    assert_same_store(path, clean_path)


def test_the_loop_reports_what_it_waited_for(image_folder: Path, monkeypatch) -> None:
    """Slow image loading shows as input waits, in the result, the store and the summary."""
    from probekit.extraction.sources import ImageSource

    load = ImageSource._one

    def slow(self: ImageSource, index: int) -> tuple:
        time.sleep(0.1)
        return load(self, index)

    monkeypatch.setattr(ImageSource, "_one", slow)
    res = probekit.extract(
        "test_resnet", f"imagefolder:{image_folder}", random_init=True, device="cpu", **SMALL
    )
    waits = res.waits
    assert set(waits) == {"input", "device", "storage"} and min(waits.values()) >= 0
    loop = res.images / res.images_per_s
    assert 0.1 * res.images <= waits["input"] + 0.01 and waits["input"] <= loop
    assert waits["device"] == 0.0  # a CPU computes in the loop's own thread: no device queue
    assert "waited for input" in res.summary()
    assert probekit.open_store(res.store_path).meta["waits_seconds"] == waits


def test_compiled_extraction_pads_the_last_batch_and_never_recompiles(image_folder: Path) -> None:
    """A compiled graph is specialized to its input's shape and strides: partial last batches
    (padded) and mixed image sizes must reach it in one layout; features match eager."""
    import torch._dynamo

    spec = f"imagefolder:{image_folder}"
    kw = dict(random_init=True, device="cpu", quiet=True, batch_size=4, num_workers=0)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile fails the test
        comp = probekit.extract("test_vit", spec, compile=True, cache_dir=image_folder / "a", **kw)
    eager = probekit.extract("test_vit", spec, compile=False, cache_dir=image_folder / "b", **kw)
    assert comp.compile_seconds > 0 and eager.compile_seconds == 0
    a, b = probekit.open_store(comp.store_path), probekit.open_store(eager.store_path)
    for split in ("train", "test"):
        for name in a.feature_names:
            np.testing.assert_allclose(
                a.features(split, name), b.features(split, name), rtol=2e-3, atol=2e-3
            )
