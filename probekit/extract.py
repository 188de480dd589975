"""The extraction engine: loader -> device -> forward_intermediates -> pooling -> chunk writer."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import timm
import torch
import zarr
from timm.data import create_transform  # type: ignore[attr-defined]
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from probekit import __version__, distributed
from probekit.backbones import DEFAULT_LAYERS, Backbone, create_backbone, parse_layers
from probekit.cache.child import pooled
from probekit.cache.reader import PixelReader
from probekit.cache.store import (
    FeatureStore,
    Location,
    StoreConfig,
    StoreDtype,
    StoreLock,
    cache_root,
    location,
    open_store,
)
from probekit.cache.writer import ChunkBuffer, ChunkWriter, NeedsFloat32
from probekit.data import (
    Dataset,
    EncodedSource,
    ImageSource,
    decode_on_device,
    load_dataset,
    pass_batch,
)
from probekit.errors import (
    InvalidImageError,
    LayerSpecError,
    ProbekitError,
    ProbekitWarning,
    StoreError,
)

if TYPE_CHECKING:
    from probekit.cache.pixels import PixelSource

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_POOLS",
    "POOLS",
    "DeviceCrop",
    "DevicePolicy",
    "ExtractResult",
    "FeatureExtractor",
    "Geometry",
    "extract",
    "geometry_transform",
    "keep_freed_memory",
    "parse_pools",
    "pool_features",
    "resolve_policy",
    "square",
]

POOLS = ("cls", "mean", "cls+mean", "gem")
DEFAULT_POOLS = "cls,mean"
DEFAULT_BATCH_SIZE = 64
DEFAULT_CHUNK_ROWS = 1024
Precision = Literal["fp32", "bf16", "fp16"]


# --------------------------------------------------------------------------- device policy


@dataclass(frozen=True)
class DevicePolicy:
    """One place that decides device and precision: bf16 autocast on CUDA, fp32 on CPUs."""

    device: str
    precision: Precision

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    @property
    def is_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


def resolve_policy(device: str = "auto", precision: str = "auto") -> DevicePolicy:
    """`auto` picks CUDA when present; precision `auto` is bf16 on CUDA and fp32 elsewhere."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ProbekitError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProbekitError(f"device {device!r} asked for, but CUDA is not available; use cpu.")
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ProbekitError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16.")
    return DevicePolicy(str(dev), precision)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pooling


def parse_pools(
    spec: str | Sequence[str], has_class_token: bool
) -> tuple[tuple[str, ...], list[str]]:
    """Resolve a pool spec to pools this model supports, and notes on what was changed.

    `cls` and `cls+mean` need a class token; on a model without one they fall back to `mean`
    (with a warning when nothing else was asked for; silently when `mean` is asked too).
    """
    terms = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not terms:
        raise LayerSpecError(f"empty pool spec; use one or more of {', '.join(POOLS)}.")
    out: list[str] = []
    notes = []
    for t in terms:
        if t not in POOLS:
            raise LayerSpecError(f"unknown pool {t!r}; use one or more of {', '.join(POOLS)}.")
        if "cls" in t and not has_class_token:
            notes.append(f"pool {t!r} needs a class token; this model has none: using 'mean'")
            t = "mean"
        if t not in out:
            out.append(t)
    if notes and "mean" not in terms:
        for n in notes:
            warnings.warn(n, ProbekitWarning, stacklevel=3)
    return tuple(out), notes


def pool_features(
    spatial: torch.Tensor, prefix: torch.Tensor | None, pool: str, gem_p: float = 3.0
) -> torch.Tensor:
    """Pool one intermediate output to (B, D) in float32.

    spatial: (B, C, H, W) or (B, L, C) tokens; prefix: (B, P, C) class/register tokens or None.
    """
    x = spatial.float()
    dims = (2, 3) if x.ndim == 4 else (1,)
    if pool == "mean":
        return x.mean(dims)
    if pool == "gem":
        return x.clamp(min=1e-6).pow(gem_p).mean(dims).pow(1.0 / gem_p)
    assert prefix is not None, "cls pooling needs prefix tokens"
    cls = prefix[:, 0].float()
    if pool == "cls":
        return cls
    if pool == "cls+mean":
        return torch.cat([cls, x.mean(dims)], dim=1)
    raise AssertionError(pool)


# --------------------------------------------------------------------------- the model side


