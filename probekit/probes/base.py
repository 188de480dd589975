"""What a probe method takes and gives: `ProbeOptions` (checked once), `ProbeData` (the
feature rows and labels of the fit and validation parts, read once for every method) and
`Selection` (the classifier a method chose on validation, and what it saw choosing it)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from probekit.cache.store import FeatureStore
from probekit.defaults import (
    DEFAULT_ATTN_LRS,
    DEFAULT_ATTN_WDS,
    DEFAULT_CS,
    DEFAULT_DENSE_KS,
    DEFAULT_EPOCHS,
    DEFAULT_HOLDOUT,
    DEFAULT_LRS,
    DEFAULT_PROBE_BATCH_SIZE,
    DEFAULT_QUERIES,
    DEFAULT_SEG_BATCH_SIZE,
    DEFAULT_SEG_EPOCHS,
    DEFAULT_SEG_LRS,
    DEFAULT_SEG_WDS,
    DEFAULT_TOL,
    DEFAULT_WDS,
)
from probekit.errors import OptionError, ProbekitError, choice
from probekit.evaluation import check_labels
from probekit.methods import PROBE_METHODS, default_probes
from probekit.probes.rows import Rows, feature_stats, holdout_split, memory_budget
from probekit.specs import as_ints, is_count, options_of, parse_list

__all__ = [
    "Feature",
    "ProbeData",
    "ProbeOptions",
    "Selection",
    "fit_and_validation",
    "ranked_classes",
]


def _positive_numbers(name: str, values: Sequence[float], zero: bool = False) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise OptionError(f"{name} takes a list of numbers, not {values!r}.") from None
    if not out or any(not math.isfinite(v) or v < 0 or (v == 0 and not zero) for v in out):
        least = "0 or more" if zero else "above 0"
        raise OptionError(f"{name} must be a non-empty list of numbers {least}, got {values!r}.")
    return out


@dataclass(frozen=True)
class ProbeOptions:
    """Every option of `probe` with its default, checked when made.

    method: a probe method of the registry (`probekit.methods`: linear, logreg), a comma list
    of them, or "both" (every method). features: the stored features to probe (default: all).
    holdout: the validation share of train when the store has no `val` split. linear heads:
    lrs (scaled by batch_size / 256), wds, epochs, batch_size, optimizer (sgd or adamw).
    logreg: cs (the C path), tol (L-BFGS gradient tolerance), refit on train + validation.
    attentive (on token arrays, `extract --tokens`): attn_lrs x attn_wds (AdamW), queries
    (learned queries), attn_heads (default: width / 64), position ("learned": a learned
    position term in the attention logits; "none": order-blind), epochs and batch_size shared.
    dtype: float32 or float64; memory_mb: features held at once, beyond it streamed.
    """

    method: str | Sequence[str] = "both"
    features: str | Sequence[str] | None = None
    holdout: float = DEFAULT_HOLDOUT
    seed: int = 0
    lrs: Sequence[float] = DEFAULT_LRS
    wds: Sequence[float] = DEFAULT_WDS
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_PROBE_BATCH_SIZE
    optimizer: Literal["sgd", "adamw"] = "sgd"
    cs: Sequence[float] = DEFAULT_CS
    tol: float = DEFAULT_TOL
    attn_lrs: Sequence[float] = DEFAULT_ATTN_LRS
    attn_wds: Sequence[float] = DEFAULT_ATTN_WDS
    queries: int = DEFAULT_QUERIES
    attn_heads: int | None = None
    position: Literal["learned", "none"] = "learned"
    seg_lrs: Sequence[float] = DEFAULT_SEG_LRS
    seg_wds: Sequence[float] = DEFAULT_SEG_WDS
    seg_epochs: int = DEFAULT_SEG_EPOCHS
    seg_batch_size: int = DEFAULT_SEG_BATCH_SIZE
    dense_ks: Sequence[int] = DEFAULT_DENSE_KS
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "auto"
    memory_mb: int | None = None
    allow_partial: bool = False
    test_split: str = "test"
    write: bool = True
    out: str | os.PathLike[str] | None = None  # where records go (default: beside the store)
    methods: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        wanted = ["both"] if self.method == "both" else parse_list(self.method, "method")
        methods = default_probes() if wanted == ["both"] else wanted
        if not methods:
            raise OptionError("method is empty; use " + ", ".join([*PROBE_METHODS, "both"]) + ".")
        for m in methods:
            choice("method", m, [*PROBE_METHODS, "both"])
        object.__setattr__(self, "methods", tuple(dict.fromkeys(methods)))
        if self.features is not None:
            names = parse_list(self.features, "features")
            if not names:
                raise OptionError("features is empty; name features or leave it out.")
            object.__setattr__(self, "features", tuple(names))
        if not 0 < float(self.holdout) < 1:
            raise OptionError(f"holdout must be a fraction in (0, 1), not {self.holdout!r}.")
        for name in ("epochs", "batch_size", "queries", "seg_epochs", "seg_batch_size"):
            value = getattr(self, name)
            if not is_count(value):
                raise OptionError(f"{name} must be a positive integer, not {value!r}.")
        if not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise OptionError(f"tol must be a positive number, not {self.tol!r}.")
        mb = self.memory_mb
        if mb is not None and not is_count(mb):
            raise OptionError(f"memory_mb must be a positive number of MiB, not {mb!r}.")
        heads = self.attn_heads
        if heads is not None and not is_count(heads):
            raise OptionError(f"attn_heads must be a positive integer, not {heads!r}.")
        choice("position", self.position, ("learned", "none"))
        choice("optimizer", self.optimizer, ("sgd", "adamw"))
        choice("dtype", self.dtype, ("float32", "float64"))
        object.__setattr__(self, "lrs", _positive_numbers("lrs", self.lrs))
        object.__setattr__(self, "wds", _positive_numbers("wds", self.wds, zero=True))
        object.__setattr__(self, "cs", _positive_numbers("cs", self.cs))
        object.__setattr__(self, "attn_lrs", _positive_numbers("attn_lrs", self.attn_lrs))
        object.__setattr__(self, "attn_wds", _positive_numbers("attn_wds", self.attn_wds, True))
        object.__setattr__(self, "seg_lrs", _positive_numbers("seg_lrs", self.seg_lrs))
        object.__setattr__(self, "seg_wds", _positive_numbers("seg_wds", self.seg_wds, True))
        ks = as_ints(self.dense_ks, "dense_ks")
        if not ks or min(ks) < 1:
            raise OptionError(
                f"dense_ks must be positive integers such as 10,30, not {self.dense_ks!r}."
            )
        object.__setattr__(self, "dense_ks", tuple(sorted(set(ks))))

    @classmethod
    def of(cls, options: ProbeOptions | None = None, **changes: Any) -> ProbeOptions:
        """`options` (default: the defaults) with `changes`; an unknown name is an error."""
        return options_of(cls, "probe", options, changes)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise OptionError(f"unknown device {self.device!r}; use auto, cpu or cuda.") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


@dataclass
class Feature:
    """A stored feature's standardization: train statistics (D,) on the probe's device."""

    name: str
    mean: torch.Tensor
    std: torch.Tensor


def fit_and_validation(
    store: FeatureStore, holdout: float, seed: int
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(validation split, fit rows, their labels, validation rows, their labels): the usable
    train rows and a real `val` split, else a seeded stratified `holdout` of train."""
    train_rows = np.flatnonzero(store.usable("train"))
    train_y = store.labels("train")[train_rows]
    check_labels(train_y, train_y[:0], store.class_names, who="a probe")
    if "val" in store.splits:  # a real validation split
        val_rows = np.flatnonzero(store.usable("val"))
        return "val", train_rows, train_y, val_rows, store.labels("val")[val_rows]
    fit_idx, val_idx = holdout_split(train_y, holdout, seed)
    return "train", train_rows[fit_idx], train_y[fit_idx], train_rows[val_idx], train_y[val_idx]


