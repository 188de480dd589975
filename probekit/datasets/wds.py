"""WebDataset tar shards (`wds:DIR|PATTERN`): brace-expanded, local or fsspec; indexed once,
each image read by its byte range; the split from shard names, classes from classes.txt."""

from __future__ import annotations

import tarfile
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
    slug,
    sorted_splits,
)
from probekit.errors import DatasetError, InvalidImageError

__all__ = ["TarReader", "wds_dataset"]


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
        raise need_extra("webdataset", "wds:") from None
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
            f"{shard}:{len(samples)}:" + digest(*(f"{k}:{s}:{c}" for k, _, s, c in samples))
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
    for split in sorted_splits(list(rows)):
        r = rows[split]
        ids = tuple(f"{shards[i]}#{key}" for i, _, _, key, _ in r)
        splits[split] = Split(split, ids, np.array([index[c] for *_, c in r], dtype=np.int64))
        members[split] = tuple((i, off, size) for i, off, size, _, _ in r)
    spec = f"wds:{where}" if "://" not in arg and local.is_dir() else f"wds:{arg}"
    return Dataset(
        spec,
        f"wds-{slug(Path(shards[0]).stem)}-{digest(spec)[:8]}",
        tuple(names),
        splits,
        digest(spec, *stamp, *names),
        reader=TarReader(tuple(shards), members),
    )
