"""The pixel reader process: its batches equal the store's pixels, a buffer is never read into
while the loop holds it, its errors are one line, and it never outlives its parent."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_child_dies_with_parent

import probekit
from probekit.cache.pixels import PixelSource, PixelStore
from probekit.cache.reader import PixelReader
from probekit.cache.store import open_store
from probekit.datasets import Dataset, Split
from probekit.errors import StoreError
from probekit.extraction.pixels import build_pixel_store

N, SIZE = 203, 12


@pytest.fixture
def pixels(tmp_path: Path) -> tuple[PixelStore, np.ndarray]:
    """A pixel store of N random images (chunks of 16 rows, the last one short)."""
    images = np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    split = Split("train", tuple(f"img{i}" for i in range(N)), np.arange(N) % 3)
    ds = Dataset(
        "px",
        "px",
        ("a", "b", "c"),
        {"train": split},
        fingerprint="px",
        arrays={"train": images},
        preprocessed=True,
    )
    store, _, _ = build_pixel_store(
        ds, lambda im: im, "as is", (SIZE, SIZE), cache_dir=tmp_path, identity=True, chunk_rows=16
    )
    return store, images


def _batches(sizes: list[int]) -> list[list[int]]:
    out, at = [], 0
    for b in sizes:
        if at < N:
            out.append(list(range(at, min(N, at + b))))
        at += b
    return out


def _read(
    reader: PixelReader, store: PixelStore, batches: list[list[int]], threads: int, hold: int
) -> Any:
    source = PixelSource(store.path, "train")
    return reader.read(source, batches, threads=threads, hold=hold, pin=False)


@pytest.mark.parametrize(("threads", "hold"), [(1, 1), (3, 4)])
def test_batches_equal_the_stored_pixels_and_held_ones_stay_intact(
    pixels: tuple[PixelStore, np.ndarray], threads: int, hold: int
) -> None:
    store, images = pixels
    # batches across chunk boundaries, of several sizes, the last one short; many more batches
    # than buffers, so buffers are read into again and again
    batches = _batches([7, 16, 3, 1, 9, 5] * 8)
    assert len(batches) == 30 and len(batches[-1]) == 3
    held: list[tuple[torch.Tensor, list[int]]] = []
    with PixelReader() as reader:
        got = _read(reader, store, batches, threads, hold)
        for (img, valid, why), rows in zip(got, batches, strict=True):
            assert img.shape == (len(rows), 3, SIZE, SIZE) and img.dtype == torch.uint8
            assert img.is_contiguous(memory_format=torch.channels_last)
            held = [*held[-(hold - 1) :], (img, rows)] if hold > 1 else [(img, rows)]
            time.sleep(0.01)  # the loop's work on the batch: the reader reads on meanwhile
            for tensor, r in held:  # this batch and the `hold - 1` before it are intact
                want = torch.from_numpy(images[r[0] : r[-1] + 1]).permute(0, 3, 1, 2)
                assert torch.equal(tensor, want)
            assert valid.tolist() == [True] * len(rows) and why == [""] * len(rows)
        # a read left half way is ended by the next one, which starts afresh
        first = _read(reader, store, batches, threads, hold)
        next(first)
        again = list(_read(reader, store, batches[:2], 2, 1))
        assert torch.equal(again[1][0].permute(0, 2, 3, 1), torch.from_numpy(images[7:23]))


def test_a_missing_chunk_reads_as_zeros_and_a_truncated_one_is_a_clear_error(
    pixels: tuple[PixelStore, np.ndarray],
) -> None:
    store, _ = pixels
    chunk = store.path / "train" / "pixels" / "c"
    (chunk / "1" / "0" / "0" / "0").unlink()  # as Zarr leaves a chunk of fill values
    with PixelReader() as reader:
        one = _read(reader, store, [list(range(16, 32))], 1, 1)
        ((img, _, _),) = list(one)
        assert not img.any()
        data = (chunk / "2" / "0" / "0" / "0").read_bytes()
        (chunk / "2" / "0" / "0" / "0").write_bytes(data[: len(data) // 2])
        with pytest.raises(StoreError, match=r"cannot read the pixel cache .*truncated.*delete"):
            list(_read(reader, store, _batches([32, 32]), 2, 1))
        # the reader goes on after an error
        rows = list(_read(reader, store, _batches([8]), 1, 1))
        assert rows[0][0].shape[0] == 8


def test_a_reader_that_dies_is_one_store_error(pixels: tuple[PixelStore, np.ndarray]) -> None:
    store, _ = pixels
    reader = PixelReader()
    reader._proc.kill()
    with pytest.raises(StoreError, match=r"pixel reader process ended unexpectedly"):
        list(_read(reader, store, _batches([16] * 4), 1, 1))
    reader.close()


def test_the_reader_dies_with_the_process_that_started_it() -> None:
    assert_child_dies_with_parent("probekit.cache.reader", "PixelReader")


def test_extraction_reads_the_pixel_cache_through_the_reader_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = PixelReader.read

    def counted(self: PixelReader, source: PixelSource, *a: object, **kw: object) -> object:
        calls.append(source.split)
        return real(self, source, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(PixelReader, "read", counted)
    kw = dict(random_init=True, quiet=True, pool="mean", layers="last2", chunk_rows=8)
    kw["batch_size"] = 3
    spec = "synthetic:20"
    by_process = probekit.extract(
        "test_vit", spec, cache_dir=tmp_path / "p", pixel_cache=True, **kw
    )
    assert sorted(calls) == ["test", "train"]
    by_threads = probekit.extract(
        "test_vit", spec, cache_dir=tmp_path / "t", pixel_cache=True, pixel_reader="threads", **kw
    )
    assert len(calls) == 2  # threads this time
    a, b = open_store(by_process.store_path), open_store(by_threads.store_path)
    for split in ("train", "test"):
        for name in a.feature_names:
            assert np.array_equal(a.features(split, name), b.features(split, name)), name


def test_validity_is_read_only_where_the_store_has_invalid_rows(
    pixels: tuple[PixelStore, np.ndarray],
) -> None:
    store, _ = pixels
    assert store.meta["invalid"] == {"train": 0}  # counted when the store was built
    assert PixelSource(store.path, "train").errors is None  # so its flags are never read
    store.array("train", "valid")[5] = False
    store.array("train", "errors")[5] = "cannot identify image file"
    store.update_meta(invalid={"train": 1})
    with PixelReader() as reader:
        (_, valid, why), *_ = list(_read(reader, store, _batches([8, 8]), 1, 1))
    assert valid.tolist() == [True] * 5 + [False] + [True] * 2
    assert why == [""] * 5 + ["cannot identify image file"] + [""] * 2


def test_helper_processes_are_kept_for_the_next_extraction(tmp_path: Path) -> None:
    from probekit.cache import child
    from probekit.cache.writer import ChunkWriter

    kw = dict(random_init=True, quiet=True, pool="mean", layers="last2", pixel_cache=True)
    probekit.extract("test_vit", "synthetic:6", cache_dir=tmp_path, **kw)
    kept = {kind: helper._proc.pid for kind, (_, helper) in child._IDLE.items()}
    assert set(kept) == {ChunkWriter, PixelReader}
    assert child._IDLE[PixelReader][1]._shared is None  # unmapped
    probekit.extract("test_resnet", "synthetic:6", cache_dir=tmp_path, **kw)
    again = {kind: helper._proc.pid for kind, (_, helper) in child._IDLE.items()}
    assert again == kept  # the same processes served the second call
    # a helper that died while idle is replaced, not used
    os.kill(kept[ChunkWriter], signal.SIGKILL)
    child._IDLE[ChunkWriter][1]._proc.wait()
    probekit.extract("test_convnext", "synthetic:6", cache_dir=tmp_path, **kw)
    assert child._IDLE[ChunkWriter][1]._proc.pid != kept[ChunkWriter]
