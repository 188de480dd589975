"""The model's input geometry: timm's eval resize and crop on the CPU (`Geometry`), the
shared pixel squares (`square`), and crops cut from them on the device, batched (`DeviceCrop`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.data import create_transform  # type: ignore[attr-defined]
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from probekit.errors import DatasetError

__all__ = ["DeviceCrop", "Geometry", "geometry_transform", "square"]


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
        # JPEGs decoded at a reduced scale (see `drafted`): the short side they keep, or None
        self.draft: int | None = None

    def drafted(self) -> Geometry:
        """This geometry over reduced-size JPEG decoding: libjpeg scales a JPEG by 1/2, 1/4 or
        1/8 in its DCT (PIL's `draft`) wherever the short side stays at least this geometry's
        resize target, and the resize then runs on the smaller image. Close to the exact
        pixels, not equal (measured: feature cosine 0.9988 at 4000x3000); other files, and
        JPEGs under twice the target, decode exactly. Itself where the first step is not a
        short-side resize to a centre crop."""
        if self.center is None:
            return self
        drafted = copy.copy(self)
        drafted.draft = self.center[0]
        return drafted

    def mask(self, mask: Any) -> Any:
        """A mask (a PIL image of one label a pixel) through the same resizes and crops as the
        image, nearest-neighbour: each output pixel keeps the label of the pixel it samples."""
        from torchvision.transforms import CenterCrop, Resize

        if self.identity_ok and getattr(mask, "size", None) == self.size:
            return mask
        for step in self.transform.transforms:
            if isinstance(step, Resize):
                mask = Resize(step.size, InterpolationMode.NEAREST, max_size=step.max_size)(mask)
            elif isinstance(step, CenterCrop):
                mask = step(mask)
            else:
                raise DatasetError(
                    f"masks follow resizes and centre crops; this model's preprocessing has "
                    f"{type(step).__name__}: use --img-size N."
                )
        return mask

    def boxes(
        self, xyxy: np.ndarray, size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Boxes (k, 4) of an image of `size` (w, h) through the same resizes and crops as the
        image (torchvision's box transforms), clipped to the model's input; returns them, the
        fraction of each box's area (after the resizes) left inside the crop, and the resizes'
        scale (input pixels per image pixel; the geometric mean of the two sides')."""
        from torchvision import tv_tensors
        from torchvision.transforms import CenterCrop, Resize

        w, h = size
        boxes = tv_tensors.BoundingBoxes(
            torch.as_tensor(np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)),
            format="XYXY",
            canvas_size=(h, w),
        )
        full = _areas(boxes)
        scale = 1.0
        if not (self.identity_ok and size == self.size):
            for step in self.transform.transforms:
                if isinstance(step, Resize):
                    before = boxes.canvas_size
                    boxes = tvf.resize(boxes, size=step.size, max_size=step.max_size)
                    after = boxes.canvas_size
                    factor = (after[0] / before[0]) * (after[1] / before[1])
                    full, scale = full * factor, scale * factor**0.5
                elif isinstance(step, CenterCrop):
                    boxes = tvf.center_crop(boxes, output_size=list(step.size))
                else:
                    raise DatasetError(
                        f"boxes follow resizes and centre crops; this model's preprocessing "
                        f"has {type(step).__name__}: use --img-size N."
                    )
        ch, cw = boxes.canvas_size
        out = boxes.as_subclass(torch.Tensor).clone()
        out[:, 0::2] = out[:, 0::2].clamp(0, cw)
        out[:, 1::2] = out[:, 1::2].clamp(0, ch)
        kept = _areas(out) / np.maximum(full, 1e-12)
        return out.numpy().astype(np.float64), kept, scale

    def describe(self) -> str:
        """The geometry as text (the steps and their parameters): the pixel cache's key."""
        steps = " | ".join(repr(s) for s in self.transform.transforms)
        return steps + (f" | JPEG draft, short side >= {self.draft}" if self.draft else "")

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


def _areas(boxes: torch.Tensor) -> np.ndarray:
    """(k,) areas of xyxy boxes, as float64."""
    b = boxes.as_subclass(torch.Tensor).double()
    return ((b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)).numpy()


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
