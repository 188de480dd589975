"""Image batches for the extraction loop: decoded by worker processes (`ImageSource`), sliced
from memory, or as JPEG bytes for nvJPEG on the device (`EncodedSource`, `decode_on_device`)."""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from probekit.datasets import Dataset, to_rgb
from probekit.errors import InvalidImageError

__all__ = [
    "Batch",
    "Encoded",
    "EncodedSource",
    "ImageSource",
    "decode_on_device",
    "decode_worker_init",
    "pass_batch",
]


Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


class ImageSource(torch.utils.data.Dataset[Batch]):
    """Map-style source for a DataLoader that fetches whole batches (`__getitems__`).

    A batch is (uint8 images (B, 3, H, W) in channels-last memory, valid (B,) bool, reasons):
    normalization happens later, batched on the device. An unreadable image comes back as
    zeros with `valid=False` and the reason. In-memory images already at the model's geometry
    are sliced as one array, with no per-image work.
    """

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        geometry: Callable[[Image.Image], Any],
        size: tuple[int, int],
        identity: bool = False,
    ):
        self.dataset, self.split, self.geometry, self.size = dataset, split, geometry, size
        arrays = dataset.arrays[split] if dataset.arrays is not None else None
        fits = arrays is not None and arrays.ndim == 4 and arrays.shape[1:] == (*size, 3)
        self._slice = arrays if fits and (identity or dataset.preprocessed) else None
        # batches are slices of memory: the extractor reads them with threads, not processes
        self.in_memory = self._slice is not None

    def __len__(self) -> int:
        return len(self.dataset.splits[self.split])

    def _one(self, index: int) -> tuple[np.ndarray, bool, str]:
        try:
            img = self.dataset.load_image(
                self.split, index, draft=getattr(self.geometry, "draft", None)
            )
            if min(img.size) < 1:
                raise InvalidImageError("empty image")
            return np.asarray(self.geometry(img), dtype=np.uint8), True, ""
        except InvalidImageError as e:
            return np.zeros((*self.size, 3), dtype=np.uint8), False, str(e)

    def __getitems__(self, indices: list[int]) -> Batch:
        if self._slice is not None:
            lo, hi = indices[0], indices[-1] + 1
            contiguous = hi - lo == len(indices) and indices == list(range(lo, hi))
            hwc = np.ascontiguousarray(self._slice[lo:hi] if contiguous else self._slice[indices])
            valid, reasons = np.ones(len(indices), dtype=bool), [""] * len(indices)
        else:
            items = [self._one(i) for i in indices]
            hwc = np.stack([it[0] for it in items])
            valid = np.array([it[1] for it in items], dtype=bool)
            reasons = [it[2] for it in items]
        # NHWC memory viewed as NCHW: channels-last without a copy
        images = torch.from_numpy(hwc).permute(0, 3, 1, 2)
        return images, torch.from_numpy(valid), reasons

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])


class Encoded(NamedTuple):
    """A batch of undecoded images as it leaves a worker: the JPEG files' bytes back to back in
    one uint8 tensor (one transfer between processes and one page-locked copy a batch, where a
    tensor an image cost one of each: measured on the 2-core EPYC, 256 tensors a batch capped a
    DataLoader at 1,600-2,500 images/s, one at 14,000; each also passed a file descriptor,
    where a race of torch's descriptor passing can close a queue's pipe), `offsets` (B + 1, plain
    ints) into it (an image of no bytes was decoded here or is invalid), and the images decoded
    on the CPU (None where the bytes are a JPEG's)."""

    data: torch.Tensor
    offsets: list[int]
    decoded: list[torch.Tensor | None]

    def items(self) -> list[torch.Tensor]:
        """Each image: its JPEG bytes (a 1-D view into `data`) or its decoded (3, H, W) tensor
        (an empty (3, 0, 0) one where it is invalid)."""
        at = self.offsets
        empty = torch.zeros(3, 0, 0, dtype=torch.uint8)
        return [
            self.data[at[i] : at[i + 1]] if at[i + 1] > at[i] else (d if d is not None else empty)
            for i, d in enumerate(self.decoded)
        ]


