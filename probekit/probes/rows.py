"""What every probe method reads: the train/validation split, the memory budget, standardized
feature rows held on the device or streamed from the store, and their statistics."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from probekit._malloc import return_freed_memory
from probekit.cache.store import FeatureStore
from probekit.errors import ProbekitError

__all__ = [
    "Bounded",
    "Concat",
    "Rows",
    "feature_stats",
    "gather",
    "holdout_split",
    "image_holdout",
    "linear_scores",
    "log_softmax_",
    "memory_budget",
    "token_rows",
]


def holdout_split(
    labels: np.ndarray, fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, holdout) row indices: a stratified, seeded holdout of `fraction` of the rows.

    Classes with a single example stay in the fit part (they cannot be split).
    """
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ProbekitError(f"holdout fraction must be in (0, 1), got {fraction}.")
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    splittable = counts[labels] >= 2
    n_val = max(1, round(fraction * splittable.sum()))
    n_classes = int((counts >= 2).sum())
    if splittable.sum() - n_val < n_classes or n_val < n_classes:
        raise ProbekitError(
            f"the train split ({len(labels)} rows, {n_classes} classes with 2+ examples) is too "
            f"small for a stratified {fraction:.0%} holdout; give a `val` split or more data."
        )
    fit, val = train_test_split(
        idx[splittable], test_size=n_val, random_state=seed, stratify=labels[splittable]
    )
    return np.sort(np.concatenate([fit, idx[~splittable]])), np.sort(val)


def image_holdout(
    store: FeatureStore, holdout: float, seed: int
) -> tuple[str, np.ndarray, np.ndarray]:
    """(validation split, fit rows, validation rows) of a store's usable images for a dense or
    box probe: the train rows and a `val` split where the store has one, else a seeded
    `holdout` of train, stratified by the image labels where they allow it (else plain)."""
    train = np.flatnonzero(store.usable("train"))
    if "val" in store.splits:
        return "val", train, np.flatnonzero(store.usable("val"))
    if len(train) < 4:
        raise ProbekitError(
            f"the train split has {len(train)} usable images: too few to hold some out for "
            "validation; give a `val` split or more images."
        )
    try:
        fit, val = holdout_split(store.labels("train")[train], holdout, seed)
    except ProbekitError:  # labels too thin to stratify: a plain seeded holdout
        order = np.random.default_rng(seed).permutation(len(train))
        cut = max(1, round(holdout * len(train)))
        fit, val = np.sort(order[cut:]), np.sort(order[:cut])
    return "train", train[fit], train[val]


# --------------------------------------------------------------------------- feature rows


def memory_budget(device: str | torch.device, memory_mb: int | None = None) -> int:
    """Bytes of features a probe holds at once: `memory_mb` MiB, or half of what is free on
    the device (for the CPU: available RAM)."""
    if memory_mb is not None:
        if memory_mb <= 0:
            raise ProbekitError(f"memory budget must be positive, got {memory_mb} MiB.")
        return int(memory_mb) * 2**20
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0]) // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return 4 * 2**30


# a streamed read converts at most this many bytes (as float32) at a time, and the store reads
# spans of at most SPAN_BYTES: what a streamed read holds besides its rows
READ_PIECE = 4 * 2**20
READ_RESERVE = 2 * READ_PIECE