class Geometry:
    """timm's own eval transform for a model minus ToTensor/Normalize (those run on the device).

    An image already at the model's geometry (pre-decoded, pre-cropped) passes through
    untouched: resizing a side to its own length and cropping to the full size is the identity.
    """

    def __init__(self, data_config: dict[str, Any]):
        from torchvision.transforms import CenterCrop, Compose, Resize

        t = create_transform(**data_config, is_training=False)
        steps = list(t.transforms)
        names = [type(s).__name__ for s in steps[-2:]]
        assert names[-1] == "Normalize" and "ToTensor" in names[0], names
        self.transform = Compose(steps[:-2])
        h, w = (int(v) for v in data_config["input_size"][1:])
        self.size = (w, h)  # PIL order
        self.identity_ok = all(
            (isinstance(s, Resize) and s.size in (h, [h], (h, w), [h, w]) and h == w)
            or (isinstance(s, CenterCrop) and tuple(s.size) == (h, w))
            for s in steps[:-2]
        )

        # (the short side's resize, the crop's side, interpolation) of a Resize + square
        # CenterCrop inside the resized image: the crop can then be cut from a larger square
        self.center: tuple[int, int, str] | None = None
        if len(steps) == 4 and isinstance(steps[0], Resize) and isinstance(steps[1], CenterCrop):
            scale, crop = steps[0].size, tuple(steps[1].size)
            scale = scale[0] if isinstance(scale, (list, tuple)) and len(scale) == 1 else scale
            if isinstance(scale, int) and crop == (h, w) and h == w and h <= scale:
                self.center = (scale, h, steps[0].interpolation.value)

    def describe(self) -> str:
        """The geometry as text (the steps and their parameters): the pixel cache's key."""
        return " | ".join(repr(s) for s in self.transform.transforms)

    def cut_from(self, side: int) -> DeviceCrop | None:
        """How this geometry's input comes out of a `square(side)` image: the square holds the
        whole short side, resized to `side`; this geometry's crop is its centre part, resized.
        None where this geometry is not a centre crop (or its resize is larger than `side`)."""
        if self.center is None or self.center[0] > side:
            return None
        scale, crop, mode = self.center
        cut = min(side, round(crop * side / scale))  # the crop's side in the square's pixels
        return DeviceCrop(cut, crop, "bicubic" if mode not in ("bilinear", "nearest") else mode)

    def __call__(self, img: Any) -> Any:
        if self.identity_ok and getattr(img, "size", None) == self.size:
            return img
        return self.transform(img)


def geometry_transform(data_config: dict[str, Any]) -> Geometry:
    """timm's eval geometry for this model (see `Geometry`)."""
    return Geometry(data_config)


def square(side: int) -> Geometry:
    """The short side resized to `side` (bicubic), its centre square: a pixel cache that every
    centre-crop geometry whose resize is at most `side` is cut from (see `DeviceCrop`)."""
    cfg = {"input_size": (3, side, side), "interpolation": "bicubic", "crop_pct": 1.0}
    return Geometry({**cfg, "crop_mode": "center", "mean": (0.0,) * 3, "std": (1.0,) * 3})


@dataclass(frozen=True)
class DeviceCrop:
    """On the device, batched: the centre `cut` x `cut` of square uint8 images, resized to
    `size` x `size` (antialiased, uint8 as a decoder's resize gives). Where `cut` == `size` it
    is a crop alone, and exact."""

    cut: int
    size: int
    mode: str  # bicubic, bilinear or nearest

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's tensor kernels: its uint8 resize follows PIL's to within a level
        x = tvf.center_crop_image(x, [self.cut, self.cut])
        if self.cut == self.size:
            return x
        mode = InterpolationMode(self.mode)
        out: torch.Tensor = tvf.resize_image(
            x, [self.size, self.size], interpolation=mode, antialias=True
        )
        return out


