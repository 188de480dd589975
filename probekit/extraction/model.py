"""The model side of extraction: one device/precision policy, pooling, and the feature
extractor (uint8 batches in, pooled features of every layer out, from one forward pass)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from probekit.backbones import Backbone
from probekit.defaults import DEFAULT_POOLS
from probekit.errors import LayerSpecError, OptionError, ProbekitWarning, choice
from probekit.extraction.preprocess import DeviceCrop

__all__ = [
    "DEFAULT_POOLS",
    "POOLS",
    "PRECISIONS",
    "DevicePolicy",
    "FeatureExtractor",
    "parse_pools",
    "parse_tokens",
    "pool_features",
    "pool_tokens",
    "resolve_policy",
    "token_grid",
]

POOLS = ("cls", "mean", "cls+mean", "gem")
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
        raise OptionError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {device!r} asked for, but CUDA is not available; use cpu.")
    choice("precision", precision, PRECISIONS)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
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


def parse_tokens(value: str | int | None) -> str | None:
    """`--tokens`: None (no tokens), "all", or a grid side g >= 1 (as text: "8")."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "all":
        return text
    if text.isdigit() and int(text) >= 1:
        return str(int(text))
    raise OptionError(
        f"tokens takes all or a grid side such as 8 (tokens average-pooled to 8x8), not {value!r}."
    )


def token_grid(grid: str, size: tuple[int, int]) -> tuple[int, int]:
    """The stored grid of a layer whose map is `size` (H, W): the map itself for "all", else
    g x g (a map smaller than g is kept whole: pooling never upsamples)."""
    if grid == "all":
        return size
    g = int(grid)
    return min(g, size[0]), min(g, size[1])


def pool_tokens(
    spatial: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """A layer's patch tokens as (B, T, C) float32, row-major over the (pooled) grid.

    spatial: (B, C, H, W), or (B, H*W, C) tokens (NLC, prefix tokens already apart)."""
    x = spatial.float()
    if x.ndim == 3:
        if grid == size:
            return x
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, *size)
    if tuple(x.shape[2:]) != grid:
        x = torch.nn.functional.adaptive_avg_pool2d(x, grid)
    return x.flatten(2).transpose(1, 2)


class FeatureExtractor:
    """uint8 image batches in, pooled fp32 features per layer/pool out, from ONE forward pass.

    `crop`: the batches are larger squares (a shared pixel cache): this geometry's input is cut
    from them first, in the same (compiled) graph. `tokens` ("all" or a grid side): each
    layer's patch tokens too, as `layer<i>/tokens` (B, T*C) (`token_shapes` gives (T, C))."""

    def __init__(
        self,
        backbone: Backbone,
        layers: Sequence[int],
        pools: Sequence[str],
        policy: DevicePolicy,
        compile: bool = False,
        crop: DeviceCrop | None = None,
        tokens: str | None = None,
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
        size = tuple(int(v) for v in cfg["input_size"][1:])
        self._token_kw = self._token_format(size)
        self.tokens = tokens
        # each layer's map (H, W) and stored grid, by a probing forward (NCHW)
        self.maps: dict[str, tuple[int, int]] = {}
        self.grids: dict[str, tuple[int, int]] = {}
        self.token_shapes: dict[str, tuple[int, int]] = {}
        if tokens is not None:
            self._probe_maps(size, tokens)
            self.names += list(self.token_shapes)
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

    @torch.inference_mode()
    def _probe_maps(self, size: tuple[int, ...], tokens: str) -> None:
        if not self.layers:
            raise LayerSpecError("--tokens stores the tokens of chosen layers; choose --layers.")
        probe = torch.zeros(1, 3, *size, device=self.policy.device)
        inters = self.model.forward_intermediates(
            probe, indices=self.layers, norm=True, intermediates_only=True
        )
        for idx, inter in zip(self.layers, inters, strict=True):
            if inter.ndim != 4:
                raise LayerSpecError(
                    f"layer {idx} of {type(self.model).__name__} gives no spatial map "
                    f"({tuple(inter.shape)}); --tokens needs a ViT or CNN layer."
                )
            name = f"layer{idx}/tokens"
            hw = (int(inter.shape[2]), int(inter.shape[3]))
            grid = token_grid(tokens, hw)
            self.maps[name], self.grids[name] = hw, grid
            self.token_shapes[name] = (grid[0] * grid[1], int(inter.shape[1]))

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
            name = f"layer{idx}/tokens"
            if name in self.grids:
                tok = pool_tokens(spatial, self.maps[name], self.grids[name])
                out[name] = tok.reshape(len(tok), -1)
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
