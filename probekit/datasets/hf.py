"""Hugging Face datasets (`hf:NAME_OR_PATH[:CONFIG][?image=&label=]`): save_to_disk folders
or the hub cache, image bytes decoded as files are, class names from the ClassLabel."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from probekit.datasets.common import (
    SPLIT_NAMES,
    Dataset,
    Split,
    decode_image,
    digest,
    need_extra,
    parse_query,
    read_image,
    slug,
    sorted_splits,
)
from probekit.errors import DatasetError, InvalidImageError

__all__ = ["HFReader", "hf_dataset"]


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
    # rows without a label (ClassLabel's -1), by probekit's split: invalid rows
    unlabeled: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def load(self, split: str, index: int) -> Image.Image:
        key = (self.source, self.config, self.splits[split], self.image)
        ds = _UNDECODED.get(key)
        if ds is None:  # the image column as stored bytes: decoded here, as files are
            import datasets

            whole = _open_hf(self.source, self.config, self.on_disk)[self.splits[split]]
            column = whole.select_columns([self.image])  # a row read is its image alone
            ds = _UNDECODED[key] = column.cast_column(self.image, datasets.Image(decode=False))
        if int(index) in self.unlabeled.get(split, ()):
            raise InvalidImageError(f"row {index} of {self.splits[split]} has no label (-1)")
        value = ds[int(index)][self.image]
        if value is None:
            raise InvalidImageError(f"row {index} of {self.splits[split]} has no image (None)")
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return decode_image(data)
        if not path:
            raise InvalidImageError(f"row {index} of {self.splits[split]} has no image")
        return read_image(path)


def _labelled_splits(
    base: str,
    source: str,
    dd: Any,
    raw: Mapping[str, list[Any]],
    feat: Any,
    index: Mapping[str, int],
) -> tuple[dict[str, Split], dict[str, str], dict[str, frozenset[int]], list[str]]:
    """Each split of the DatasetDict as probekit's (ids and labels), its name in the dataset,
    its rows without a label (-1: invalid rows), and what was said of them."""
    import datasets

    splits: dict[str, Split] = {}
    mapping: dict[str, str] = {}
    unlabeled: dict[str, frozenset[int]] = {}
    notes: list[str] = []
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
        missing = np.flatnonzero(labels < 0)  # ClassLabel's -1: no label
        if len(missing) == len(labels) and len(labels):
            notes.append(f"split {hf_split} has no labels (every row -1): left out")
            continue
        if len(missing):
            notes.append(
                f"{len(missing)} images of {ours} have no label (-1): left out as invalid rows"
            )
            labels[missing] = 0  # a row never evaluated: its image is never read
            unlabeled[ours] = frozenset(int(i) for i in missing)
        ids = tuple(f"{source}#{hf_split}/{i}" for i in range(len(vals)))
        splits[ours] = Split(ours, ids, labels)
        mapping[ours] = hf_split
    return splits, mapping, unlabeled, notes


def hf_dataset(arg: str) -> Dataset:
    """`hf:NAME_OR_PATH[:CONFIG][?image=COL&label=COL]`: a `save_to_disk` folder, or a hub
    dataset (cached by `datasets`; online the first time)."""
    try:
        import datasets
    except ImportError:
        raise need_extra("datasets", "hf:") from None
    base, query = parse_query(arg)
    if not base:
        raise DatasetError("hf needs a dataset: hf:NAME_OR_PATH[:CONFIG][?image=COL&label=COL].")
    local = Path(base).expanduser()
    on_disk = local.is_dir()
    folder, _, named = base.partition(":")
    if not on_disk and named and Path(folder).expanduser().is_dir():
        raise DatasetError(
            f"hf:{base}: {folder} is a saved dataset folder (save_to_disk), which has no "
            f"configs; drop :{named} (hf:{folder})."
        )
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
    splits, mapping, unlabeled, notes = _labelled_splits(base, source, dd, raw, feat, index)
    if not splits:
        raise DatasetError(f"hf:{base}: no split has labels (every row is -1).")
    ordered = {s: splits[s] for s in sorted_splits(list(splits))}
    prints = [f"{s}:{dd[s]._fingerprint}:{dd[s].num_rows}" for s in mapping.values()]
    spec = (
        f"hf:{source}"
        + (f":{config}" if config else "")
        + (f"?image={image}&label={label}" if query else "")
    )
    reader = HFReader(source, config, on_disk, mapping, image, unlabeled)
    return Dataset(
        spec,
        f"hf-{slug(Path(source).name)}-{digest(spec)[:8]}",
        tuple(names),
        ordered,
        digest(spec, *prints, *names),
        warnings=tuple(notes),
        reader=reader,
    )
