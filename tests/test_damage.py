"""A damaged store never gives numbers: each damage to a real extracted store ends in a one-line
error, and `extract` (or `verify --repair`) recomputes exactly the damaged chunks, into a store
equal to a clean run's."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_store
from typer.testing import CliRunner

import probekit
from probekit.cli import app
from probekit.errors import StoreError

RUN = {"chunk_rows": 256, "num_workers": 0, "quiet": True}  # digits: 6 train chunks, 2 test
MODEL, DATA = "test_resnet@random", "digits"


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, float]]:
    """A complete store (its cache root, its path) and its kNN numbers."""
    root = tmp_path_factory.mktemp("clean")
    res = probekit.extract(MODEL, DATA, cache_dir=root, **RUN)
    return root, res.store_path, _knn(res.store_path)


def _knn(path: str) -> dict[str, float]:
    result = probekit.knn(path, ks=5)
    return {f"{r.feature}/{r.metric}": r.value for r in result.records if r.split == "test"}


def _copy(clean: tuple[Path, str, dict[str, float]], tmp_path: Path) -> tuple[Path, Path]:
    root, store, _ = clean
    copy = tmp_path / "cache"
    shutil.copytree(root, copy)
    return copy, copy / Path(store).relative_to(root)


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _delete_feature_chunk(s: Path) -> None:
    (s / "train/layer4/mean/c/2/0").unlink()


def _edit_row_count(s: Path) -> None:
    _edit_json(s / "train/layer3/mean/zarr.json", lambda d: d["shape"].__setitem__(0, 1000))


def _delete_labels(s: Path) -> None:
    shutil.rmtree(s / "train/labels/c")


def _bad_json(s: Path) -> None:
    (s / "train/valid/zarr.json").write_text('{"shape": [14')


def _edit_dtype(s: Path) -> None:
    _edit_json(s / "test/layer1/mean/zarr.json", lambda d: d.__setitem__("data_type", "float32"))


def _flip_endian(s: Path) -> None:
    _edit_json(
        s / "test/layer1/mean/zarr.json",
        lambda d: d["codecs"][0].__setitem__("configuration", {"endian": "big"}),
    )


def _checksum_off(s: Path) -> None:
    _edit_json(
        s / "train/layer2/mean/zarr.json",
        lambda d: d["codecs"][1]["configuration"].__setitem__("checksum", False),
    )


def _clear_done_flag(s: Path) -> None:
    (s / "train/done/c/4").unlink()  # a cleared flag: Zarr keeps no chunk of fill values


def _truncate_chunk(s: Path) -> None:
    f = s / "train/layer2/mean/c/1/0"
    f.write_bytes(f.read_bytes()[:50])


def _garbage_chunk(s: Path) -> None:
    f = s / "test/head/embed/c/0/0"
    f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))


# found by the cheap check on opening (no chunk read)
CHEAP = {
    "feature chunk deleted": (_delete_feature_chunk, "chunk 2 of train/layer4/mean"),
    "row count edited": (_edit_row_count, "train/layer3/mean .shape"),
    "label chunks deleted": (_delete_labels, "train/labels"),
    "bad json": (_bad_json, "train/valid .metadata unreadable"),
    "dtype edited": (_edit_dtype, "test/layer1/mean .dtype float32"),
    "done flag cleared": (_clear_done_flag, "chunk 4 of train/done .done flag cleared"),
    "endian flipped": (_flip_endian, "test/layer1/mean .big-endian bytes"),
    "checksum off": (_checksum_off, "train/layer2/mean .zstd without its checksum"),
}
# found when a chunk is read
ON_READ = {
    "chunk truncated": (_truncate_chunk, "chunk 1 of train/layer2/mean"),
    "chunk overwritten": (_garbage_chunk, "chunk 0 of test/head/embed"),
}


def _words(text: str) -> list[str]:
    return [w.strip("(") for w in text.replace(".", " ").split()]


@pytest.mark.parametrize("case", list(CHEAP))
def test_damage_found_on_opening_then_repaired_by_extract(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path, case: str
) -> None:
    damage, said = CHEAP[case]
    root, store = _copy(clean, tmp_path)
    damage(store)
    for run in (lambda: probekit.knn(str(store)), lambda: probekit.probe(str(store))):
        with pytest.raises(StoreError, match="is damaged") as e:
            run()
        assert all(w in str(e.value) for w in _words(said)), str(e.value)
        assert "\n" not in str(e.value)
    result = CliRunner().invoke(app, ["knn", str(store)], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and result.output.startswith("error: store ")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    info = CliRunner().invoke(app, ["info", str(store)], env={"COLUMNS": "400"})
    assert info.exit_code == 0 and "DAMAGED" in info.output

    res = probekit.extract(MODEL, DATA, cache_dir=root, **RUN)
    assert not res.cache_hit and res.repaired, res
    assert Path(res.store_path) == store
    assert_same_store(str(store), clean[1])
    assert _knn(str(store)) == clean[2]
    assert probekit.extract(MODEL, DATA, cache_dir=root, **RUN).cache_hit


def test_repair_recomputes_exactly_the_damaged_chunks(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path
) -> None:
    root, store = _copy(clean, tmp_path)
    _delete_feature_chunk(store)
    _clear_done_flag(store)
    res = probekit.extract(MODEL, DATA, cache_dir=root, **RUN)
    assert set(res.repaired) == {
        "1 chunk of train/layer4/mean (chunk file missing)",
        "1 chunk of train/done (done flag cleared in a complete store)",
    }
    assert res.resumed_chunks == 8 - 2  # every other chunk was kept
    said = res.summary()
    assert (
        ", repaired 1 chunk of train/" in said and "train/layer4/mean (chunk file missing)" in said
    )


@pytest.mark.parametrize("case", list(ON_READ))
def test_chunk_that_fails_to_decode_is_named_then_recomputed(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path, case: str
) -> None:
    damage, said = ON_READ[case]
    root, store = _copy(clean, tmp_path)
    damage(store)
    assert probekit.open_store(store).check().ok  # no chunk is read by the cheap check
    with pytest.raises(StoreError, match=f"{said} in store .* fails to decode") as e:
        probekit.knn(str(store))
    assert "marked for redoing" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StoreError, match="incomplete"):  # marked: never read again as it is
        probekit.knn(str(store))
    res = probekit.extract(MODEL, DATA, cache_dir=root, **RUN)
    assert res.resumed_chunks == 7
    assert_same_store(str(store), clean[1])
    assert _knn(str(store)) == clean[2]


@pytest.mark.parametrize("case", [*ON_READ, "feature chunk deleted", "dtype edited"])
def test_verify_finds_every_damaged_chunk_and_repairs_it(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path, case: str
) -> None:
    damage, _ = {**CHEAP, **ON_READ}[case]
    _, store = _copy(clean, tmp_path)
    damage(store)
    found = CliRunner().invoke(app, ["verify", str(store), "--json"])
    assert found.exit_code == 1
    report = json.loads(found.output)["report"]
    assert not report["ok"] and report["full"] and report["damage"]
    fixed = CliRunner().invoke(app, ["verify", str(store), "--repair"], env={"COLUMNS": "300"})
    assert fixed.exit_code == 0 and fixed.output.startswith("repaired "), fixed.output
    assert_same_store(str(store), clean[1])
    assert CliRunner().invoke(app, ["verify", str(store)]).exit_code == 0


def test_verify_of_a_sound_store_reads_every_chunk(
    clean: tuple[Path, str, dict[str, float]],
) -> None:
    result = probekit.verify(clean[1])
    assert result.ok and not result.repaired
    # 11 arrays per split (labels, valid, ids, errors, done, crc, 4 layers + head = 5 features)
    per_split = {"train": 6, "test": 2}
    assert result.report["chunks_read"] == sum(11 * n for n in per_split.values())


def test_triage_on_a_damaged_store_repairs_it_first(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path
) -> None:
    root, store = _copy(clean, tmp_path)
    _delete_labels(store)
    result = probekit.triage(
        MODEL,
        DATA,
        cache_dir=root,
        methods="knn",
        ks=[5],
        out=tmp_path / "out",
        plots=False,
        quiet=True,
        log=None,
        img_size="native",  # the store as `extract` made it
    )
    assert_same_store(str(store), clean[1])
    knn = {
        f"{r.feature}/{r.metric}": r.value
        for r in result.records
        if r.kind == "knn" and r.split == "test"
    }
    assert knn == clean[2]


def test_verify_without_a_way_to_recompute_says_what_to_run(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path
) -> None:
    _, store = _copy(clean, tmp_path)
    _edit_json(
        store / "zarr.json",
        lambda d: d["attributes"]["probekit"].__setitem__("recipe", None),
    )
    _delete_feature_chunk(store)
    with pytest.raises(StoreError, match=r"records no recipe.*rerun the `probekit extract`"):
        probekit.verify(store, repair=True)
    with pytest.raises(StoreError, match="incomplete"):  # the damage is marked, never read
        probekit.knn(str(store))


def test_repair_never_runs_code_a_store_names(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path
) -> None:
    """A store whose recipe names `module:function` (here `os:abort`) is not rebuilt from it:
    the repair refuses in one line and says what to rerun; nothing is imported or called."""
    for where, through_cli in ((tmp_path / "api", False), (tmp_path / "cli", True)):
        _, store = _copy(clean, where)
        _edit_json(
            store / "zarr.json",
            lambda d: d["attributes"]["probekit"]["recipe"].__setitem__("backbone", "os:abort"),
        )
        _delete_feature_chunk(store)
        if not through_cli:
            with pytest.raises(StoreError, match=r"never runs the code.*--backbone os:abort"):
                probekit.verify(store, repair=True)
            continue
        got = CliRunner().invoke(app, ["verify", str(store), "--repair"])
        assert got.exit_code == 1 and "never runs the code it names" in got.output
        assert "Traceback" not in got.output


def test_verify_finds_values_the_store_never_writes(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path
) -> None:
    """A chunk rewritten with a NaN feature decodes, but verify names it (the writer makes
    non-finite rows invalid zeros), and a repair recomputes it."""
    import zarr

    _, store = _copy(clean, tmp_path)
    arr = zarr.open_array(str(store / "train/layer4/mean"), mode="r+")
    row = arr[3]
    row[0] = np.nan
    arr[3] = row
    found = probekit.verify(store)
    assert not found.ok and "holds values the store never writes" in found.summary()
    assert "train/layer4/mean chunks (0,)" in found.summary()
    fixed = probekit.verify(store, repair=True)
    assert fixed.ok and fixed.repaired
    assert_same_store(str(store), clean[1])


@pytest.mark.parametrize("array", ["layer4/mean", "labels", "ids"])
def test_verify_finds_a_valid_chunk_copied_over_another(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path, array: str
) -> None:
    """Chunk 0's file copied over chunk 1's (same rows, zstd's checksum intact) opens and
    decodes; verify compares each chunk's crc32 with the one recorded when it was written,
    names chunk 1 alone, and a repair gives back the clean store and its kNN numbers."""
    _, store = _copy(clean, tmp_path)
    rest = "/0" if array == "layer4/mean" else ""
    shutil.copyfile(store / f"train/{array}/c/0{rest}", store / f"train/{array}/c/1{rest}")
    assert probekit.open_store(store).check().ok  # the cheap check reads no chunk
    found = probekit.verify(store)
    assert not found.ok
    assert [dict(d) for d in found.report["damage"]] == [
        {
            "split": "train",
            "array": array,
            "chunks": (1,),
            "reason": "values differ from those written (crc32)",
            "whole": False,
        }
    ]
    fixed = probekit.verify(store, repair=True)
    assert fixed.ok and fixed.repaired
    assert_same_store(str(store), clean[1])
    assert _knn(str(store)) == clean[2]


def test_a_store_without_crcs_is_checked_on_everything_else(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path
) -> None:
    """A store made before chunks' crc32s were recorded passes verify (nothing to compare),
    and still has every other check: a NaN written into a chunk is found."""
    import zarr

    _, store = _copy(clean, tmp_path)
    _edit_json(store / "zarr.json", lambda d: d["attributes"]["probekit"].pop("crc_arrays"))
    shutil.rmtree(store / "train/crc")
    shutil.rmtree(store / "test/crc")
    assert probekit.verify(store).ok
    arr = zarr.open_array(str(store / "test/head/embed"), mode="r+")
    row = arr[0]
    row[1] = np.inf
    arr[0] = row
    assert "holds values the store never writes" in probekit.verify(store).summary()


def test_an_older_store_without_chunk_files_still_finds_a_missing_feature_chunk(
    clean: tuple[Path, str, dict[str, float]], tmp_path: Path
) -> None:
    """Stores made before `chunk_files` skipped chunks of fill values, so a missing file there
    was taken as zeros; a missing feature chunk whose rows hold valid images is damage."""
    root, store = _copy(clean, tmp_path)
    _edit_json(store / "zarr.json", lambda d: d["attributes"]["probekit"].pop("chunk_files"))
    assert probekit.open_store(store).check().ok
    _delete_feature_chunk(store)
    with pytest.raises(StoreError, match=r"chunk 2 of train/layer4/mean .*chunk file missing"):
        probekit.knn(str(store))
    res = probekit.extract(MODEL, DATA, cache_dir=root, **RUN)
    assert res.repaired and _knn(str(store)) == clean[2]
