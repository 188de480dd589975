"""What one extraction will do, decided before anything runs: the options (validated once) and
the plan resolved from them (device policy, layers, pools, geometry, crop, store config, path,
label). Resolving builds the backbone on the meta device only: no weights, no images, no store."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import timm
import torch
import zarr

from probekit import __version__
from probekit.backbones import Backbone, check_patch_size, parse_layers
from probekit.backbones.weights import is_url
from probekit.cache.store import Location, StoreConfig, StoreDtype, cache_root
from probekit.datasets import Dataset
from probekit.defaults import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_ROWS, DEFAULT_LAYERS, DEFAULT_POOLS
from probekit.distributed import SINGLE, Dist
from probekit.errors import OptionError, ProbekitError, choice
from probekit.extraction.model import (
    DevicePolicy,
    parse_pools,
    parse_tokens,
    resolve_policy,
)
from probekit.extraction.preprocess import DeviceCrop, Geometry, geometry_transform, square
from probekit.specs import ModelSpec, is_count, options_of

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHUNK_ROWS",
    "ExtractOptions",
    "ExtractPlan",
    "check_img_size",
    "default_workers",
    "store_path",
]


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract: every option of `extract` (and of the CLI's extract options), with its
    default, checked once when made.

    layers: last, lastN, all or block indices (the pooled `head` embedding is always stored).
    pool: any of cls, mean, cls+mean, gem (cls falls back to mean without a class token).
    pixel_cache: decode and resize each image once into a uint8 pixel store shared by every
    backbone with the same geometry (features identical to decoding anew). pixel_size (implies
    the pixel cache): one pixel store for backbones of any centre-crop geometry, each image's
    short side resized to `pixel_size` (at least the backbone's own resize) and its centre
    square kept; each backbone's crop is cut and resized from it on the device. decode="gpu":
    JPEGs decoded and resized on the CUDA device (nvJPEG) instead of by CPU workers.
    decode="draft": CPU workers let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale wherever
    the short side stays at least the resize target (`Geometry.drafted`): several times faster
    for camera-size photos, features close to the default's, stored apart (as is the pixel
    cache). The default, "cpu", decodes exactly.
    num_workers: decoding processes (default: every core builds the pixel cache; beside the
    model all cores but two decode on CUDA, half of them on the CPU).
    tokens: "all" or a grid side g: each chosen layer's patch tokens stored too, as
    `<split>/layer<i>/tokens` (N, T, D) (all of them, or average-pooled to a g x g grid), for
    attentive probes; the store's size is estimated first and checked against free space.
    """

    layers: str | Sequence[int] = DEFAULT_LAYERS
    pool: str | Sequence[str] = DEFAULT_POOLS
    img_size: int | None = None
    tokens: str | int | None = None
    dtype: StoreDtype = "float16"
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    compile: bool | None = None  # default: on for CUDA
    pixel_cache: bool = False
    pixel_size: int | None = None
    decode: Literal["cpu", "gpu", "draft"] = "cpu"
    cache_dir: str | os.PathLike[str] | None = None
    strict: bool = False
    overwrite: bool = False
    quiet: bool = False
    # who reads a local pixel cache: a reader process, or threads of this one (a diagnosis)
    pixel_reader: Literal["process", "threads"] = "process"
    # batches queued on a CUDA device ahead of the one whose features are read back
    device_queue: int = 3

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_rows", "device_queue"):
            value = getattr(self, name)
            if not is_count(value):
                raise OptionError(f"{name} must be a positive integer, not {value!r}.")
        for name in ("img_size", "pixel_size"):
            value = getattr(self, name)
            if value is not None and not is_count(value):
                raise OptionError(f"{name} must be a positive number of pixels, not {value!r}.")
        if self.num_workers is not None and self.num_workers < 0:
            raise OptionError(f"num_workers must be 0 or more, not {self.num_workers}.")
        object.__setattr__(self, "tokens", parse_tokens(self.tokens))
        choice("dtype", self.dtype, ("float16", "float32"))
        choice("decode", self.decode, ("cpu", "gpu", "draft"))
        choice("pixel_reader", self.pixel_reader, ("process", "threads"))
        if self.decode == "gpu" and (self.pixel_cache or self.pixel_size is not None):
            raise OptionError(
                "decode='gpu' decodes every batch on the device, the pixel cache decodes each "
                "image once on the CPU: use one of them."
            )

    @classmethod
    def of(cls, options: ExtractOptions | None = None, **changes: Any) -> ExtractOptions:
        """`options` (default: the defaults) with `changes`; an unknown name is an error."""
        return options_of(cls, "extract", options, changes)

    @property
    def uses_pixel_cache(self) -> bool:
        return self.pixel_cache or self.pixel_size is not None


