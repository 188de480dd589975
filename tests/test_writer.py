"""The chunk writer process: its chunks equal a direct write, its errors reach the loop, and it
never outlives the process that started it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_child_dies_with_parent

from probekit.cache.store import FeatureStore, StoreConfig, open_store
from probekit.cache.writer import FP16_MAX, ChunkWriter, NeedsFloat32, chunk_columns
from probekit.errors import StoreError

DIMS = {"layer0/mean": 3, "layer1/mean": 5, "head/embed": 4}


def _store(path: Path, n: int, chunk_rows: int) -> FeatureStore:
    cfg = StoreConfig("arrays", "b", "given", {}, (0, 1), ("mean",), "float16", "fp32")
    meta = {"dataset": {"spec": "arrays", "fingerprint": "-"}, "class_names": ["a", "b"]}
    return FeatureStore.create(path, cfg, meta, {"train": n}, DIMS, chunk_rows, set())


def _chunk(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feats = rng.normal(size=(n, sum(DIMS.values()))).astype(np.float32) * 100
    feats[1, 4] = np.nan  # a non-finite row
    feats[2, 0] = np.inf  # another, in an image that was invalid anyway
    valid = np.ones(n, bool)
    valid[[2, 5]] = False
    reasons = np.array(["", "", "broken file", "", "", "truncated"] + [""] * (n - 6), dtype=str)
    return feats, valid, reasons


def test_chunk_columns_match_a_per_feature_reference() -> None:
    rng = np.random.default_rng(0)
    feats, valid, reasons = _chunk(rng, 9)
    ref = feats.copy()
    cols = chunk_columns(feats, valid.copy(), reasons, DIMS, "float16", {"head/embed"})
    want_valid = valid & np.isfinite(ref).all(axis=1)
    assert cols["valid"].tolist() == want_valid.tolist()
    assert cols["errors"].tolist() == [
        "",
        "non-finite features",
        "broken file",
        "",
        "",
        "truncated",
        "",
        "",
        "",
    ]
    start = 0
    for name, dim in DIMS.items():
        part = np.where(want_valid[:, None], ref[:, start : start + dim], 0.0)
        want = part.astype(np.float32 if name == "head/embed" else np.float16)
        assert cols[name].dtype == want.dtype and np.array_equal(cols[name], want), name
        start += dim


def test_chunk_columns_say_which_feature_overflows_float16() -> None:
    feats = np.zeros((4, sum(DIMS.values())), np.float32)
    feats[3, 3 + 2] = 2 * FP16_MAX  # in layer1/mean
    with pytest.raises(NeedsFloat32) as e:
        chunk_columns(feats.copy(), np.ones(4, bool), np.full(4, ""), DIMS, "float16", set())
    assert e.value.name == "layer1/mean"
    ok = chunk_columns(
        feats.copy(), np.ones(4, bool), np.full(4, ""), DIMS, "float16", {e.value.name}
    )
    assert ok["layer1/mean"].dtype == np.float32 and ok["layer1/mean"][3, 2] == 2 * FP16_MAX
    invalid = np.array([True, True, True, False])  # an invalid row's values are never stored
    cols = chunk_columns(feats.copy(), invalid, np.full(4, ""), DIMS, "float16", set())
    assert not cols["layer1/mean"].any()


def test_chunks_from_the_writer_equal_a_direct_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n, rows = 22, 8  # the last chunk is short
    chunks = [_chunk(rng, min(rows, n - s)) for s in range(0, n, rows)]
    labels = rng.integers(0, 2, n)
    ids = [f"img{i}" for i in range(n)]
    direct = _store(tmp_path / "direct.zarr", n, rows)
    for c, (feats, valid, reasons) in enumerate(chunks):
        cols = chunk_columns(feats.copy(), valid, reasons, DIMS, "float16", set())
        cols["labels"] = labels[c * rows : c * rows + len(valid)]
        cols["ids"] = np.array(ids[c * rows : c * rows + len(valid)])
        direct.write_chunk("train", c, rows, cols)
    path = tmp_path / "written.zarr"
    store = _store(path, n, rows)
    with ChunkWriter() as writer:
        writer.begin(path, DIMS, "float16", set(), rows)
        for c, (feats, valid, reasons) in enumerate(chunks):
            buf = writer.acquire()
            k = len(valid)
            buf.features[:k], buf.valid[:k] = feats, valid
            why = {i: str(r) for i, r in enumerate(reasons) if r}
            span = slice(c * rows, c * rows + k)
            writer.submit(buf, "train", c, k, labels[span], ids[span], why)
        writer.wait()
    assert not store.pending_chunks("train")
    for name in [*DIMS, "valid", "labels"]:
        assert np.array_equal(store.features("train", name), direct.features("train", name)), name
    assert store.ids("train") == ids
    assert store.invalid("train") == direct.invalid("train") and len(store.invalid("train")) == 9


def test_a_chunk_that_fails_raises_its_own_error_in_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path, 8, 4)
    with ChunkWriter() as writer:
        writer.begin(path, DIMS, "float16", set(), 4)
        buf = writer.acquire()
        buf.features[:4] = 0.0
        buf.features[0, 0] = 10 * FP16_MAX
        buf.valid[:4] = True
        writer.submit(buf, "train", 0, 4, np.zeros(4, int), ["a"] * 4, {})
        with pytest.raises(NeedsFloat32, match="layer0/mean"):
            writer.wait()
        writer.settle()  # the error is forgotten: the next pass starts clean
        writer.begin(path, DIMS, "float16", {"layer0/mean"}, 4)
        buf = writer.acquire()
        buf.valid[:4] = True
        writer.submit(buf, "train", 1, 4, np.zeros(4, int), ["b"] * 4, {})
        writer.wait()
    assert open_store(path, allow_partial=True).pending_chunks("train") == [0]


def test_a_store_the_writer_cannot_open_is_said_by_begin(tmp_path: Path) -> None:
    with ChunkWriter() as writer, pytest.raises(StoreError, match="not a probekit feature store"):
        writer.begin(tmp_path / "missing.zarr", DIMS, "float16", set(), 4)


def test_a_writer_that_dies_is_one_store_error(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path, 8, 4)
    writer = ChunkWriter()
    writer.begin(path, DIMS, "float16", set(), 4)
    writer._proc.kill()
    with pytest.raises(StoreError, match=r"ended unexpectedly .* rerun the same command"):
        for c in range(2):
            buf = writer.acquire()
            buf.valid[:4] = True
            writer.submit(buf, "train", c, 4, np.zeros(4, int), ["a"] * 4, {})
        writer.wait()
    writer.close()


def test_the_writer_dies_with_the_process_that_started_it() -> None:
    assert_child_dies_with_parent("probekit.cache.writer", "ChunkWriter")