class EncodedSource(torch.utils.data.Dataset[Any]):
    """Batches of undecoded images for decoding on the GPU (`Encoded`): JPEG files as their
    bytes; anything else (other formats, in-memory arrays) decoded here to a full-size uint8
    (3, H, W) tensor. Geometry and normalization then run on the device."""

    def __init__(self, dataset: Dataset, split: str):
        self.dataset, self.split = dataset, split

    def __len__(self) -> int:
        return len(self.dataset.splits[self.split])

    def _one(self, index: int) -> tuple[bytes | torch.Tensor | None, str]:
        """The file's bytes (a plain JPEG), the image decoded here, or None and the reason."""
        try:
            if self.dataset.arrays is None and self.dataset.reader is None:
                path = self.dataset.splits[self.split].ids[index]
                with open(path, "rb") as f:
                    data = f.read()
                if data[:3] == b"\xff\xd8\xff" and _plain_jpeg(data):  # the device decodes it
                    return data, ""
            img = self.dataset.load_image(self.split, index)
            return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1), ""
        except OSError as e:
            return None, f"{type(e).__name__}: {e}"
        except InvalidImageError as e:
            return None, str(e)

    def __getitems__(self, indices: list[int]) -> tuple[Encoded, torch.Tensor, list[str]]:
        items = [self._one(i) for i in indices]
        sizes = [len(it) if isinstance(it, bytes) else 0 for it, _ in items]
        offsets = [0, *itertools.accumulate(sizes)]
        data = torch.empty(offsets[-1], dtype=torch.uint8)
        view = data.numpy()
        for (it, _), lo, n in zip(items, offsets[:-1], sizes, strict=True):
            if n:
                view[lo : lo + n] = np.frombuffer(it, dtype=np.uint8)  # type: ignore[arg-type]
        decoded = [it if isinstance(it, torch.Tensor) else None for it, _ in items]
        valid = torch.tensor([it is not None for it, _ in items], dtype=torch.bool)
        return Encoded(data, offsets, decoded), valid, [why for _, why in items]

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])


def _plain_jpeg(data: bytes) -> bool:
    """An RGB/grey JPEG with no EXIF rotation (the header only): the kind nvJPEG decodes as the
    CPU reader would. Others (CMYK, rotated) are decoded on the CPU."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.mode in ("RGB", "L") and im.getexif().get(0x0112, 1) == 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def decode_on_device(
    encoded: Encoded,
    valid: torch.Tensor,
    reasons: list[str],
    geometry: Callable[[Any], Any],
    size: tuple[int, int],
    device: str,
) -> Batch:
    """Decode a batch's JPEG bytes with nvJPEG on `device` (one batched call), apply the model's
    geometry (resize + center crop, on tensors) there, one call for each source size, and
    return (B, 3, H, W) uint8 on the device. An image the device cannot decode falls back to
    the CPU reader, or is marked invalid."""
    items = encoded.items()
    out: list[torch.Tensor | None] = [None] * len(items)
    ok = valid.tolist()  # plain bools: indexing the tensor an image at a time cost 0.3 ms a pass
    reasons = list(reasons)
    jpegs = [i for i, t in enumerate(items) if ok[i] and t.ndim == 1]
    with warnings.catch_warnings():
        # torchvision >= 0.29 marks its decoders deprecated (TorchCodec takes over); they work
        warnings.simplefilter("ignore", DeprecationWarning)
        if jpegs:
            _decode_jpegs(items, jpegs, out, ok, reasons, device)
    for i, t in enumerate(items):
        if out[i] is None and ok[i] and t.ndim == 3:
            out[i] = t
    h, w = size
    batch = torch.zeros(len(items), 3, h, w, dtype=torch.uint8, device=device)
    # images of one size go through the geometry together (a photo dataset has few sizes):
    # the same kernels image by image, a few launches a batch instead of a few an image
    by_shape: defaultdict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, img in enumerate(out):
        if img is not None:
            by_shape[tuple(img.shape)].append(i)
    for idx in by_shape.values():
        imgs = torch.stack([out[i].to(device, non_blocking=True) for i in idx])  # type: ignore[union-attr]
        rows = torch.tensor(idx, device=device)
        batch[rows] = geometry(imgs)
    return batch, torch.tensor(ok, dtype=torch.bool), reasons


def _decode_jpegs(
    items: list[torch.Tensor],
    jpegs: list[int],
    out: list[torch.Tensor | None],
    ok: list[bool],
    reasons: list[str],
    device: str,
) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decoded = decode_jpeg([items[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the batch call: decode one by one
        decoded = []
        for i in jpegs:
            try:
                decoded.append(decode_jpeg(items[i], mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(_cpu_fallback(items[i]))
    for i, img in zip(jpegs, decoded, strict=True):
        if img is None:
            ok[i], reasons[i] = False, "the JPEG could not be decoded"
        else:
            out[i] = img


def _cpu_fallback(data: torch.Tensor) -> torch.Tensor | None:
    """Decode bytes the device refused (e.g. progressive or CMYK JPEGs) with PIL."""
    import io

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            im.load()
            rgb = to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def decode_worker_init(worker_id: int) -> None:
    """worker_init_fn of the decoding DataLoaders: a decode worker keeps freed memory in its
    process (`keep_freed_memory`), on a GPU host as on a CPU one. glibc otherwise maps each big
    decode buffer anew and faults its pages in: measured on the 2-core EPYC, 4000x3000 JPEGs to
    a 224 crop, one worker ran at 0.66 of a bare loop, with the policy at 1.00
    (`benchmarks/bench_decode.py`)."""
    from probekit._malloc import keep_freed_memory

    keep_freed_memory()


def pass_batch(batch: Any) -> Any:
    """collate_fn for ImageSource: batches come out of `__getitems__` already collated."""
    return batch
