"""The store's typed metadata: checked once on open, read from zarr.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_store

import probekit
from probekit.cache.meta import FORMAT_VERSION, StoreMeta
from probekit.errors import StoreError


def _edit(path: Path, **changes: object) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    meta = doc["attributes"]["probekit"]
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (path / "zarr.json").write_text(json.dumps(doc))


def test_metadata_is_typed_and_read_without_opening_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write_store(
        tmp_path / "s.zarr",
        {"train": (rng.normal(size=(6, 3)), np.arange(6) % 2)},
        ["a", "b"],
        num_layers=4,
    )
    store = probekit.open_store(path)
    info = store.info
    assert info == StoreMeta.read(path)  # zarr.json alone says the same
    assert (info.format_version, info.status, info.is_complete) == (
        FORMAT_VERSION,
        "complete",
        True,
    )
    assert info.class_names == ("a", "b") and info.splits == {"train": 6}
    assert info.feature_names == ("head/embed",) and info.feature_dims == {"head/embed": 3}
    assert (info.backbone.name, info.backbone.num_layers, info.label) == ("arrays", 4, "arrays")
    assert info.dataset.spec == "arrays:s.zarr" and info.chunk_rows == 6


def test_other_formats_and_damaged_metadata_are_one_line_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = {"train": (rng.normal(size=(4, 3)), np.arange(4) % 2)}
    newer = write_store(tmp_path / "newer.zarr", data, ["a", "b"])
    _edit(newer, format_version=FORMAT_VERSION + 1)
    with pytest.raises(StoreError, match=f"store format {FORMAT_VERSION + 1}, this probekit reads"):
        probekit.open_store(newer)
    with pytest.raises(StoreError, match="store format"):
        StoreMeta.read(newer)
    damaged = write_store(tmp_path / "damaged.zarr", data, ["a", "b"])
    _edit(damaged, splits=None)
    with pytest.raises(StoreError, match=r"damaged probekit metadata \(KeyError: 'splits'"):
        probekit.open_store(damaged)
    (tmp_path / "bad.zarr").mkdir()
    (tmp_path / "bad.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="not JSON"):
        StoreMeta.read(tmp_path / "bad.zarr")
    # `probekit ls` leaves out what it cannot read, and lists the rest
    (tmp_path / "ds").mkdir()
    good = write_store(tmp_path / "ds" / "good.zarr", data, ["a", "b"])
    newer.rename(tmp_path / "ds" / "newer.zarr")
    assert [s.path for s in probekit.list_stores(tmp_path)] == [str(good)]