class FeatureExtractor:
    """uint8 image batches in, pooled fp32 features per layer/pool out, from ONE forward pass.

    `crop`: the batches are larger squares (a shared pixel cache): this geometry's input is cut
    from them first, in the same (compiled) graph."""

    def __init__(
        self,
        backbone: Backbone,
        layers: Sequence[int],
        pools: Sequence[str],
        policy: DevicePolicy,
        compile: bool = False,
        crop: DeviceCrop | None = None,
    ):
        # Any: timm's uniform contract (forward_intermediates, forward_head) is not in nn.Module
        self.model: Any = backbone.model.to(policy.device).to(memory_format=torch.channels_last)
        self.layers, self.pools, self.policy = list(layers), list(pools), policy
        self.crop = crop  # input cut from a larger square pixel cache first
        self.has_prefix = int(getattr(self.model, "num_prefix_tokens", 0) or 0) > 0
        cfg = backbone.data_config
        shape = (3,)
        mean = torch.tensor(cfg["mean"], dtype=torch.float64).view(shape)
        std = torch.tensor(cfg["std"], dtype=torch.float64).view(shape)
        self.scale = (1.0 / (255.0 * std)).float().to(policy.device)
        self.shift = (mean / std).float().to(policy.device)
        self.names = [f"layer{i}/{p}" for i in self.layers for p in self.pools] + ["head/embed"]
        self._token_kw = self._token_format(tuple(cfg["input_size"][1:]))
        # uint8 batch on the device -> features: compiled as one graph, the normalization is
        # fused into the first kernels instead of passing over the batch on its own
        self._fn: Callable[[torch.Tensor], dict[str, torch.Tensor]] = self._forward
        if compile:
            self._fn = torch.compile(self._forward, dynamic=False)  # type: ignore[assignment]

    @torch.inference_mode()
    def _token_format(self, size: tuple[int, ...]) -> dict[str, Any]:
        """forward_intermediates options: class tokens apart, and tokens as (B, L, C) where the
        model offers it (pooling over a contiguous dim beats the (H, W) of a permuted view)."""
        if not self.has_prefix or not self.layers:
            return {}
        kw: dict[str, Any] = {"return_prefix_tokens": True, "output_fmt": "NLC"}
        probe = torch.zeros(1, 3, *size, device=self.policy.device)
        try:
            self.model.forward_intermediates(
                probe, indices=self.layers[-1:], norm=True, intermediates_only=True, **kw
            )
        except (AssertionError, TypeError, ValueError, RuntimeError):
            kw.pop("output_fmt")
        return kw

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (x / 255 - mean) / std as float32 on the device, channels-last."""
        return self._normalize(batch.to(self.policy.device, non_blocking=True))

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
        # NHWC rows of W*3 values: the per-channel constants, tiled along a row, broadcast over
        # a long contiguous dim (a (3,) broadcast is several times slower on CPUs)
        x = batch.permute(0, 2, 3, 1).float().contiguous()
        w = x.shape[2]
        x.view(-1, w * 3).mul_(self.scale.repeat(w)).sub_(self.shift.repeat(w))
        return x.permute(0, 3, 1, 2)  # (B, 3, H, W) in channels-last memory

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalized (B, 3, H, W) in; {name: (B, D) float32} out."""
        with self.policy.autocast():
            if self.layers:
                final, inters = self.model.forward_intermediates(
                    x, indices=self.layers, norm=True, **self._token_kw
                )
            else:
                final, inters = self.model.forward_features(x), []
            head = self.model.forward_head(final, pre_logits=True)
        out: dict[str, torch.Tensor] = {}
        for idx, inter in zip(self.layers, inters, strict=True):
            spatial, prefix = inter if self.has_prefix else (inter, None)
            for p in self.pools:
                out[f"layer{idx}/{p}"] = pool_features(spatial, prefix, p)
        out["head/embed"] = head.float().flatten(1)
        return out

    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.crop is not None:
            batch = self.crop(batch)
        return self.features(self._normalize(batch))

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, H, W) images (on any device) -> {name: (B, D) float32} on the device."""
        return self._fn(batch.to(self.policy.device, non_blocking=True))

    @torch.inference_mode()
    def dims(self, size: tuple[int, int]) -> dict[str, int]:
        out = self.features(torch.zeros(1, 3, *size, device=self.policy.device))
        return {k: int(v.shape[1]) for k, v in out.items()}


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class ExtractResult:
    """What one `extract` call did."""

    store_path: str
    cache_hit: bool
    images: int
    invalid: int
    seconds: float  # the whole call
    images_per_s: float  # the extraction loop's throughput (set-up and compiling batch apart)
    resumed_chunks: int
    backbone: str
    dataset: str
    # where the pixels came from: "decoded", or the pixel cache ("pixel cache hit"/"built")
    pixels: str = "decoded"
    compile_seconds: float = 0.0  # the first (compiling) batch, kept out of images_per_s
    # seconds the loop waited for input, the device and storage (see `Waits`)
    waits: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.cache_hit:
            return (
                f"cache hit: {self.backbone} on {self.dataset}, {self.images} images "
                f"({self.invalid} invalid) -> {self.store_path}"
            )
        resumed = (
            f", resumed ({self.resumed_chunks} chunks were done)" if self.resumed_chunks else ""
        )
        compiled = f", compile {self.compile_seconds:.1f} s" if self.compile_seconds else ""
        return (
            f"extracted {self.backbone} on {self.dataset}: {self.images} images, "
            f"{self.invalid} invalid, {self.seconds:.1f} s in all, loop {self.images_per_s:.1f} "
            f"images/s{compiled}{self._bound()}, pixels {self.pixels}{resumed} -> {self.store_path}"
        )

    def _bound(self) -> str:
        """What held the loop back when it was not the model: input or storage (> 25%)."""
        loop = self.images / self.images_per_s if self.images_per_s > 0 else 0.0
        worst = max(("input", "storage"), key=lambda k: self.waits.get(k, 0.0))
        share = self.waits.get(worst, 0.0) / loop if loop > 0 else 0.0
        return f", waited for {worst} {share:.0%} of the time" if share > 0.25 else ""


@dataclass
class Waits:
    """Seconds the extraction loop's host thread waited: for input batches (decoding or
    reading), for the device (its queue full: the device is the bottleneck, as it should be
    on a GPU) and for storage (chunk writes)."""

    input: float = 0.0
    device: float = 0.0
    storage: float = 0.0

    @contextlib.contextmanager
    def on(self, what: Literal["input", "device", "storage"]) -> Iterator[None]:
        """Add the time spent in the block to the waits for `what`."""
        t = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, what, getattr(self, what) + time.perf_counter() - t)


# batches queued on a CUDA device ahead of the one whose features the host is reading back
DEVICE_QUEUE = 3
# who reads a local pixel cache: a reader process ("process"), or threads of this one
# ("threads": object stores, and a diagnosis)
PIXEL_READER: Literal["process", "threads"] = "process"


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Have glibc keep freed blocks in the process (this process, once; Linux).

    By default glibc maps every block over a few MiB on its own and unmaps it on free, and
    trims the heap's free top: a forward on the CPU then faults each activation's pages in
    (zeroed by the kernel) batch after batch. Measured on a 2-core Xeon, EfficientNet-Lite0 at
    batch 64: 44 img/s with 9 of 12 s in the kernel, 102 img/s with blocks up to 1 GiB taken
    from the heap and no trimming below 1 GiB of free memory. The process keeps its peak heap.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return  # no glibc-style mallopt: nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)


def _cores() -> int:
    """The CPU cores this process may use (its affinity), shared by the ranks of one host."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _default_workers(job: Literal["decode", "cpu", "cuda"]) -> int:
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