@dataclass(frozen=True)
class PixelPlan:
    """What the pixel cache holds for this extraction: the geometry's own pixels, or squares
    this backbone's crop is cut from on the device (`crop`)."""

    geometry: Geometry
    size: tuple[int, int]
    crop: DeviceCrop | None
    side: int | None  # the squares' side, where they are squares


@dataclass(frozen=True)
class ExtractPlan:
    """Everything one extraction is, resolved before it runs (see `resolve`)."""

    model: ModelSpec
    dataset: Dataset
    options: ExtractOptions
    policy: DevicePolicy
    skeleton: Backbone  # built on the meta device: layers, preprocessing, weights identity
    layers: tuple[int, ...]
    pools: tuple[str, ...]
    pool_notes: tuple[str, ...]
    geometry: Geometry
    size: tuple[int, int]  # (height, width) of the model's input
    pixels: PixelPlan | None  # None: images are decoded for this extraction alone
    config: StoreConfig
    path: Location
    compile: bool

    @classmethod
    def resolve(
        cls, model: ModelSpec, dataset: Dataset, options: ExtractOptions, dist: Dist = SINGLE
    ) -> ExtractPlan:
        """The plan of extracting `model` over `dataset` (nothing is loaded or written)."""
        opts = options
        policy = resolve_policy(opts.device, opts.precision)
        if dist.is_group and policy.is_cuda and torch.device(policy.device).index is None:
            policy = DevicePolicy(f"cuda:{dist.local_rank}", policy.precision)
        if opts.decode == "gpu" and not policy.is_cuda:
            raise OptionError("decode='gpu' needs a CUDA device; use decode='cpu' on this machine.")
        skeleton = model.create(img_size=opts.img_size, load=False, cache_dir=opts.cache_dir)
        check_img_size(model.name, skeleton, opts.img_size)
        layers = parse_layers(opts.layers, skeleton.num_layers)
        if opts.tokens is not None and not layers:
            raise OptionError("tokens are stored for chosen layers; give --layers (e.g. last).")
        pools, notes = parse_pools(opts.pool, skeleton.has_class_token)
        keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        preprocessing = {k: skeleton.data_config[k] for k in keys}
        if opts.decode != "cpu":  # nvJPEG and a tensor resize, or drafts: close, not equal
            preprocessing["decode"] = opts.decode
        geometry = geometry_transform(dict(skeleton.data_config))
        if opts.decode == "draft":
            geometry = geometry.drafted()
        height, width = (int(v) for v in skeleton.data_config["input_size"][1:])
        pixels = _pixel_plan(model.name, geometry, (height, width), opts)
        if pixels is not None and pixels.crop is not None:  # other pixels: another store
            preprocessing["pixel_size"] = pixels.side
        config = StoreConfig(
            dataset.spec,
            skeleton.timm_name,
            skeleton.weights.key,
            preprocessing,
            layers,
            pools if layers else (),
            opts.dtype,
            policy.precision,
            parse_tokens(opts.tokens),  # already text: parsed when the options were made
        )
        return cls(
            model=model,
            dataset=dataset,
            options=opts,
            policy=policy,
            skeleton=skeleton,
            layers=layers,
            pools=config.pools,
            pool_notes=tuple(notes),
            geometry=geometry,
            size=(height, width),
            pixels=pixels,
            config=config,
            path=store_path(cache_root(opts.cache_dir), dataset, model.name, config.key),
            compile=policy.is_cuda if opts.compile is None else opts.compile,
        )

    @property
    def images(self) -> int:
        return sum(len(s) for s in self.dataset.splits.values())

    def loop_workers(self) -> int:
        """Decoding processes beside the model."""
        if self.options.num_workers is not None:
            return self.options.num_workers
        return default_workers("cuda" if self.policy.is_cuda else "cpu")

    def decode_workers(self) -> int:
        """Decoding processes that build the pixel cache (nothing else runs meanwhile)."""
        n = self.options.num_workers
        return default_workers("decode") if n is None else n

    def build(self) -> Backbone:
        """The backbone with its weights (the one step of the plan that loads anything)."""
        return self.model.create(img_size=self.options.img_size, cache_dir=self.options.cache_dir)

    def cost(self) -> dict[str, Any]:
        """Parameters (M) and GMACs per image at the evaluated size (counted on the meta-device
        skeleton), the evaluated and the pretrained input side."""
        from probekit.backbones.cost import count_gmacs, count_params

        model = self.skeleton.model
        card = getattr(model, "probekit_card", None)  # a builder's, counted when it was built
        try:
            gmacs: float | None = (
                card["gmacs"] if card is not None else round(count_gmacs(model, self.size), 4)
            )
        except Exception:  # a model whose forward cannot run on the meta device: not counted
            gmacs = None
        params = card["params"] if card is not None else count_params(model)
        return {
            "params_m": round(params / 1e6, 4),
            "gmacs": gmacs,
            "img_size": self.size[0],
            "native_size": self.skeleton.native_size or self.size[0],
        }

    def recipe(self) -> dict[str, Any]:
        """The model, dataset and options that make this store (the options that change its
        numbers; its device kind and precision as resolved)."""
        opts = {k: _jsonable(getattr(self.options, k)) for k in RECIPE_OPTIONS}
        device = "cuda" if self.policy.is_cuda else str(self.policy.device)
        return {
            "backbone": (
                self.model
                if self.model.weights is None or is_url(self.model.weights)
                else replace(self.model, weights=os.path.abspath(self.model.weights))
            ).text,
            "dataset": self.dataset.spec,
            "options": {
                **opts,
                "device": device,
                "precision": self.policy.precision,
                "chunk_rows": self.options.chunk_rows,
            },
        }

    def store_meta(self, bb: Backbone, fx: Any = None) -> dict[str, Any]:
        """The metadata a new store of this plan records (besides its config and layout);
        `fx` (the `FeatureExtractor`) tells what its token arrays are."""
        feature_info = getattr(bb.model, "feature_info", [])
        ds = self.dataset
        extra: dict[str, Any] = {}
        if fx is not None and fx.token_shapes:
            from probekit.extraction.tokens import token_meta

            extra["tokens"] = token_meta(fx)
        return {
            **extra,
            "dataset": {
                "spec": ds.spec,
                "name": ds.name,
                "fingerprint": ds.fingerprint,
                "warnings": list(ds.warnings),
            },
            "class_names": list(ds.class_names),
            "backbone": {
                "name": bb.name,
                "timm_name": bb.timm_name,
                "params": sum(p.numel() for p in bb.model.parameters()),
                "num_layers": bb.num_layers,
            },
            "weights": bb.weights.to_dict(),
            "layers": [{"index": i, "module": feature_info[i]["module"]} for i in self.layers],
            "pools": list(self.config.pools),
            "pool_notes": list(self.pool_notes),
            "cost": self.cost(),
            "precision": self.policy.precision,
            # how to make the same store again (`probekit verify --repair` recomputes with it)
            "recipe": self.recipe(),
            "versions": {
                "probekit": __version__,
                "timm": timm.__version__,
                "torch": torch.__version__,
                "zarr": zarr.__version__,
            },
        }