class Rows:
    """Standardized rows of L features of one width, as (L, n, D): held on the device when
    they fit the memory budget, otherwise read from the store `block` rows at a time.

    `take(positions)` gives the rows at sorted positions, `blocks()` every row once in
    consecutive blocks. The same rows give the same floats either way.
    """

    def __init__(
        self,
        n: int,
        layers: int,
        width: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        data: torch.Tensor | None = None,
        read: Callable[[np.ndarray], torch.Tensor] | None = None,
        block: int = 0,
    ):
        self.n, self.layers, self.width = n, layers, width
        self.dtype, self.device = dtype, device
        self.data, self._read = data, read
        self.block = max(1, block or n)

    @property
    def resident(self) -> bool:
        return self.data is not None

    @classmethod
    def of(cls, x: torch.Tensor) -> Rows:
        """Rows of tensors already in memory: (N, D) or (L, N, D)."""
        xs = x if x.ndim == 3 else x[None]
        n_feat, n, d = xs.shape
        return cls(n, n_feat, d, dtype=xs.dtype, device=xs.device, data=xs)

    @classmethod
    def from_store(
        cls,
        store: FeatureStore,
        split: str,
        names: Sequence[str],
        rows: np.ndarray,
        mean: torch.Tensor | None,
        std: torch.Tensor | None,
        *,
        budget: int,
        raw: tuple[int, torch.dtype, torch.device] | None = None,
    ) -> Rows:
        """Rows `rows` (sorted) of `split` for features `names`, standardized by mean/std (L, D);
        or, with mean and std None, as stored in `raw` = (width, dtype, device): token arrays
        (n, T, D) as rows of T*D values (each token normalized by the probe itself)."""
        if mean is None or std is None:
            assert raw is not None
            d, dtype, device = raw
            n_feat = len(names)
        else:
            n_feat, d = mean.shape
            dtype, device = mean.dtype, mean.device
        row_bytes = n_feat * d * torch.empty((), dtype=dtype).element_size()

        def read(pos: np.ndarray) -> torch.Tensor:
            out = torch.empty(n_feat, len(pos), d, dtype=dtype, device=device)
            step = max(1, min(len(pos), READ_PIECE // (4 * d)))  # bounded temporaries
            for i, name in enumerate(names):
                for s in range(0, len(pos), step):
                    part = store.read_rows(split, name, rows[pos[s : s + step]])
                    part = part.reshape(len(part), -1)
                    out[i, s : s + step] = torch.from_numpy(part).to(device, dtype)
            if mean is not None and std is not None:
                out -= mean[:, None]
                out /= std[:, None]
            return out

        if row_bytes * len(rows) <= budget:
            data = read(np.arange(len(rows)))
            return cls(len(rows), n_feat, d, dtype=dtype, device=device, data=data)
        # streamed: a read's own temporaries (a piece, the store's span) come out of a budget
        # that has room for them
        held = budget - READ_RESERVE if budget > 2 * READ_RESERVE else budget
        return_freed_memory()  # or glibc keeps what Zarr's decoding threads freed
        block = max(1, held // row_bytes)
        return cls(len(rows), n_feat, d, dtype=dtype, device=device, read=read, block=block)

    def take(self, positions: np.ndarray) -> torch.Tensor:
        """(L, len(positions), D) for sorted positions."""
        if self.data is not None:
            return gather(self.data, torch.from_numpy(positions).to(self.device))
        assert self._read is not None
        return self._read(positions)

    def blocks(self) -> Iterator[torch.Tensor]:
        """Every row once, in order, as (L, b, D) blocks."""
        if self.data is not None:
            yield self.data
            return
        for start in range(0, self.n, self.block):
            yield self.take(np.arange(start, min(start + self.block, self.n)))


def token_rows(
    store: FeatureStore,
    split: str,
    names: Sequence[str],
    rows: np.ndarray,
    budget: int,
    device: torch.device,
) -> Rows:
    """Token rows (L, n, T*D) of token arrays `names` (one token shape), held in their stored
    dtype on `device` when they fit `budget` (half the memory of float32; the probes cast per
    minibatch), else streamed from the store."""
    t, d = store.token_shape(names[0])
    f32 = set(store.meta.get("float32_features", []))
    stored = torch.float32 if any(n in f32 for n in names) else torch.float16
    return Rows.from_store(
        store, split, list(names), rows, None, None, budget=budget, raw=(t * d, stored, device)
    )


def feature_stats(
    store: FeatureStore, split: str, name: str, rows: np.ndarray, block: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and standard deviation of a feature over `rows` of `split`, read `block`
    rows at a time (blocks merged by Chan, Golub and LeVeque's pairwise update)."""
    n, mean, m2 = 0, torch.zeros(0), torch.zeros(0)
    for start in range(0, len(rows), block):
        xb = torch.from_numpy(store.read_rows(split, name, rows[start : start + block])).double()
        nb, mb = len(xb), xb.mean(0)
        m2b = (xb - mb).square_().sum(0)
        if n == 0:
            mean, m2 = mb, m2b
        else:
            delta, total = mb - mean, n + nb
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta.square() * (n * nb / total)
        n += nb
    return mean.numpy(), (m2 / max(n, 1)).sqrt_().numpy()


def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last (short) dimension, in place: several times faster on CPUs
    than torch.log_softmax for a few classes."""
    logits -= logits.amax(-1, keepdim=True)
    logits -= logits.exp().sum(-1, keepdim=True).log_()
    return logits


def gather(data: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """data[:, idx] for (L, n, D) data: as one gather of whole rows when it can (several
    times faster than indexing the middle dimension)."""
    n_feat, n, d = data.shape
    if not data.is_contiguous():
        return data.index_select(1, idx)
    offsets = (torch.arange(n_feat, device=idx.device)[:, None] * n + idx).view(-1)
    return data.view(-1, d).index_select(0, offsets).view(n_feat, -1, d)


class Concat(Rows):
    """Rows of `a` followed by rows of `b` (train then validation, for the refit)."""

    def __init__(self, a: Rows, b: Rows):
        super().__init__(a.n + b.n, a.layers, a.width, dtype=a.dtype, device=a.device)
        self.a, self.b = a, b

    def take(self, positions: np.ndarray) -> torch.Tensor:
        cut = int(np.searchsorted(positions, self.a.n))
        return torch.cat([self.a.take(positions[:cut]), self.b.take(positions[cut:] - self.a.n)], 1)

    def blocks(self) -> Iterator[torch.Tensor]:
        yield from self.a.blocks()
        yield from self.b.blocks()


def linear_scores(
    rows: Rows, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the linear classifier W (C, D), b on one feature's rows."""
    correct, loss, start = 0, 0.0, 0
    with torch.no_grad():
        for xb in rows.blocks():
            yb = y[start : start + xb.shape[1]]
            start += xb.shape[1]
            log_p = log_softmax_(torch.addmm(b, xb[0], w.T))
            correct += int((log_p.argmax(1) == yb).sum())
            loss -= float(log_p.gather(1, yb[:, None]).sum(dtype=torch.float64))
    return correct / rows.n, loss / rows.n


class Bounded(Rows):
    """Rows given in blocks of at most `size` rows (an attentive probe's activations grow with
    the block; a resident split is still read once)."""

    def __init__(self, rows: Rows, size: int):
        super().__init__(rows.n, rows.layers, rows.width, dtype=rows.dtype, device=rows.device)
        self.inner, self.size = rows, size

    def take(self, positions: np.ndarray) -> torch.Tensor:
        return self.inner.take(positions)

    def blocks(self) -> Iterator[torch.Tensor]:
        for block in self.inner.blocks():
            for s in range(0, block.shape[1], self.size):
                yield block[:, s : s + self.size]
