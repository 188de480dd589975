"""A feature store's metadata as one typed object, checked once when a store is opened (its
format version first), and read from the store's `zarr.json` alone: listing stores and
showing one (`probekit ls`, `info`) needs neither Zarr nor any array."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from probekit.errors import StoreError

__all__ = ["FORMAT_VERSION", "META_KEY", "BackboneMeta", "DatasetMeta", "StoreMeta"]

FORMAT_VERSION = 1
META_KEY = "probekit"


@dataclass(frozen=True)
class DatasetMeta:
    """Which images a store's rows are: the spec, a short name, their fingerprint."""

    spec: str
    name: str
    fingerprint: str | None
    warnings: tuple[str, ...] = ()  # duplicates, train/test overlap (`data.overlap_warnings`)


@dataclass(frozen=True)
class BackboneMeta:
    """The model a store was extracted from."""

    name: str  # as asked (alias, timm name, or module:function)
    timm_name: str
    params: int
    num_layers: int


@dataclass(frozen=True)
class StoreMeta:
    """Everything a store says about itself (`raw` keeps every field, timings included)."""

    format_version: int
    cache_key: str
    status: str  # "partial" while being written, "complete" after
    dataset: DatasetMeta
    class_names: tuple[str, ...]
    backbone: BackboneMeta
    weights: Mapping[str, Any]  # source, ref, sha256 (`WeightsInfo.to_dict`)
    config: Mapping[str, Any]  # `StoreConfig.to_dict`: what the numbers depend on
    splits: Mapping[str, int]
    chunk_rows: int
    feature_names: tuple[str, ...]
    feature_dims: Mapping[str, int]
    float32_features: tuple[str, ...]
    precision: str
    raw: Mapping[str, Any]
    token_shapes: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # a segmentation store's masks (N, H, W) uint8 at the model's input size (255: ignore)
    mask_shape: tuple[int, int] | None = None
    # the arrays whose chunks' crc32 the store records (`<split>/crc`, a column each); older
    # stores record none
    crc_arrays: tuple[str, ...] = ()
    # a detection store's boxes a split (`<split>/boxes`, `<split>/box_offsets`)
    box_counts: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "store") -> StoreMeta:
        """Checked: the format version first (another is refused, naming both), then that every
        field is there and of its kind; anything wrong is a one-line StoreError."""
        if not d:
            raise StoreError(f"{where} is a Zarr group without probekit metadata.")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{where} has store format {version}, this probekit reads format "
                f"{FORMAT_VERSION}; re-extract it (probekit extract ... --overwrite)."
            )
        try:
            # the layout is what `FeatureStore.create` writes; what the extractor adds about
            # the images and the model defaults to what the config says
            config = dict(d["config"])
            ds = d.get("dataset") or {"spec": config.get("dataset", "?")}
            bb = d.get("backbone") or {"name": config.get("backbone", "?")}
            weights = d.get("weights") or {"source": str(config.get("weights", "?")).split(":")[0]}
            return cls(
                format_version=int(version),
                cache_key=str(d["cache_key"]),
                status=str(d["status"]),
                dataset=DatasetMeta(
                    str(ds["spec"]),
                    str(ds.get("name", "")),
                    None if ds.get("fingerprint") is None else str(ds["fingerprint"]),
                    tuple(str(w) for w in ds.get("warnings", ())),
                ),
                class_names=tuple(str(c) for c in d.get("class_names", [])),
                backbone=BackboneMeta(
                    str(bb["name"]),
                    str(bb.get("timm_name") or config.get("backbone", bb["name"])),
                    int(bb.get("params") or 0),
                    int(bb.get("num_layers") or 0),
                ),
                weights=dict(weights),
                config=config,
                splits={str(k): int(v) for k, v in d["splits"].items()},
                chunk_rows=int(d["chunk_rows"]),
                feature_names=tuple(str(n) for n in d["feature_names"]),
                feature_dims={str(k): int(v) for k, v in d["feature_dims"].items()},
                float32_features=tuple(str(n) for n in d.get("float32_features", [])),
                precision=str(d.get("precision") or config.get("precision", "")),
                raw=dict(d),
                token_shapes={
                    str(k): (int(v[0]), int(v[1])) for k, v in d.get("token_shapes", {}).items()
                },
                mask_shape=(
                    None
                    if d.get("mask_shape") is None
                    else (int(d["mask_shape"][0]), int(d["mask_shape"][1]))
                ),
                crc_arrays=tuple(str(n) for n in d.get("crc_arrays", [])),
                box_counts={str(k): int(v) for k, v in (d.get("box_counts") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(
                f"{where} has damaged probekit metadata ({type(e).__name__}: {e}); "
                "re-extract it (probekit extract ... --overwrite)."
            ) from None

    @classmethod
    def read(cls, path: Any) -> StoreMeta:
        """The metadata of the store at `path`, from its `zarr.json` (no array is opened)."""
        where = repr(str(path))
        try:
            doc = json.loads((path / "zarr.json").read_text())
        except FileNotFoundError:
            raise StoreError(
                f"{where} is not a probekit feature store (no zarr.json); "
                "see `probekit ls` for the stores in the cache."
            ) from None
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{where} has a zarr.json that is not JSON ({e}).") from None
        attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
        return cls.from_dict(attrs.get(META_KEY) or {}, where)

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"

    @property
    def weights_source(self) -> str:
        return str(self.weights.get("source", ""))

    @property
    def label(self) -> str:
        """The name its model goes by in records (`specs.model_label`)."""
        from probekit.specs import model_label

        return model_label(self.backbone.name, self.weights_source, self.weights.get("ref"))

    @property
    def preprocessing(self) -> Mapping[str, Any]:
        return dict(self.config.get("preprocessing", {}))

    def input_text(self) -> str:
        """ "224px", "224px from 256px squares", "224px gpu-decoded" (or draft-decoded): what
        tells stores apart."""
        pre = self.preprocessing
        h, w = (list(pre.get("input_size", [])) or [0, 0, 0])[-2:]
        text = f"{h}px" if h == w else f"{h}x{w}px"
        if "pixel_size" in pre:
            text += f" from {pre['pixel_size']}px squares"
        if "decode" in pre:  # gpu or draft: pixels close to the default decoding's, not equal
            text += f" {pre['decode']}-decoded"
        return text

    def same_model(self, other: StoreMeta) -> bool:
        """Features of the same backbone and weights (what a transfer needs)."""
        keys = ("backbone", "weights")
        return all(self.config.get(k) == other.config.get(k) for k in keys)
