"""torchvision's classification datasets (`torchvision:NAME:ROOT[?download=1]`): file-backed
ones read as image folders, the others by index."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from probekit.datasets.common import (
    SPLIT_NAMES,
    Dataset,
    Split,
    digest,
    parse_query,
    slug,
    user_path,
)
from probekit.errors import DatasetError, InvalidImageError

__all__ = ["TorchvisionReader", "torchvision_dataset", "with_download"]


_TV_OPEN: dict[tuple[str, str, str, bool], Any] = {}

# torchvision's image classification datasets (an image and one class index a row); the
# others (detection, segmentation, stereo, flow, video, captions, pairs, base classes, FakeData,
# LSUN's lmdb) are refused by name
CLASSIFICATION = (
    "CIFAR10",
    "CIFAR100",
    "CLEVRClassification",
    "Caltech101",
    "Caltech256",
    "Country211",
    "DTD",
    "EMNIST",
    "EuroSAT",
    "FER2013",
    "FGVCAircraft",
    "FashionMNIST",
    "Flowers102",
    "Food101",
    "GTSRB",
    "INaturalist",
    "ImageFolder",
    "ImageNet",
    "Imagenette",
    "KMNIST",
    "LFWPeople",
    "MNIST",
    "Omniglot",
    "OxfordIIITPet",
    "PCAM",
    "Places365",
    "QMNIST",
    "RenderedSST2",
    "SEMEION",
    "STL10",
    "SUN397",
    "SVHN",
    "StanfordCars",
    "USPS",
)


def _tv(name: str, root: str, split: str, download: bool) -> Any:
    key = (name, root, split, download)
    if key not in _TV_OPEN:
        import inspect

        import torchvision

        cls = getattr(torchvision.datasets, name)
        params = inspect.signature(cls).parameters
        kw: dict[str, Any] = {"root": root}
        if "download" in params:
            kw["download"] = download
        if "split" in params:
            kw["split"] = split
        elif "train" in params:
            kw["train"] = split == "train"
        _TV_OPEN[key] = cls(**kw)
    return _TV_OPEN[key]


@dataclass(frozen=True)
class TorchvisionReader:
    """Loads item `index` of a torchvision dataset's split (its own reader decodes it)."""

    name: str
    root: str
    splits: Mapping[str, str]  # probekit's split -> the dataset's
    download: bool = False

    def load(self, split: str, index: int) -> Image.Image:
        ds = _tv(self.name, self.root, self.splits[split], self.download)
        try:
            img = ds[int(index)][0]
        except (OSError, ValueError, SyntaxError) as e:
            raise InvalidImageError(f"{type(e).__name__}: {e}") from None
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return img


def _tv_labels(ds: Any) -> np.ndarray:
    for attr in ("targets", "_labels", "labels", "_targets"):
        got = getattr(ds, attr, None)
        if got is not None and len(got) == len(ds):
            return np.asarray([int(t) for t in got], dtype=np.int64)
    if hasattr(ds, "samples"):
        return np.asarray([int(t) for _, t in ds.samples], dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


def _tv_files(ds: Any) -> list[str]:
    for attr in ("samples", "imgs", "_image_files", "_samples"):
        got = getattr(ds, attr, None)
        if got:
            return [str(x[0] if isinstance(x, (tuple, list)) else x) for x in got]
    return []


def _file_stamps(files: list[str]) -> list[str]:
    """Each file's path, size and time (its path alone where it cannot be read)."""
    out = []
    for f in files:
        try:
            st = Path(f).stat()
            out.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            out.append(f)
    return out


def _unread(name: str, root: str, errors: list[str], download: bool) -> DatasetError:
    fix = (
        "the download failed too (offline? it needs the dataset's host)"
        if download
        else "put its files there, or add ?download=1 (online)"
    )
    return DatasetError(
        f"torchvision:{name}:{root}: no split could be read ({'; '.join(errors)}); {fix}."
    )


def torchvision_dataset(arg: str) -> Dataset:
    """`torchvision:NAME:ROOT[?download=1]`: a torchvision classification dataset whose files
    are under ROOT (downloaded only with download=1, online); its train/val/test splits, or
    train=True/False."""
    import inspect

    import torchvision

    base, query = parse_query(arg)
    name, _, root_arg = base.partition(":")
    known = [
        n for n, c in vars(torchvision.datasets).items() if inspect.isclass(c) and n[:1].isupper()
    ]
    if not name or name not in known:
        from probekit.errors import close_matches

        raise DatasetError(
            f"torchvision:{base}: name a torchvision dataset, e.g. torchvision:Flowers102:ROOT."
            + close_matches(name, known)
        )
    if name not in CLASSIFICATION:
        raise DatasetError(
            f"torchvision:{name} is not an image classification dataset (one class a row): "
            "probekit reads " + ", ".join(CLASSIFICATION) + "; for masks use seg:PATH."
        )
    if not root_arg:
        raise DatasetError(
            f"torchvision:{name} needs the folder of its files: torchvision:{name}:ROOT."
        )
    root = str(user_path(root_arg, "torchvision"))
    download = query.get("download", "") in ("1", "true", "yes")
    params = inspect.signature(getattr(torchvision.datasets, name)).parameters
    tries = ["train", "val", "test"] if "split" in params else ["train", "test"]
    if "split" not in params and "train" not in params:
        tries = ["train"]
    splits: dict[str, Split] = {}
    mapping: dict[str, str] = {}
    classes: list[str] = []
    stamp = []
    errors = []
    for split in tries:
        try:
            ds = _tv(name, root, split, download)
        except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a file
            errors.append(
                f"{split}: a processed file holds more than tensors; probekit loads plain "
                "tensors only and did not run it (delete the file to have it rebuilt)"
            )
            continue
        except (RuntimeError, ValueError, OSError) as e:
            errors.append(f"{split}: {str(e).splitlines()[0][:150]}")
            continue
        labels = _tv_labels(ds)
        files = _tv_files(ds)
        ids = (
            tuple(files)
            if len(files) == len(ds)
            else tuple(f"{name}:{root}#{split}/{i}" for i in range(len(ds)))
        )
        ours = SPLIT_NAMES.get(split, split)
        splits[ours] = Split(ours, ids, labels)
        mapping[ours] = split
        classes = classes or [str(c) for c in getattr(ds, "classes", [])]
        stamp.append(digest(split, str(len(ds)), labels.tobytes(), *_file_stamps(files)))
    if not splits:
        raise _unread(name, root, errors, download)
    top = max(int(s.labels.max()) for s in splits.values() if len(s)) + 1
    names = classes if len(classes) >= top else [str(i) for i in range(top)]
    spec = f"torchvision:{name}:{root}"
    # a dataset of image files is read like an image folder (the same decoding, the same
    # invalid rows); one held in memory or in archives, by its own reader
    on_files = all(Path(i).is_file() for s in splits.values() for i in s.ids[:1])
    return Dataset(
        spec,
        f"torchvision-{slug(name)}-{digest(spec)[:8]}",
        tuple(names),
        splits,
        digest(spec, *stamp, *names),
        reader=None if on_files else TorchvisionReader(name, root, mapping, download),
    )


def with_download(specs: str) -> str:
    """A comma list of dataset specs with every `torchvision:` one allowed to download
    (`--download`); the other kinds as they are."""
    out = []
    for spec in specs.split(","):
        if spec.strip().startswith("torchvision:") and "download=" not in spec:
            spec += ("&" if "?" in spec else "?") + "download=1"
        out.append(spec)
    return ",".join(out)
