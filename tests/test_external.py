"""Datasets where users keep them (`hf:`, `wds:`, `torchvision:`): each extracted equal, row for
row, to the same images as an image folder; missing pieces are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import hide_modules

import probekit
from probekit.datasets import load_dataset
from probekit.errors import DatasetError, ProbekitWarning

SMALL = {"chunk_rows": 4, "batch_size": 4, "num_workers": 0, "quiet": True}


def _same_as_folder(ds_spec: str, folder: str, splits: tuple[str, ...] = ("train", "test")) -> None:
    """`ds_spec` and the image folder list the same images in the same order (labels, class
    names) and extract the same features."""
    a, b = load_dataset(ds_spec), load_dataset(folder)
    assert a.class_names == b.class_names
    for s in splits:
        np.testing.assert_array_equal(a.splits[s].labels, b.splits[s].labels)
        for i in range(len(b.splits[s])):
            assert np.array_equal(np.asarray(a.load_image(s, i)), np.asarray(b.load_image(s, i)))
    ra = probekit.extract("test_resnet", ds_spec, random_init=True, layers="last", **SMALL)
    rb = probekit.extract("test_resnet", folder, random_init=True, layers="last", **SMALL)
    sa, sb = probekit.open_store(ra.store_path), probekit.open_store(rb.store_path)
    assert sa.class_names == sb.class_names
    for s in splits:
        np.testing.assert_array_equal(sa.labels(s), sb.labels(s))
        for name in sb.feature_names:
            np.testing.assert_array_equal(sa.features(s, name), sb.features(s, name))


def _rows(folder: Path, split: str) -> list[tuple[Path, int]]:
    """The folder's images of a split in the order `imagefolder:` lists them, with labels."""
    ds = load_dataset(f"imagefolder:{folder}")
    return [
        (Path(p), int(y))
        for p, y in zip(ds.splits[split].ids, ds.splits[split].labels, strict=True)
    ]


def test_hf_saved_dataset_equals_the_image_folder(image_folder: Path, tmp_path: Path) -> None:
    import datasets

    feats = datasets.Features(
        {
            "img": datasets.Image(),
            "fine": datasets.ClassLabel(names=["cat", "dog"]),
            "note": datasets.Value("string"),
        }
    )
    parts = {}
    for split, hf_split in (("train", "train"), ("test", "test")):
        rows = _rows(image_folder, split)
        parts[hf_split] = datasets.Dataset.from_dict(
            {
                "img": [str(p) for p, _ in rows],
                "fine": [y for _, y in rows],
                "note": ["x"] * len(rows),
            },
            features=feats,
        )
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf"))
    spec = f"hf:{tmp_path / 'hf'}"
    _same_as_folder(spec, f"imagefolder:{image_folder}")
    # columns named explicitly; a missing one names what exists
    assert load_dataset(f"{spec}?image=img&label=fine").class_names == ("cat", "dog")
    with pytest.raises(DatasetError, match=r"no label column 'lbl'; columns: img, fine, note"):
        load_dataset(f"{spec}?label=lbl")
    # a changed dataset is a new fingerprint
    before = load_dataset(spec).fingerprint
    parts["test"] = parts["test"].select(range(2))
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf2"))
    assert load_dataset(f"hf:{tmp_path / 'hf2'}").fingerprint != before


