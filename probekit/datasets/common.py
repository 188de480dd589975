"""What every dataset kind shares: `Dataset` and `Split`, reading an image (`read_image`,
EXIF turned, RGB), and the helpers a kind builds its dataset with (paths, digests, split
order, arrays as datasets). Kinds import this module; it imports none of them."""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image, ImageOps

from probekit.errors import DatasetError, InvalidImageError
from probekit.segmentation import IGNORE

__all__ = [
    "IMG_EXTENSIONS",
    "SPLIT_NAMES",
    "SPLIT_ORDER",
    "Dataset",
    "Split",
    "array_dataset",
    "decode_image",
    "digest",
    "file_dataset",
    "is_image",
    "need",
    "need_extra",
    "overlap_warnings",
    "parse_query",
    "read_image",
    "read_mask",
    "slug",
    "sorted_splits",
    "split_arrays",
    "subdirs",
    "to_rgb",
    "to_uint8",
    "user_path",
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
    # detection datasets: per split each image's boxes (`datasets.boxes.Boxes`), and the
    # layout they were read from ("coco", "voc", "yolo", "generated": VOC's metrics for "voc")
    boxes: Mapping[str, Any] | None = field(default=None, repr=False)
    box_layout: str = ""

    @property
    def detection(self) -> bool:
        """Whether every image has its object boxes (a detection dataset)."""
        return self.boxes is not None

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


def user_path(arg: str, kind: str) -> Path:
    """PATH of a spec, with ~ expanded; an unusable one (unknown ~user, a NUL byte) is an error."""
    try:
        return Path(arg).expanduser().resolve()
    except (RuntimeError, ValueError, OSError) as e:
        raise DatasetError(f"{kind}:{arg!r}: not a usable path ({e}).") from None


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "data"


def sorted_splits(names: Sequence[str]) -> list[str]:
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


def file_dataset(
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
    for name in sorted_splits(list(by_split)):
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
    fingerprint = digest("\n".join(listing))
    canonical = f"{kind}:{root}"
    return Dataset(
        canonical,
        f"{kind}-{slug(root.name)}-{digest(canonical)[:8]}",
        class_names,
        splits,
        fingerprint,
        warnings=overlap_warnings({n: sp.ids for n, sp in splits.items()}, "path"),
    )


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def array_dataset(
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
    return split_arrays(spec, images, labels, class_names, tr, te)


def split_arrays(
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
    fp = digest(images.tobytes(), labels.astype(np.int64).tobytes())
    content = {
        name: [hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest() for a in arrays[name]]
        for name in splits
    }
    warnings = overlap_warnings(content, "pixels")
    return Dataset(spec, slug(spec), tuple(class_names), splits, fp, arrays, warnings=warnings)


def to_uint8(x: np.ndarray, hi: float) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * (255.0 / hi)), 0, 255).astype(np.uint8)


def need(package: str, dataset: str) -> DatasetError:
    return DatasetError(
        f"dataset {dataset!r} needs the package {package!r}: pip install {package} "
        "(or pip install 'probekit[demo]')."
    )


# a source's split names as probekit's (train, val, test)
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def need_extra(extra: str, what: str) -> DatasetError:
    return DatasetError(f"{what} needs the `{extra}` library: pip install 'probekit[datasets]'.")


def parse_query(arg: str) -> tuple[str, dict[str, str]]:
    """ARG?k=v&k=v -> (ARG, {k: v})."""
    base, _, q = arg.partition("?")
    return base, dict(parse_qsl(q, keep_blank_values=True))


def read_mask(
    path: str, n_classes: int, rule: str = "index", size: tuple[int, int] | None = None
) -> Image.Image:
    """A mask file as a mode-L image of class indices (255 ignored): a palette PNG's indices or
    a one-band image's values (`rule` "ade": 0 -> 255, v -> v - 1). InvalidImageError names
    what is wrong: unreadable, not one band, not the image's size, a label beyond the classes."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16"):
                raise InvalidImageError(
                    f"mask {Path(path).name} is {im.mode}, not a palette or one-band image"
                )
            values = np.asarray(im).astype(np.int64)
    except (OSError, ValueError, SyntaxError) as e:
        if isinstance(e, InvalidImageError):
            raise
        raise InvalidImageError(f"mask {Path(path).name} cannot be read ({e})") from None
    if rule == "ade":
        values = np.where(values == 0, IGNORE, values - 1)
    got = (values.shape[1], values.shape[0])
    if size is not None and got != tuple(size):
        raise InvalidImageError(
            f"mask {Path(path).name} is {got[0]}x{got[1]}, the image {size[0]}x{size[1]}"
        )
    bad = values[(values != IGNORE) & ((values < 0) | (values >= n_classes))]
    if bad.size:
        raise InvalidImageError(
            f"mask {Path(path).name} holds label {int(bad.max())}, beyond the {n_classes} classes"
        )
    return Image.fromarray(values.astype(np.uint8), mode="L")
