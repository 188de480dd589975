"""The token cache: stored patch tokens against timm's own forward_intermediates (all, and
pooled to a grid against adaptive_avg_pool2d), metadata and key, the size said first and a
disk too small refused, resume after a kill."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import CLI, assert_same_store, faulty
from timm.data import create_transform, resolve_model_data_config

import probekit
from probekit.datasets import load_dataset
from probekit.errors import OptionError, StoreError

SMALL = {"chunk_rows": 8, "batch_size": 4, "num_workers": 0, "quiet": True}


def _timm_maps(
    name: str, spec: str, split: str, layers: list[int], size: int
) -> list[torch.Tensor]:
    """timm's transform and forward_intermediates (NCHW, class tokens apart) in fp32."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    if hasattr(model, "set_input_size"):
        model.set_input_size(img_size=size)
    cfg = resolve_model_data_config(model)
    transform = create_transform(**{**cfg, "input_size": (3, size, size), "crop_pct": 0.875})
    ds = load_dataset(spec)
    x = torch.stack([transform(ds.load_image(split, i)) for i in range(len(ds.splits[split]))])
    with torch.no_grad():
        return list(
            model.forward_intermediates(x, indices=layers, norm=True, intermediates_only=True)
        )


@pytest.mark.parametrize("name", ["test_vit", "test_convnext", "test_resnet"])
@pytest.mark.parametrize("grid", ["all", "2"])
def test_stored_tokens_equal_timm_forward_intermediates(name: str, grid: str) -> None:
    spec = "synthetic:3"
    res = probekit.extract(
        name,
        spec,
        random_init=True,
        layers="last2",
        pool="mean",
        tokens=grid,
        img_size=64,
        dtype="float32",
        **SMALL,
    )
    store = probekit.open_store(res.store_path)
    layers = store.meta["config"]["layers"]
    assert store.token_names == [f"layer{i}/tokens" for i in layers]
    for split in ("train", "test"):
        maps = _timm_maps(name, spec, split, layers, 64)
        for i, want_map in zip(layers, maps, strict=True):
            key = f"layer{i}/tokens"
            if grid != "all":
                want_map = torch.nn.functional.adaptive_avg_pool2d(
                    want_map, (min(2, want_map.shape[2]), min(2, want_map.shape[3]))
                )
            want = want_map.flatten(2).transpose(1, 2).numpy()  # (N, H*W, C), row-major
            got = store.tokens(split, key)
            assert got.shape == want.shape and store.token_shape(key) == want.shape[1:]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            # the mean of the stored tokens is the stored mean pool, for the full grid
            if grid == "all":
                np.testing.assert_allclose(
                    got.mean(1), store.features(split, f"layer{i}/mean"), rtol=1e-4, atol=1e-5
                )
            info = store.meta["tokens"]["layers"][key]
            assert info["map"] == list(maps[layers.index(i)].shape[2:])
    prefix = store.meta["tokens"]["prefix_tokens_excluded"]
    assert prefix == (1 if name == "test_vit" else 0)


def test_tokens_change_the_key_and_fp16_rows_read_back() -> None:
    plain = probekit.extract("test_vit", "synthetic:2", random_init=True, layers="last", **SMALL)
    tok = probekit.extract(
        "test_vit", "synthetic:2", random_init=True, layers="last", tokens="all", **SMALL
    )
    grid = probekit.extract(
        "test_vit", "synthetic:2", random_init=True, layers="last", tokens=1, **SMALL
    )
    assert len({plain.store_path, tok.store_path, grid.store_path}) == 3
    store = probekit.open_store(tok.store_path)
    assert store.meta["config"]["tokens"] == "all"
    assert "tokens" not in probekit.open_store(plain.store_path).meta["config"]
    rows = np.array([0, 2, 3])
    whole = store.tokens("train", "layer5/tokens")
    assert whole.dtype == np.float16
    np.testing.assert_array_equal(store.tokens("train", "layer5/tokens", rows), whole[rows])
    assert store.check(full=True).ok
    one = probekit.open_store(grid.store_path)
    assert one.token_shape("layer5/tokens")[0] == 1  # a 1x1 grid: the mean of the tokens
    np.testing.assert_allclose(
        one.tokens("train", "layer5/tokens")[:, 0].astype(np.float32),
        store.features("train", "layer5/mean").astype(np.float32),
        atol=2e-3,
    )


def test_bad_token_options_are_one_line_errors() -> None:
    with pytest.raises(OptionError, match="tokens takes all or a grid side"):
        probekit.extract("test_vit", "synthetic:2", random_init=True, tokens="big", **SMALL)
    with pytest.raises(OptionError, match="tokens takes"):
        probekit.extract("test_vit", "synthetic:2", random_init=True, tokens=0, **SMALL)
    store = probekit.open_store(
        probekit.extract("test_vit", "synthetic:2", random_init=True, **SMALL).store_path
    )
    with pytest.raises(StoreError, match=r"no token array .*extract with --tokens"):
        store.tokens("train", "layer5/tokens")


