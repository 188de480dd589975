"""Datasets where users keep them, read by the libraries that own their formats: Hugging Face
`datasets` (`hf:`), WebDataset tar shards (`wds:`) and torchvision's classification datasets
(`torchvision:`). Each becomes a `Dataset` whose images a picklable reader loads by index (in
the extraction's worker processes too); ids are stable (source, split and row, or shard and
key), so the fingerprint, resume and torchrun sharding work as for image folders."""

from __future__ import annotations

import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image

from probekit.data import (
    Dataset,
    Split,
    _digest,
    _slug,
    _sorted_splits,
    _user_path,
    decode_image,
    read_image,
)
from probekit.errors import DatasetError, InvalidImageError

__all__ = [
    "HFReader",
    "TarReader",
    "TorchvisionReader",
    "hf_dataset",
    "torchvision_dataset",
    "wds_dataset",
    "with_download",
]

# a source's split names as probekit's (train, val, test)
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def _need(extra: str, what: str) -> DatasetError:
    return DatasetError(f"{what} needs the `{extra}` library: pip install 'probekit[datasets]'.")


def _query(arg: str) -> tuple[str, dict[str, str]]:
    """ARG?k=v&k=v -> (ARG, {k: v})."""
    base, _, q = arg.partition("?")
    return base, dict(parse_qsl(q, keep_blank_values=True))


# --------------------------------------------------------------------------- Hugging Face


_OPEN: dict[tuple[str, str | None], Any] = {}  # per process: the opened DatasetDict
_UNDECODED: dict[tuple[str, str | None, str, str], Any] = {}  # and each split, undecoded


def _open_hf(source: str, config: str | None, on_disk: bool) -> Any:
    key = (source, config)
    if key not in _OPEN:
        import datasets

        got = datasets.load_from_disk(source) if on_disk else datasets.load_dataset(source, config)
        if isinstance(got, datasets.Dataset):
            got = datasets.DatasetDict({"train": got})
        _OPEN[key] = got
    return _OPEN[key]


@dataclass(frozen=True)
class HFReader:
    """Loads row `index` of a split's image column (undecoded bytes, decoded like a file)."""

    source: str
    config: str | None
    on_disk: bool
    splits: Mapping[str, str]  # probekit's split -> the dataset's
    image: str

    def load(self, split: str, index: int) -> Image.Image:
        key = (self.source, self.config, self.splits[split], self.image)
        ds = _UNDECODED.get(key)
        if ds is None:  # the image column as stored bytes: decoded here, as files are
            import datasets

            whole = _open_hf(self.source, self.config, self.on_disk)[self.splits[split]]
            column = whole.select_columns([self.image])  # a row read is its image alone
            ds = _UNDECODED[key] = column.cast_column(self.image, datasets.Image(decode=False))
        value = ds[int(index)][self.image]
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return decode_image(data)
        if not path:
            raise InvalidImageError(f"row {index} of {self.splits[split]} has no image")
        return read_image(path)


