from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probekit.datasets import load_dataset, read_image, to_rgb
from probekit.errors import DatasetError, InvalidImageError


def test_imagefolder_with_splits(image_folder: Path) -> None:
    ds = load_dataset(f"imagefolder:{image_folder}")
    assert list(ds.splits) == ["train", "test"]
    assert ds.class_names == ("cat", "dog")
    assert len(ds.splits["train"]) == 6 and len(ds.splits["test"]) == 4
    for split in ds.splits.values():  # the same class name maps to the same id in every split
        for path, label in zip(split.ids, split.labels, strict=True):
            assert Path(path).parent.name == ds.class_names[label]
    assert ds.spec == f"imagefolder:{image_folder.resolve()}"


def test_imagefolder_flat_is_one_split(image_folder: Path) -> None:
    ds = load_dataset(f"imagefolder:{image_folder / 'train'}")
    assert list(ds.splits) == ["train"] and len(ds.splits["train"]) == 6


def test_fingerprint_changes_with_the_files(image_folder: Path) -> None:
    before = load_dataset(f"imagefolder:{image_folder}").fingerprint
    assert load_dataset(f"imagefolder:{image_folder}").fingerprint == before
    (image_folder / "train" / "cat" / "0.jpg").write_bytes(b"changed")
    assert load_dataset(f"imagefolder:{image_folder}").fingerprint != before


def test_csv_spec(tmp_path: Path, image_folder: Path) -> None:
    csv = tmp_path / "list.csv"
    rows = ["path,label,split"]
    for p in sorted(image_folder.rglob("*.*")):
        rows.append(f"{p.relative_to(tmp_path)},{p.parent.name},{p.parent.parent.name}")
    csv.write_text("\n".join(rows) + "\n")
    ds = load_dataset(f"csv:{csv}")
    assert list(ds.splits) == ["train", "test"] and ds.class_names == ("cat", "dog")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,target\nx.jpg,1\n")
    with pytest.raises(DatasetError, match="path,label"):
        load_dataset(f"csv:{bad}")


def test_builtin_real_datasets_split_deterministically() -> None:
    mnist = load_dataset("mnist5k")
    assert (len(mnist.splits["train"]), len(mnist.splits["test"])) == (4000, 1000)
    assert np.bincount(mnist.splits["test"].labels).tolist() == [100] * 10
    assert mnist.class_names == tuple(str(i) for i in range(10))
    again = load_dataset("mnist5k")
    assert again.splits["test"].ids == mnist.splits["test"].ids
    digits = load_dataset("digits")
    assert digits.class_names == mnist.class_names  # same names: transfer between them works
    assert sum(len(s) for s in digits.splits.values()) == 1797
    faces = load_dataset("lfw-faces")
    assert faces.class_names == ("face", "non-face")
    img = faces.load_image("test", 0)
    assert img.mode == "RGB" and img.size == (25, 25)


@pytest.mark.parametrize("spec", ["", "imagenet", "imagefolder:", "synthetic:x", "mnist5k:3"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(DatasetError):
        load_dataset(spec)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no images"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")


def _roundtrip(img: Image.Image, fmt: str) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    buf.seek(0)
    return Image.open(buf)


def test_color_conversions() -> None:
    gray = to_rgb(Image.fromarray(np.full((4, 4), 77, np.uint8)))
    assert np.asarray(gray)[0, 0].tolist() == [77, 77, 77]
    sixteen = _roundtrip(Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16)), "PNG")
    assert sixteen.mode.startswith("I")
    assert np.asarray(to_rgb(sixteen))[0, 0].tolist() == [127, 127, 127]
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, ..., 3] = 255  # top half opaque red, bottom half fully transparent
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 0].tolist() == [255, 255, 255]
    pal = Image.fromarray(rgba, "RGBA").convert("P")
    pal.info["transparency"] = 0
    assert to_rgb(pal).mode == "RGB"
    cmyk = _roundtrip(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG")
    r, g, b = np.asarray(to_rgb(cmyk))[0, 0].tolist()
    assert r > 200 and g < 60 and b < 60


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (30, 10), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert read_image(str(path)).size == (10, 30)


def test_every_exif_orientation_reads_as_pillow_transposes_it(tmp_path: Path) -> None:
    """All eight orientations against Pillow's own exif_transpose (an upright image skips its
    copy; the pixels must not change)."""
    from PIL import ImageOps

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    sizes = set()
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"  # lossless: the pixels are known
        Image.fromarray(pixels).save(path, exif=exif)
        with Image.open(path) as im:
            want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        got = read_image(path)
        assert np.array_equal(np.asarray(got), want), orientation
        sizes.add(got.size)
    assert sizes == {(20, 12), (12, 20)}  # some were turned


@pytest.mark.parametrize(
    "content", [b"", b"this is not an image", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00"]
)
def test_unreadable_images_raise_with_reason(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(InvalidImageError):
        read_image(str(path))