def _store_path(root: Location, dataset: Dataset, backbone: str, key: str) -> Location:
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in backbone)
    return root / dataset.name / f"{safe}-{key}.zarr"


def _batches(
    chunks: Sequence[int], n: int, chunk_rows: int, batch_size: int
) -> Iterator[list[int]]:
    for c in chunks:
        start, stop = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        for b in range(start, stop, batch_size):
            yield list(range(b, min(stop, b + batch_size)))


def extract(
    backbone: str,
    data: str | Dataset,
    *,
    layers: str | Sequence[int] = DEFAULT_LAYERS,
    pool: str | Sequence[str] = DEFAULT_POOLS,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    dtype: StoreDtype = "float16",
    precision: str = "auto",
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    compile: bool | None = None,
    pixel_cache: bool = False,
    pixel_size: int | None = None,
    decode: Literal["cpu", "gpu"] = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> ExtractResult:
    """Extract pooled multi-layer features of `backbone` over every split of `data` into the cache.

    Reruns are cache hits; an interrupted run resumes chunk by chunk to identical arrays.
    `layers`: last, lastN, all or indices (the pooled `head` embedding is always stored);
    `pool`: any of cls, mean, cls+mean, gem (cls falls back to mean without a class token).
    `pixel_cache`: decode and resize each image once into a uint8 pixel store shared by every
    backbone with the same geometry (features are identical to decoding anew). `pixel_size`
    (implies the pixel cache): one pixel store for backbones of any centre-crop geometry, each
    image's short side resized to `pixel_size` (at least the backbone's own resize) and its
    centre square kept; each backbone's crop is cut and resized from it on the device (exact
    where its own resize is to `pixel_size`, bicubic; close otherwise). `decode="gpu"`:
    JPEGs are decoded and resized on the CUDA device (nvJPEG) instead of by CPU workers.
    `num_workers`: decoding processes; by default every core builds the pixel cache, and beside
    the model all cores but two decode on CUDA, half of them on the CPU.
    """
    if batch_size < 1 or chunk_rows < 1:
        raise ProbekitError("batch_size and chunk_rows must be positive integers.")
    if dtype not in ("float16", "float32"):
        raise ProbekitError(f"unknown dtype {dtype!r}; use float16 or float32.")
    if decode not in ("cpu", "gpu"):
        raise ProbekitError(f"unknown decode {decode!r}; use cpu or gpu.")
    if pixel_size is not None and pixel_size < 1:
        raise ProbekitError(f"pixel_size must be a positive number of pixels, not {pixel_size}.")
    if decode == "gpu" and (pixel_cache or pixel_size is not None):
        raise ProbekitError(
            "decode='gpu' decodes every batch on the device, the pixel cache decodes each image "
            "once on the CPU: use one of them."
        )
    t0 = time.perf_counter()
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    policy = resolve_policy(device, precision)
    # under torchrun: every rank extracts its share of the store's chunks (see _run)
    dist = distributed.init()
    main = dist is None or dist.is_main
    if dist is not None and policy.is_cuda and torch.device(policy.device).index is None:
        policy = DevicePolicy(f"cuda:{dist.local_rank}", policy.precision)
    quiet = quiet or not main
    if decode == "gpu" and not policy.is_cuda:
        raise ProbekitError("decode='gpu' needs a CUDA device; use decode='cpu' on this machine.")
    if not policy.is_cuda:
        keep_freed_memory()  # a CPU forward's activations stay mapped between batches
    skeleton = create_backbone(
        backbone, weights=weights, random_init=random_init, img_size=img_size, load=False
    )
    # as a triage names it: random init and a weights file are other models than the hub's
    label = backbone
    if random_init:
        label = f"{backbone}@random"
    elif weights is not None:
        label = f"{backbone}@{Path(weights).name}"
    layer_idx = parse_layers(layers, skeleton.num_layers)
    pools, pool_notes = parse_pools(pool, skeleton.has_class_token)
    preprocessing = {
        k: skeleton.data_config[k]
        for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    }
    if decode == "gpu":  # nvJPEG and a tensor resize: close to the CPU's pixels, not equal
        preprocessing["decode"] = "gpu"
    geometry = geometry_transform(dict(skeleton.data_config))
    height, width = (int(v) for v in skeleton.data_config["input_size"][1:])
    size = (height, width)
    # what the pixel cache holds: this geometry, or squares this backbone's crop is cut from
    cached, cached_size, crop = geometry, size, None
    if pixel_size is not None:
        pixel_cache = True
        crop = geometry.cut_from(pixel_size)
        if crop is None and geometry.center is not None:
            raise ProbekitError(
                f"pixel_size {pixel_size} is smaller than {backbone}'s own resize "
                f"({geometry.center[0]} px): use {geometry.center[0]} or more, or leave it out."
            )
        if crop is not None:  # other pixels than its own resize: other features, another store
            preprocessing["pixel_size"] = pixel_size
            cached, cached_size = square(pixel_size), (pixel_size, pixel_size)
    config = StoreConfig(
        ds.spec,
        skeleton.timm_name,
        skeleton.weights.key,
        preprocessing,
        layer_idx,
        pools if layer_idx else (),
        dtype,
        policy.precision,
    )
    path = _store_path(cache_root(cache_dir), ds, backbone, config.key)
    n_total = sum(len(s) for s in ds.splits.values())

    # one process of a job holds the lock (against other jobs); its ranks coordinate by barriers
    with contextlib.ExitStack() as stack:
        if main:
            stack.enter_context(StoreLock(path))
        store: FeatureStore | None = None
        hit = False
        if main and path.exists() and not overwrite:
            store = _open_existing(path, ds)
            hit = store is not None and store.is_complete
        if dist is not None:
            hit = dist.broadcast(hit)
        if hit:
            meta = open_store(path).meta
            return ExtractResult(
                str(path),
                True,
                n_total,
                int(meta.get("invalid", 0)),
                time.perf_counter() - t0,
                0.0,
                0,
                label,
                ds.spec,
                # how the store was made (its pixels, its compile time), not this lookup
                str(meta.get("pixels", "decoded")),
                float(meta.get("compile_seconds", 0.0)),
            )
        # the writer (and reader) processes start now, or were kept from an earlier call:
        # they import while the model is built
        writer = stack.enter_context(pooled(ChunkWriter))
        reader = None
        if pixel_cache and PIXEL_READER == "process":
            reader = stack.enter_context(pooled(PixelReader))
        bb = create_backbone(backbone, weights=weights, random_init=random_init, img_size=img_size)
        use_compile = policy.is_cuda if compile is None else compile
        fx = FeatureExtractor(bb, layer_idx, config.pools, policy, compile=use_compile, crop=crop)
        if main and store is None:
            dims = fx.dims(size)
            meta = _store_meta(ds, bb, layer_idx, config, pool_notes, policy)
            store = FeatureStore.create(
                path,
                config,
                meta,
                {k: len(v) for k, v in ds.splits.items()},
                dims,
                chunk_rows,
                set(),
            )
        elif main and store is not None:
            store.remove_partial_files()
        if dist is not None:
            dist.barrier()  # the store exists, as rank 0 made or found it
        if store is None:
            store = open_store(path, allow_partial=True)
        chunk_rows = int(store.meta["chunk_rows"])
        resumed = sum(store.num_chunks(s) - len(store.pending_chunks(s)) for s in ds.splits)
        workers = (
            _default_workers("cuda" if policy.is_cuda else "cpu")
            if num_workers is None
            else num_workers
        )
        done_images, compile_s, loop_s, waits = 0, 0.0, 0.0, Waits()
        pixels, pixel_path = "decoded" if decode == "cpu" else "decoded on the GPU", None
        if pixel_cache and any(store.pending_chunks(s) for s in ds.splits):
            from probekit.cache.pixels import build_pixel_store

            built_info: tuple[str, bool, Any] | None = None
            if main:  # one process decodes; the ranks then read the same pixel store
                pstore, built, _secs = build_pixel_store(
                    ds,
                    cached,
                    cached.describe(),
                    cached_size,
                    cache_dir=cache_dir,
                    num_workers=_default_workers("decode") if num_workers is None else num_workers,
                    identity=cached.identity_ok,
                )
                built_info = (str(pstore.path), built, pstore.meta.get("images_per_s"))
            if dist is not None:
                built_info = dist.broadcast(built_info)
            assert built_info is not None
            pixel_path, built, rate = location(built_info[0]), built_info[1], built_info[2]
            pixels = "from the pixel cache"
            if crop is not None:
                resized = " and resized" if crop.cut != crop.size else ""
                pixels += f" of {pixel_size} px squares, cut{resized} on the device"
            if built:
                pixels += f" (built now, decode {rate:.0f} images/s)"
        while True:
            need: str | None = None
            try:
                done_images, compile_s, loop_s, waits = _run(
                    store,
                    writer,
                    ds,
                    fx,
                    geometry,
                    size,
                    batch_size,
                    chunk_rows,  # type: ignore[arg-type]
                    workers,
                    strict,
                    quiet,
                    dtype,
                    use_compile,
                    pixel_path,
                    decode,
                    (0, 1) if dist is None else (dist.rank, dist.world),
                    reader,
                )
            except NeedsFloat32 as e:
                need = e.name
            needs = sorted({n for n in ([need] if dist is None else dist.all_gather(need)) if n})
            if not needs:
                break
            for name in needs:
                warnings.warn(
                    f"{name} overflows float16; storing it in float32 and redoing "
                    "the chunks written so far",
                    ProbekitWarning,
                    stacklevel=2,
                )
                if main:  # every rank has stopped writing (the gather above)
                    store.switch_to_float32(name)
            if dist is not None:
                dist.barrier()
                store = open_store(path, allow_partial=True)
        # throughput of the extraction loop (loading, forward, pooling, writing); model and
        # store set-up and the compiling first batch are outside it, `seconds` has them all
        run_s = loop_s - compile_s
        waited = {k: round(v, 3) for k, v in asdict(waits).items()}
        if dist is not None:  # all ranks' images over the slowest rank's loop
            parts = dist.all_gather((done_images, run_s, compile_s, waited))
            done_images = sum(p[0] for p in parts)
            run_s, compile_s = max(p[1] for p in parts), max(p[2] for p in parts)
            waited = {k: max(p[3][k] for p in parts) for k in waited}
        rate = done_images / run_s if run_s > 0 else 0.0
        seconds = time.perf_counter() - t0
        invalid = 0
        if main:  # every chunk of every rank is written (the gather above)
            invalid = sum(int((~store.valid(s)).sum()) for s in ds.splits)
            store.update_meta(
                status="complete",
                invalid=invalid,
                seconds=round(seconds, 3),
                compile_seconds=round(compile_s, 3),
                images_per_s=round(rate, 2),
                waits_seconds=waited,
                pixels=pixels,
                processes=1 if dist is None else dist.world,
            )
        if dist is not None:
            invalid = dist.broadcast(invalid)  # after rank 0 marked the store complete
    return ExtractResult(
        str(path),
        False,
        n_total,
        invalid,
        seconds,
        rate,
        resumed,
        label,
        ds.spec,
        pixels,
        compile_s,
        waited,
    )


def _open_existing(path: Location, ds: Dataset) -> FeatureStore | None:
    """The store at `path` if it can be reused or resumed; None when it must be rebuilt."""
    from probekit.cache.store import META_KEY

    try:
        store = open_store(path, allow_partial=True)
    except StoreError:
        try:  # the metadata is written last: without it, creation was interrupted
            interrupted = META_KEY not in zarr.open_group(str(path), mode="r").attrs
        except (FileNotFoundError, ValueError, KeyError, zarr.errors.GroupNotFoundError):
            interrupted = True
        if not interrupted:
            raise
        return None
    recorded = store.fingerprint
    if recorded != ds.fingerprint:
        state = "complete" if store.is_complete else "partial"
        raise StoreError(
            f"dataset {ds.spec!r} changed since the {state} store {path.name} was written "
            "(files added, removed or modified); rerun with --overwrite to extract it anew."
        )
    return store


def _store_meta(
    ds: Dataset,
    bb: Backbone,
    layers: Sequence[int],
    config: StoreConfig,
    pool_notes: list[str],
    policy: DevicePolicy,
) -> dict[str, Any]:
    feature_info = getattr(bb.model, "feature_info", [])
    return {
        "dataset": {"spec": ds.spec, "name": ds.name, "fingerprint": ds.fingerprint},
        "class_names": list(ds.class_names),
        "backbone": {
            "name": bb.name,
            "timm_name": bb.timm_name,
            "params": sum(p.numel() for p in bb.model.parameters()),
            "num_layers": bb.num_layers,
        },
        "weights": bb.weights.to_dict(),
        "layers": [{"index": i, "module": feature_info[i]["module"]} for i in layers],
        "pools": list(config.pools),
        "pool_notes": pool_notes,
        "precision": policy.precision,
        "versions": {
            "probekit": __version__,
            "timm": timm.__version__,
            "torch": torch.__version__,
            "zarr": zarr.__version__,
        },
    }


def _run(
    store: FeatureStore,
    writer: ChunkWriter,
    ds: Dataset,
    fx: FeatureExtractor,
    geometry: Geometry,
    size: tuple[int, int],
    batch_size: int,
    chunk_rows: int,
    workers: int,
    strict: bool,
    quiet: bool,
    dtype: str,
    fixed_batch: bool,
    pixel_path: Location | None = None,
    decode: str = "cpu",
    shard: tuple[int, int] = (0, 1),
    reader: PixelReader | None = None,
) -> tuple[int, float, float, Waits]:
    """Extract every pending chunk of every split.

    Returns (images processed, seconds of the first batch when compiling: the compile time,
    seconds from the first batch requested to the last chunk written, the loop's waits).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    f32 = set(store.meta.get("float32_features", []))
    # this process takes every world-th pending (split, chunk): no chunk has two writers
    rank, world = shard
    everything = [(s, c) for s in ds.splits for c in store.pending_chunks(s)]
    pending: dict[str, list[int]] = {s: [] for s in ds.splits}
    for s, c in everything[rank::world]:
        pending[s].append(c)
    todo = sum(
        min(len(ds.splits[s]), (c + 1) * chunk_rows) - c * chunk_rows
        for s, cs in pending.items()
        for c in cs
    )
    names = list(fx.names)  # a batch's features side by side, in this order
    dims = {k: int(store.meta["feature_dims"][k]) for k in names}
    writer.begin(store.path, dims, dtype, f32, chunk_rows)
    processed, compile_s, waits = 0, 0.0, Waits()
    copy_stream = torch.cuda.Stream() if fx.policy.is_cuda else None  # type: ignore[no-untyped-call]
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet or not console.is_terminal,  # a live bar only where someone watches
        transient=True,
    )
    t_start = time.perf_counter()
    try:
        with progress:
            task = progress.add_task(f"extract {fx.model.__class__.__name__}", total=todo, rate="")
            for split, chunks in pending.items():
                n = len(ds.splits[split])
                if not chunks or n == 0:
                    continue
                source: torch.utils.data.Dataset[Any]
                pixels: PixelSource | None = None
                if pixel_path is not None:
                    from probekit.cache.pixels import PixelSource

                    source = pixels = PixelSource(pixel_path, split)
                elif decode == "gpu":
                    source = EncodedSource(ds, split)
                else:
                    source = ImageSource(ds, split, geometry, size, identity=geometry.identity_ok)
                batches = list(_batches(chunks, n, chunk_rows, batch_size))
                loader: Iterable[Any]
                if reader is not None and pixels is not None and pixels.raw:
                    # a batch's buffer is read into again once the device has copied it: when
                    # the batch DEVICE_QUEUE + 1 later is asked for (the next one on a CPU)
                    hold = DEVICE_QUEUE + 1 if fx.policy.is_cuda else 1
                    loader = reader.read(
                        pixels,
                        batches,
                        threads=max(2, workers),
                        hold=hold,
                        pin=fx.policy.is_cuda,
                    )
                elif pixel_path is not None or getattr(source, "in_memory", False):
                    # reads that release the GIL (chunk files, array slices): threads here,
                    # one copy into pinned memory, no worker processes to copy through
                    loader = _threaded(source, batches, max(2, workers), fx.policy.is_cuda)
                else:  # decoding is CPU work under the GIL: worker processes
                    loader = torch.utils.data.DataLoader(
                        source,
                        batch_sampler=batches,
                        collate_fn=pass_batch,
                        num_workers=workers,
                        pin_memory=fx.policy.is_cuda,
                        persistent_workers=False,
                    )
                sink = _Sink(writer, split, ds, chunk_rows, strict, waits)

                def consume(
                    rows: list[int],
                    feats: np.ndarray,
                    valid_t: torch.Tensor,
                    reasons_t: list[str],
                    sink: _Sink = sink,
                ) -> None:
                    nonlocal processed
                    sink.consume(rows, feats, valid_t, reasons_t)
                    processed += len(rows)
                    rate = processed / max(time.perf_counter() - t_start, 1e-9)
                    progress.update(task, advance=len(rows), rate=f"{rate:.1f} img/s")

                def settle(
                    rows: list[int], host: torch.Tensor, done: Any, valid_t: Any, why: Any, _: Any
                ) -> None:  # a lagged batch: wait for its copy back, then hand it on
                    with waits.on("device"):
                        done.synchronize()
                    consume(rows, host.numpy(), valid_t, why)

                # On CUDA a batch's features are read back DEVICE_QUEUE batches late: the host
                # finishes batch i (and copies the next batches in on a side stream) while the
                # GPU computes batches i + 1 ..., so a hiccup of the host never idles the device.
                # (rows, features on the host (one array), their copy's event, valid, reasons,
                # the batch: kept referenced so its pinned memory is not reused while read)
                lagged: list[tuple[list[int], torch.Tensor, Any, Any, Any, Any]] = []
                batches_in = iter(loader)
                for rows in batches:
                    with waits.on("input"):
                        images, valid_t, reasons_t = next(batches_in)
                    b = len(rows)
                    if decode == "gpu" and pixel_path is None:
                        images, valid_t, reasons_t = decode_on_device(
                            images, valid_t, reasons_t, geometry, size, fx.policy.device
                        )
                    if fixed_batch and b < batch_size:  # one batch shape: no recompilation
                        pad = images.new_zeros(batch_size - b, *images.shape[1:])
                        images = torch.cat([images, pad])
                    x = images
                    if copy_stream is not None and images.device.type == "cpu":
                        with torch.cuda.stream(copy_stream):
                            x = images.to(fx.policy.device, non_blocking=True)
                        torch.cuda.current_stream().wait_stream(copy_stream)
                        x.record_stream(torch.cuda.current_stream())
                    # one layout for every batch, whatever its source (a padded batch, decoded
                    # on the device): a compiled graph is specialized to its input's strides
                    x = x.contiguous(memory_format=torch.channels_last)
                    t_batch = time.perf_counter()
                    out = fx(x)
                    if fixed_batch and processed == 0 and not lagged and compile_s == 0.0:
                        compile_s = time.perf_counter() - t_batch  # the first call compiles
                    # every feature in one (B, sum of dims) array: one copy back per batch
                    flat = torch.cat([out[k][:b] for k in names], dim=1)
                    if copy_stream is None:
                        consume(rows, flat.numpy(), valid_t, reasons_t)
                        continue
                    host = flat.to("cpu", non_blocking=True)
                    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    done.record()
                    lagged.append((rows, host, done, valid_t, reasons_t, (x, images)))
                    while len(lagged) > DEVICE_QUEUE:
                        settle(*lagged.pop(0))
                # the loader must be spent: its end shuts worker processes down (and a loader
                # with more batches than asked for is a bug, as zip(strict=True) would say)
                if next(batches_in, None) is not None:
                    raise AssertionError("the loader yielded more batches than were asked for")
                for item in lagged:
                    settle(*item)
        with waits.on("storage"):
            writer.wait()
    finally:
        writer.settle()  # no chunk of this pass is written after it returns
    return processed, compile_s, time.perf_counter() - t_start, waits


def _threaded(source: Any, batches: list[list[int]], threads: int, pin: bool) -> Iterator[Any]:
    """`source`'s batches in order, read by `threads` threads up to 2 x threads ahead; each
    batch copied once into pinned memory when `pin` (for asynchronous copies to the GPU)."""

    def load(rows: list[int]) -> Any:
        if pin and hasattr(source, "read_into"):  # straight from the file into pinned memory
            buf = torch.empty((len(rows), *source.shape), dtype=torch.uint8, pin_memory=True)
            _, valid, reasons = source.read_into(rows, buf.numpy())
            # the pinned tensor itself (NHWC as NCHW, channels-last), not a view made through
            # NumPy: asynchronous copies record their use of it with the pinned-memory cache
            return buf.permute(0, 3, 1, 2), valid, reasons
        images, valid, reasons = source.__getitems__(rows)
        if pin:
            pinned = torch.empty_like(images, pin_memory=True)  # keeps channels-last strides
            images = pinned.copy_(images)
        return images, valid, reasons

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probekit-reader") as pool:
        ahead: list[Future[Any]] = []
        todo = iter(batches)
        for rows in todo:
            ahead.append(pool.submit(load, rows))
            if len(ahead) >= 2 * threads:
                break
        while ahead:
            batch = ahead.pop(0).result()
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append(pool.submit(load, nxt))
            yield batch


class _Sink:
    """The host side of one split: validity, chunk buffers filled batch by batch, and handed to
    the writer process when full."""

    def __init__(
        self,
        writer: ChunkWriter,
        split: str,
        ds: Dataset,
        chunk_rows: int,
        strict: bool,
        waits: Waits,
    ):
        self.writer, self.split, self.chunk_rows = writer, split, chunk_rows
        self.ids, self.labels = ds.splits[split].ids, ds.splits[split].labels
        self.n = len(self.ids)
        self.strict, self.waits = strict, waits
        self.buf: ChunkBuffer | None = None
        self.reasons: dict[int, str] = {}  # why rows of the chunk being filled are invalid

    def consume(
        self,
        rows: list[int],
        feats: np.ndarray,
        valid_t: torch.Tensor,
        reasons_t: list[str],
    ) -> None:
        """One batch: rows `rows`, features (B, sum of dims) float32 in the store's order."""
        valid = valid_t.numpy()
        if self.strict and not valid.all():
            first = int(np.flatnonzero(~valid)[0])
            raise InvalidImageError(
                f"cannot read image {self.ids[rows[first]]!r}: {reasons_t[first]} "
                "(strict mode; drop --strict to mark such images invalid and go on)."
            )
        chunk = rows[0] // self.chunk_rows
        start, stop = chunk * self.chunk_rows, min(self.n, (chunk + 1) * self.chunk_rows)
        if self.buf is None:
            with self.waits.on("storage"):  # at most SLOTS - 1 chunks wait for storage
                self.buf = self.writer.acquire()
            self.reasons = {}
        at = rows[0] - start
        self.buf.features[at : at + len(rows)] = feats
        self.buf.valid[at : at + len(rows)] = valid
        self.reasons.update((at + i, why) for i, why in enumerate(reasons_t) if why)
        if rows[-1] + 1 < stop:
            return  # batches never straddle chunks: this chunk is not full yet
        self.writer.submit(
            self.buf,
            self.split,
            chunk,
            stop - start,
            self.labels[start:stop],
            self.ids[start:stop],
            self.reasons,
        )
        self.buf = None