def hf_dataset(arg: str) -> Dataset:
    """`hf:NAME_OR_PATH[:CONFIG][?image=COL&label=COL]`: a `save_to_disk` folder, or a hub
    dataset (cached by `datasets`; online the first time)."""
    try:
        import datasets
    except ImportError:
        raise _need("datasets", "hf:") from None
    base, query = _query(arg)
    if not base:
        raise DatasetError("hf needs a dataset: hf:NAME_OR_PATH[:CONFIG][?image=COL&label=COL].")
    local = Path(base).expanduser()
    on_disk = local.is_dir()
    source, config = (str(local.resolve()), None) if on_disk else (base.partition(":")[::2])
    config = config or None
    try:
        dd = _open_hf(source, config, on_disk)
    except Exception as e:  # whatever `datasets` raises for a folder or hub name it cannot load
        said = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        where = "the folder" if on_disk else "the hub (offline? it must be in the cache)"
        raise DatasetError(f"hf:{base}: cannot load it from {where}: {said}") from None
    first = dd[next(iter(dd))]
    features = first.features
    image = query.get("image") or next(
        (k for k, v in features.items() if isinstance(v, datasets.Image)), None
    )
    label = query.get("label") or next(
        (k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None
    )
    label = label or next((k for k in ("label", "labels", "fine_label") if k in features), None)
    cols = ", ".join(features)
    if image is None or image not in features:
        raise DatasetError(
            f"hf:{base}: no image column {repr(image) if image else '(none is an Image)'}; "
            f"columns: {cols}. Name it: hf:{base}?image=COL."
        )
    if label is None or label not in features:
        raise DatasetError(
            f"hf:{base}: no label column {repr(label) if label else '(none is a ClassLabel)'}; "
            f"columns: {cols}. "
            f"Name it: hf:{base}?label=COL."
        )
    feat = features[label]
    names: list[str] = list(feat.names) if isinstance(feat, datasets.ClassLabel) else []
    raw: dict[str, list[Any]] = {s: list(dd[s][label]) for s in dd}
    if not names:
        names = sorted({str(v) for vals in raw.values() for v in vals})
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, Split] = {}
    mapping: dict[str, str] = {}
    for hf_split in dd:
        ours = SPLIT_NAMES.get(hf_split, hf_split)
        if ours in splits:
            raise DatasetError(
                f"hf:{base}: splits {mapping[ours]!r} and {hf_split!r} are both {ours}."
            )
        vals = raw[hf_split]
        labels = np.array(
            [int(v) if isinstance(feat, datasets.ClassLabel) else index[str(v)] for v in vals],
            dtype=np.int64,
        )
        ids = tuple(f"{source}#{hf_split}/{i}" for i in range(len(vals)))
        splits[ours] = Split(ours, ids, labels)
        mapping[ours] = hf_split
    ordered = {s: splits[s] for s in _sorted_splits(list(splits))}
    prints = [f"{s}:{dd[s]._fingerprint}:{dd[s].num_rows}" for s in dd]
    spec = (
        f"hf:{source}"
        + (f":{config}" if config else "")
        + (f"?image={image}&label={label}" if query else "")
    )
    reader = HFReader(source, config, on_disk, mapping, image)
    return Dataset(
        spec,
        f"hf-{_slug(Path(source).name)}-{_digest(spec)[:8]}",
        tuple(names),
        ordered,
        _digest(spec, *prints, *names),
        reader=reader,
    )


# --------------------------------------------------------------------------- WebDataset

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


@dataclass(frozen=True)
class TarReader:
    """Loads a sample's image by its byte range in its shard (local file or fsspec URL)."""

    shards: tuple[str, ...]
    # per split: (shard index, data offset, size) of each sample's image
    members: Mapping[str, tuple[tuple[int, int, int], ...]] = field(repr=False)

    def load(self, split: str, index: int) -> Image.Image:
        shard, offset, size = self.members[split][index]
        try:
            with _open_shard(self.shards[shard]) as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise InvalidImageError(f"{type(e).__name__}: {e}") from None
        return decode_image(data)