RECIPE_OPTIONS = (
    "layers",
    "pool",
    "img_size",
    "tokens",
    "dtype",
    "pixel_cache",
    "pixel_size",
    "decode",
)


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else list(value)


def check_img_size(name: str, skeleton: Backbone, img_size: int | None) -> None:
    """A size a patch model can cut into whole patches (a one-line error before any weights)."""
    if img_size is not None:
        check_patch_size(skeleton.model, name, img_size)


def _pixel_plan(
    name: str, geometry: Geometry, size: tuple[int, int], opts: ExtractOptions
) -> PixelPlan | None:
    if not opts.uses_pixel_cache:
        return None
    side = opts.pixel_size
    if side is None:
        return PixelPlan(geometry, size, None, None)
    crop = geometry.cut_from(side)
    if crop is None and geometry.center is not None:
        raise ProbekitError(
            f"pixel_size {side} is smaller than {name}'s own resize "
            f"({geometry.center[0]} px): use {geometry.center[0]} or more, or leave it out."
        )
    if crop is None:  # not a centre-crop geometry: its own pixels
        return PixelPlan(geometry, size, None, None)
    squares = square(side).drafted() if opts.decode == "draft" else square(side)
    return PixelPlan(squares, (side, side), crop, side)


def store_path(root: Location, dataset: Dataset, backbone: str, key: str) -> Location:
    """`<root>/<dataset>/<backbone>-<key>.zarr` (the backbone's name made path-safe)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in backbone)
    return root / dataset.name / f"{safe}-{key}.zarr"


def _cores() -> int:
    """The CPU cores this process may use (its affinity), shared by the ranks of one host."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_workers(job: Literal["decode", "cpu", "cuda"]) -> int:
    """Decoding worker processes when none are asked for, by what else runs meanwhile.

    decode: nothing (the pixel cache is built before the loop): every core. cuda: the loop's
    thread and the chunk writer take a core each; the rest decode. cpu: the model's own threads
    take half the cores.
    """
    cores = _cores()
    if job == "decode":
        return min(32, cores)
    if job == "cuda":
        return min(32, max(1, cores - 2))
    return min(8, cores // 2)