def test_hf_rows_without_a_label_or_an_image_are_invalid_rows(
    image_folder: Path, tmp_path: Path
) -> None:
    """ClassLabel's -1 (no label) and a None image are invalid rows with their reason and a
    count, never a label that indexes the last class or a crashed worker; a split whose every
    row is -1 (a benchmark's hidden test labels) is left out and said."""
    import datasets

    feats = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    rows = {s: _rows(image_folder, s) for s in ("train", "test")}
    train_labels = [y for _, y in rows["train"]]
    train_labels[1] = -1
    images: list[str | None] = [str(p) for p, _ in rows["train"]]
    images[2] = None
    parts = {
        "train": datasets.Dataset.from_dict({"img": images, "label": train_labels}, features=feats),
        "test": datasets.Dataset.from_dict(
            {"img": [str(p) for p, _ in rows["test"]], "label": [y for _, y in rows["test"]]},
            features=feats,
        ),
        "validation": datasets.Dataset.from_dict(
            {"img": [str(p) for p, _ in rows["test"]], "label": [-1] * len(rows["test"])},
            features=feats,
        ),
    }
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf"))
    ds = load_dataset(f"hf:{tmp_path / 'hf'}")
    assert set(ds.splits) == {"train", "test"}
    with pytest.raises(DatasetError, match=r"saved dataset folder .* has no configs; drop :cfg"):
        load_dataset(f"hf:{tmp_path / 'hf'}:cfg")
    assert set(ds.warnings) == {
        "split validation has no labels (every row -1): left out",
        "1 images of train have no label (-1): left out as invalid rows",
    }
    with pytest.warns(ProbekitWarning, match="no label"):
        res = probekit.extract("test_resnet", f"hf:{tmp_path / 'hf'}", random_init=True, **SMALL)
    invalid = dict(probekit.open_store(res.store_path).invalid("train"))
    assert sorted(invalid) == [f"{ds.splits['train'].ids[i]}" for i in (1, 2)]
    assert "no label (-1)" in invalid[ds.splits["train"].ids[1]]
    assert "no image (None)" in invalid[ds.splits["train"].ids[2]]
    with pytest.warns(ProbekitWarning, match="no label"):  # said again beside the numbers
        knn = probekit.knn(res.store_path, ks=[1], write=False)
    assert knn.records and all(r.n == len(rows["test"]) for r in knn.records if r.split == "test")