def _open_shard(url: str) -> Any:
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _shard_split(url: str) -> str:
    """A shard's split from its name (`train-000.tar`, `val_01.tar`, `test.tar`), else train."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    for sep in ("-", "_"):
        head = name.split(sep)[0]
        if head in SPLIT_NAMES:
            return SPLIT_NAMES[head]
    return SPLIT_NAMES.get(name, "train")


def _index_shard(url: str) -> list[tuple[str, int, int, str | None]]:
    """(key, image offset, image size, cls text) of each sample of a shard, in order."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict[str, Any]] = {}
    with _open_shard(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = base_plus_ext(m.name)  # webdataset's own rule: key up to the first dot
            if key is None:
                continue
            entry = samples.setdefault(key, {})
            ext = ext.lower()
            if ext in IMAGE_KEYS and "image" not in entry:
                entry["image"] = (m.offset_data, m.size)
            elif ext in ("cls", "cls.txt", "label"):
                got = tar.extractfile(m)
                entry["cls"] = got.read().decode().strip() if got is not None else None
    out = []
    for key, e in samples.items():
        if "image" in e:
            out.append((key, e["image"][0], e["image"][1], e.get("cls")))
    return out


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    out = []
    for p in braceexpand(pattern):
        if "://" in p:
            out.append(p)
        else:
            out.append(str(Path(p).expanduser().resolve()))
    return out


def wds_dataset(arg: str) -> Dataset:
    """`wds:PATTERN` (brace-expanded tar shards, local or fsspec URLs) or `wds:DIR` (its
    `*.tar`): samples of `jpg`/`png`/... with a `cls` label; the split from each shard's name;
    class names from `classes.txt` beside the shards (else the labels themselves)."""
    try:
        import braceexpand  # noqa: F401  (webdataset's own dependency)
        import webdataset  # noqa: F401
    except ImportError:
        raise _need("webdataset", "wds:") from None
    if not arg:
        raise DatasetError("wds needs shards: wds:DIR or wds:PATTERN (e.g. train-{000..009}.tar).")
    local = Path(arg).expanduser()
    if "://" not in arg and local.is_dir():
        shards = sorted(str(p.resolve()) for p in local.glob("*.tar"))
        where: Path | None = local.resolve()
        if not shards:
            raise DatasetError(f"wds:{arg}: no .tar shards in {where}.")
    else:
        shards = _expand(arg)
        where = Path(shards[0]).parent if shards and "://" not in shards[0] else None
        missing = [s for s in shards if "://" not in s and not Path(s).is_file()]
        if missing:
            raise DatasetError(
                f"wds:{arg}: {len(missing)} of {len(shards)} shards are missing, e.g. {missing[0]}."
            )
    listed = where / "classes.txt" if where is not None else None
    names: list[str] = []
    if listed is not None and listed.is_file():
        names = [ln.strip() for ln in listed.read_text().splitlines() if ln.strip()]
    rows: dict[str, list[tuple[int, int, int, str, str]]] = {}  # shard, offset, size, key, cls
    stamp = []
    for i, shard in enumerate(shards):
        try:
            samples = _index_shard(shard)
        except (OSError, tarfile.TarError) as e:
            raise DatasetError(f"wds:{arg}: shard {shard} cannot be read ({e}).") from None
        split = _shard_split(shard)
        for key, offset, size, cls in samples:
            if cls is None:
                raise DatasetError(
                    f"wds:{arg}: sample {key!r} of {shard} has no cls label; write one per "
                    "sample (key.cls)."
                )
            rows.setdefault(split, []).append((i, offset, size, key, cls))
        stamp.append(
            f"{shard}:{len(samples)}:" + _digest(*(f"{k}:{s}:{c}" for k, _, s, c in samples))
        )
    if not rows:
        raise DatasetError(f"wds:{arg}: the shards hold no image samples.")
    values = sorted({c for r in rows.values() for *_, c in r}, key=lambda c: (len(c), c))
    if names:
        bad = [c for c in values if not c.isdigit() or int(c) >= len(names)]
        if bad:
            raise DatasetError(
                f"wds:{arg}: cls {bad[0]!r} is not an index into the {len(names)} classes of "
                "classes.txt."
            )
        index = {c: int(c) for c in values}
    else:
        names = values
        index = {c: i for i, c in enumerate(values)}
    splits: dict[str, Split] = {}
    members: dict[str, tuple[tuple[int, int, int], ...]] = {}
    for split in _sorted_splits(list(rows)):
        r = rows[split]
        ids = tuple(f"{shards[i]}#{key}" for i, _, _, key, _ in r)
        splits[split] = Split(split, ids, np.array([index[c] for *_, c in r], dtype=np.int64))
        members[split] = tuple((i, off, size) for i, off, size, _, _ in r)
    spec = f"wds:{where}" if "://" not in arg and local.is_dir() else f"wds:{arg}"
    return Dataset(
        spec,
        f"wds-{_slug(Path(shards[0]).stem)}-{_digest(spec)[:8]}",
        tuple(names),
        splits,
        _digest(spec, *stamp, *names),
        reader=TarReader(tuple(shards), members),
    )


# --------------------------------------------------------------------------- torchvision

_TV_OPEN: dict[tuple[str, str, str, bool], Any] = {}


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


def torchvision_dataset(arg: str) -> Dataset:
    """`torchvision:NAME:ROOT[?download=1]`: a torchvision classification dataset whose files
    are under ROOT (downloaded only with download=1, online); its train/val/test splits, or
    train=True/False."""
    import inspect

    import torchvision

    base, query = _query(arg)
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
    if not root_arg:
        raise DatasetError(
            f"torchvision:{name} needs the folder of its files: torchvision:{name}:ROOT."
        )
    root = str(_user_path(root_arg, "torchvision"))
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
        sizes = []
        for f in files:
            try:
                st = Path(f).stat()
                sizes.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                sizes.append(f)
        stamp.append(_digest(split, str(len(ds)), labels.tobytes(), *sizes))
    if not splits:
        raise DatasetError(
            f"torchvision:{name}:{root}: no split could be read ({'; '.join(errors)}); put its "
            f"files there, or add ?download=1 (online)."
        )
    top = max(int(s.labels.max()) for s in splits.values() if len(s)) + 1
    names = classes if len(classes) >= top else [str(i) for i in range(top)]
    spec = f"torchvision:{name}:{root}"
    # a dataset of image files is read like an image folder (the same decoding, the same
    # invalid rows); one held in memory or in archives, by its own reader
    on_files = all(Path(i).is_file() for s in splits.values() for i in s.ids[:1])
    return Dataset(
        spec,
        f"torchvision-{_slug(name)}-{_digest(spec)[:8]}",
        tuple(names),
        splits,
        _digest(spec, *stamp, *names),
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