@dataclass
class ProbeData:
    """The fit and validation parts of one store's train data, for every probe method.

    The validation part is a real `val` split, else a stratified holdout of train; the test
    split is not read here (only the evaluation reads it).
    """

    store: FeatureStore
    options: ProbeOptions
    names: list[str]
    n_classes: int
    device: torch.device
    budget: int  # bytes of features held at once
    fit_rows: np.ndarray
    val_split: str
    val_rows: np.ndarray
    fit_y: torch.Tensor
    val_y: torch.Tensor
    feats: dict[str, Feature]
    warnings: tuple[str, ...] = ()  # the dataset's own (duplicates, overlap: `Dataset.warnings`)
    token_names: tuple[str, ...] = ()  # the token arrays the token methods read

    @classmethod
    def prepare(cls, store: FeatureStore, options: ProbeOptions) -> ProbeData:
        opts = options
        tokens = [f for f in (opts.features or ()) if f in store.token_names]
        asked = [f for f in (opts.features or ()) if f not in tokens]
        names = store.check_features(asked) if opts.features else store.feature_names
        if any(PROBE_METHODS[m].tokens for m in opts.methods):
            tokens = tokens or ([] if asked else store.token_names)
            if not tokens:
                among = " among the features asked" if asked else ""
                raise ProbekitError(
                    f"{store.path.name} has no token arrays{among}: attentive probes read patch "
                    "tokens; extract with --tokens all (or --tokens 8)."
                )
        if not names and any(not PROBE_METHODS[m].tokens for m in opts.methods):
            raise ProbekitError(
                "the features asked are all token arrays; pooled probes (linear, logreg) need a "
                "pooled feature such as layer11/cls, or use --method attentive alone."
            )
        if opts.test_split not in store.splits or "train" not in store.splits:
            raise ProbekitError(
                f"probes need a train and a {opts.test_split!r} split; the store has "
                f"{', '.join(store.splits)}."
            )
        dev = opts.torch_device()
        budget = memory_budget(dev, opts.memory_mb)
        said = list(store.info.dataset.warnings)
        val_split, fit_rows, fit_y, val_rows, val_y = fit_and_validation(
            store, opts.holdout, opts.seed
        )
        feats: dict[str, Feature] = {}
        pooled = any(not PROBE_METHODS[m].tokens for m in opts.methods)
        for name in names if pooled else ():  # train statistics, a block at a time
            width = store.feature_dim(name)
            block = max(256, min(16384, budget // (3 * 8 * width)))  # float64 blocks
            mean_np, std_np = feature_stats(store, "train", name, fit_rows, block)
            mean = torch.from_numpy(mean_np).to(dev, opts.torch_dtype)
            std = torch.from_numpy(std_np).to(dev, opts.torch_dtype)
            std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features: 0
            feats[name] = Feature(name, mean, std)
        return cls(
            store,
            opts,
            list(names),
            len(store.class_names),
            dev,
            budget,
            fit_rows,
            val_split,
            val_rows,
            torch.from_numpy(fit_y).to(dev),
            torch.from_numpy(val_y).to(dev),
            feats,
            tuple(said),
            tuple(tokens),
        )

    @property
    def fit_share(self) -> float:
        return len(self.fit_rows) / (len(self.fit_rows) + len(self.val_rows))

    def rows_of(
        self, group: Sequence[str], split: str, rows: np.ndarray, share: float = 1.0
    ) -> Rows:
        """Standardized rows of features `group` (one width), within `share` of the budget."""
        mean = torch.stack([self.feats[g].mean for g in group])
        std = torch.stack([self.feats[g].std for g in group])
        budget = int(self.budget * share)
        return Rows.from_store(self.store, split, group, rows, mean, std, budget=budget)

    def fit(self, group: Sequence[str], share: float = 1.0) -> Rows:
        return self.rows_of(group, "train", self.fit_rows, share)

    def val(self, group: Sequence[str], share: float = 1.0) -> Rows:
        return self.rows_of(group, self.val_split, self.val_rows, share)


def ranked_classes(logits: np.ndarray, top: int = 5) -> np.ndarray:
    """(n, top) classes of (n, C) logits, best first (ties: the lower class first)."""
    return np.ascontiguousarray(np.argsort(-logits, 1, kind="stable")[:, :top])


@dataclass
class Selection:
    """The classifier one method chose on validation: W (C, D), b (C,) on `feature` (a linear
    method), or any `scorer` of rows (an attentive probe on token rows, which `reader` reads).

    config: what was chosen and how (the record's hyperparameters, with `val_top1`);
    curve: (feature, its best configuration, its validation top-1) of every feature (the
    layer-wise curve); train_rows/train_y: the rows the classifier was fit on (made when
    asked: only the evaluation reads them), for its train top-1.
    """

    method: str
    feature: Feature
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    config: dict[str, Any]
    curve: list[tuple[str, dict[str, Any], float]]
    train_rows: Callable[[], Rows]
    train_y: torch.Tensor
    # (1, b, width) rows -> (b, C) logits, where the classifier is not linear
    scorer: Callable[[torch.Tensor], torch.Tensor] | None = None
    # (store, split, rows, budget) -> its rows, where they are not standardized features
    reader: Callable[[FeatureStore, str, np.ndarray, int], Rows] | None = None
    # (n_val, C) validation logits of a classifier fitted without the validation rows, where
    # the final one was refit on them (logreg): what temperature scaling is fitted on
    val_logits: np.ndarray | None = None

    def logits(self, xb: torch.Tensor) -> torch.Tensor:
        if self.scorer is not None:
            return self.scorer(xb)
        assert self.weight is not None and self.bias is not None
        return torch.addmm(self.bias, xb[0], self.weight.T)

    def rows(self, store: FeatureStore, split: str, rows: np.ndarray, budget: int) -> Rows:
        """The rows this classifier reads, of `rows` of `split` of `store`."""
        if self.reader is not None:
            return self.reader(store, split, rows, budget)
        f = self.feature
        return Rows.from_store(
            store, split, [f.name], rows, f.mean[None], f.std[None], budget=budget
        )

    def all_logits(self, rows: Rows) -> np.ndarray:
        """(n, C) float64 logits of every row (C is small: held whole)."""
        with torch.no_grad():
            return np.concatenate([self.logits(xb).double().cpu().numpy() for xb in rows.blocks()])

    def train_top1(self) -> float:
        rows, correct, start = self.train_rows(), 0, 0
        with torch.no_grad():
            for xb in rows.blocks():
                yb = self.train_y[start : start + xb.shape[1]]
                start += xb.shape[1]
                correct += int((self.logits(xb).argmax(1) == yb).sum())
        return correct / rows.n