def test_size_is_said_first_and_a_disk_too_small_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cache_dir: Path
) -> None:
    opts = {**SMALL, "quiet": False}
    probekit.extract(
        "test_vit", "synthetic:2", random_init=True, layers="last2", tokens="all", **opts
    )
    said = capsys.readouterr().err
    # 8 images x 2 layers x 100 tokens (10x10 at 160 px) x 64 dims x 2 bytes
    assert (
        "token cache: 8 images x 25.0 KiB (layer4 10x10, layer5 10x10; 2 layers) = about 200.0 KiB"
        in said
    )
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(StoreError, match=r"needs about 200.0 KiB and .* has 1.0 KiB free") as e:
        probekit.extract(
            "test_vit",
            "synthetic:2",
            random_init=True,
            layers="last2",
            tokens="all",
            overwrite=True,
            **opts,
        )
    msg = str(e.value)
    assert "--tokens 8" in msg and "--layers last" in msg and "\n" not in msg
    # a 4x4 map already (--tokens 4): the advice is a smaller grid, 2, never 8
    with pytest.raises(StoreError, match="needs about") as e:
        probekit.extract(
            "test_vit", "synthetic:2", random_init=True, layers="last2", tokens="4",
            overwrite=True, **opts,
        )  # fmt: skip
    assert "--tokens 2 (about" in str(e.value) and "--tokens 8" not in str(e.value)


@pytest.mark.slow
def test_killed_token_extraction_resumes_to_the_same_store(tmp_path: Path) -> None:
    args = [
        "extract",
        "-b",
        "test_vit",
        "-d",
        "synthetic:6",
        "--random-init",
        "--tokens",
        "all",
        "--layers",
        "last2",
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
    env = faulty({**os.environ, "PROBEKIT_CACHE": str(tmp_path / "killed"), "KILL_AT": "3"})
    run = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True)
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    path = next((tmp_path / "killed").glob("*/*.zarr"))
    with pytest.raises(StoreError, match="incomplete"):
        probekit.open_store(path)
    env["KILL_AT"] = "0"
    rerun = subprocess.run(
        [sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed (2 chunks were done)" in rerun.stdout
    assert_same_store(str(path), clean)
    store = probekit.open_store(path)
    n_test = store.meta["splits"]["test"]
    assert store.tokens("test", "layer5/tokens").shape == (n_test, 100, 64)


def test_token_arrays_are_shards_of_small_inner_chunks_read_row_for_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row chunk of tokens is one shard of inner chunks of a few rows (a read of a few rows
    decodes a few inner chunks); reads of any row set equal numpy's indexing of the whole."""
    import probekit.cache._chunked as chunked
    import probekit.cache.store as store_mod

    # test_vit at 64 px: 16 tokens of 64, 2 KiB a float16 row; inner chunks of 2 rows
    monkeypatch.setattr(chunked, "TOKEN_INNER_BYTES", 2 * 16 * 64 * 2)
    res = probekit.extract(
        "test_vit",
        "synthetic:4",
        random_init=True,
        layers="last",
        tokens="all",
        img_size=64,
        **{**SMALL, "chunk_rows": 8},
    )
    store = probekit.open_store(res.store_path)
    arr = store.group["train/layer5/tokens"]
    assert arr.shards == (8, 16, 64) and arr.chunks == (2, 16, 64)
    assert chunked.inner_rows(12, 2048) == 2 and chunked.inner_rows(7, 2048) == 1
    whole = np.asarray(arr[:])
    n = len(whole)
    # a span of 3 inner chunks at a time: runs split by skipped inner chunks and by the span
    monkeypatch.setattr(store_mod, "SPAN_BYTES", 3 * 2 * 16 * 64 * 2)
    rng = np.random.default_rng(0)
    picks = [np.arange(n), np.array([0]), np.array([n - 1]), np.arange(1, n, 3)]
    picks += [np.sort(rng.choice(n, k, replace=False)) for k in (2, 5, n // 2)]
    for rows in picks:
        np.testing.assert_array_equal(store.tokens("train", "layer5/tokens", rows), whole[rows])
    assert store.check(full=True).ok


def test_a_damaged_token_shard_is_named_and_recomputed(tmp_path: Path) -> None:
    args = dict(random_init=True, layers="last", tokens="all", img_size=64, **SMALL)
    res = probekit.extract("test_vit", "synthetic:4", cache_dir=tmp_path, **args)
    store = probekit.open_store(res.store_path)
    want = store.tokens("train", "layer5/tokens")
    shard = Path(res.store_path) / "train/layer5/tokens/c/1/0/0"
    shard.write_bytes(shard.read_bytes()[:-40])  # the shard's index cut short
    with pytest.raises(StoreError, match=r"chunk 1 of train/layer5/tokens .*fails to decode"):
        store.tokens("train", "layer5/tokens")
    again = probekit.extract("test_vit", "synthetic:4", cache_dir=tmp_path, **args)
    assert again.store_path == res.store_path
    np.testing.assert_array_max_ulp(
        probekit.open_store(res.store_path).tokens("train", "layer5/tokens"), want, 1
    )