def test_webdataset_shards_equal_the_image_folder(image_folder: Path, tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "shards"
    out.mkdir()
    for split in ("train", "test"):
        rows = _rows(image_folder, split)
        half = (len(rows) + 1) // 2
        for n, chunk in enumerate((rows[:half], rows[half:])):  # two shards a split
            with wds.TarWriter(str(out / f"{split}-{n:03d}.tar")) as sink:
                for i, (p, y) in enumerate(chunk):
                    ext = "jpg" if p.suffix == ".jpg" else "png"
                    sink.write({"__key__": f"{split}{n}_{i:04d}", ext: p.read_bytes(), "cls": y})
    (out / "classes.txt").write_text("cat\ndog\n")
    _same_as_folder(f"wds:{out}", f"imagefolder:{image_folder}")
    # through the pixel cache and worker processes: the same features
    plain = probekit.extract("test_resnet", f"wds:{out}", random_init=True, layers="last", **SMALL)
    store = probekit.open_store(plain.store_path)
    want = {name: store.features("test", name) for name in store.feature_names}
    cached = probekit.extract(
        "test_resnet",
        f"wds:{out}",
        random_init=True,
        layers="last",
        pixel_cache=True,
        overwrite=True,
        **{**SMALL, "num_workers": 2},
    )
    assert cached.pixels != "decoded" and not cached.cache_hit  # made anew, from pixels
    got = probekit.open_store(cached.store_path)
    for name, values in want.items():
        np.testing.assert_array_equal(got.features("test", name), values)
    # a changed shard is a new fingerprint
    before = load_dataset(f"wds:{out}").fingerprint
    (out / "classes.txt").write_text("kitten\ndog\n")
    assert load_dataset(f"wds:{out}").fingerprint != before
    (out / "classes.txt").write_text("cat\ndog\n")
    assert load_dataset(f"wds:{out}").fingerprint == before
    with wds.TarWriter(str(out / "test-001.tar")) as sink:  # one sample fewer
        for i, (p, y) in enumerate(_rows(image_folder, "test")[2:3]):
            ext = "jpg" if p.suffix == ".jpg" else "png"
            sink.write({"__key__": f"test1_{i:04d}", ext: p.read_bytes(), "cls": y})
    assert load_dataset(f"wds:{out}").fingerprint != before
    pattern = f"wds:{out}/{{train,test}}-{{000..001}}.tar"
    assert load_dataset(pattern).splits["test"].ids == load_dataset(f"wds:{out}").splits["test"].ids
    with pytest.raises(DatasetError, match=r"1 of 3 shards are missing"):
        load_dataset(f"wds:{out}/train-{{000..002}}.tar")
    # a damaged image is an invalid row with its reason, as in an image folder
    broken = tmp_path / "broken"
    broken.mkdir()
    with wds.TarWriter(str(broken / "train-000.tar")) as sink:
        for i in range(4):
            sink.write(
                {
                    "__key__": f"k{i}",
                    "jpg": b"not a jpeg"
                    if i == 1
                    else (image_folder / "train/cat/0.jpg").read_bytes(),
                    "cls": i % 2,
                }
            )
    with wds.TarWriter(str(broken / "test-000.tar")) as sink:
        for i in range(2):
            sink.write(
                {
                    "__key__": f"t{i}",
                    "jpg": (image_folder / "test/dog/0.jpg").read_bytes(),
                    "cls": i,
                }
            )
    res = probekit.extract("test_resnet", f"wds:{broken}", random_init=True, layers="last", **SMALL)
    invalid = probekit.open_store(res.store_path).invalid("train")
    assert [i for i, _ in invalid] == [f"{broken / 'train-000.tar'}#k1"]


def test_torchvision_dataset_equals_the_image_folder(image_folder: Path) -> None:
    from typer.testing import CliRunner

    from probekit.cli import app
    from probekit.datasets.torchvision import with_download

    _same_as_folder(
        f"torchvision:ImageFolder:{image_folder / 'train'}",
        f"imagefolder:{image_folder}",
        splits=("train",),
    )
    with pytest.raises(DatasetError, match="Did you mean Flowers102"):
        load_dataset("torchvision:Flowers10:/nowhere")
    with pytest.raises(DatasetError, match=r"no split could be read.*download=1"):
        load_dataset(f"torchvision:Flowers102:{image_folder / 'none'}")
    # --download allows torchvision specs to download; the others are left as they are
    assert with_download("torchvision:Flowers102:/d,mnist5k,torchvision:DTD:/e?download=0") == (
        "torchvision:Flowers102:/d?download=1,mnist5k,torchvision:DTD:/e?download=0"
    )
    spec = f"torchvision:ImageFolder:{image_folder / 'train'}"
    args = ["extract", "-b", "test_resnet", "--random-init", "--layers", "last", "--quiet"]
    run = CliRunner().invoke(app, [*args, "-d", spec, "--download", "--num-workers", "0"])
    # (the store extracted above: downloading or not, the dataset and its key are the same)
    assert run.exit_code == 0 and "cache hit: test_resnet@random on torchvision:" in run.output


class _Payload:
    """What a crafted processed file holds: unpickled, it would call print."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("the payload ran",))


def test_torchvision_reads_classification_datasets_and_no_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Other kinds of torchvision dataset are named in one line; a crafted processed file
    (legacy MNIST) is refused without running it, and the message gives no advice to unpickle
    it anyway."""
    import torch

    for name in ("DatasetFolder", "VisionDataset", "FakeData", "LSUN", "VOCSegmentation"):
        with pytest.raises(DatasetError, match=rf"torchvision:{name} is not an image classif"):
            load_dataset(f"torchvision:{name}:{tmp_path}")
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for file in ("training.pt", "test.pt"):
        torch.save(_Payload(), processed / file)
    with pytest.raises(DatasetError) as got:
        load_dataset(f"torchvision:MNIST:{tmp_path}")
    said = str(got.value)
    assert "holds more than tensors" in said and "\n" not in said
    assert "weights_only=False" not in said and "trust" not in said
    assert "the payload ran" not in capsys.readouterr().out
    with pytest.raises(DatasetError, match="the download failed too"):
        load_dataset(f"torchvision:MNIST:{tmp_path / 'empty'}?download=1")


def test_missing_libraries_say_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_modules(monkeypatch, "datasets")
    with pytest.raises(DatasetError, match=r"pip install 'probekit\[datasets\]'"):
        load_dataset("hf:somebody/something")
    hide_modules(monkeypatch, "webdataset")
    with pytest.raises(DatasetError, match=r"pip install 'probekit\[datasets\]'"):
        load_dataset("wds:/nowhere/train-{000..001}.tar")
