"""What a probe method takes and gives: `ProbeOptions` (checked once), `ProbeData` (the
feature rows and labels of the fit and validation parts, read once for every method) and
`Selection` (the classifier a method chose on validation, and what it saw choosing it)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch

from probekit.cache.store import FeatureStore
from probekit.defaults import DEFAULT_EPOCHS, DEFAULT_HOLDOUT, DEFAULT_PROBE_BATCH_SIZE
from probekit.errors import OptionError, ProbekitError, choice, close_matches
from probekit.evaluation import check_labels
from probekit.methods import PROBE_METHODS, default_probes, method_flags
from probekit.probes.options import MethodOptions
from probekit.probes.rows import Rows, feature_stats, holdout_split, memory_budget
from probekit.specs import is_count, parse_list

__all__ = [
    "Feature",
    "ProbeData",
    "ProbeOptions",
    "Selection",
    "fit_and_validation",
    "ranked_classes",
]


@dataclass(frozen=True)
class ProbeOptions:
    """The options every probe method shares, and each method's own (`settings`), checked
    when made.

    method: a probe method of the registry (`probekit.methods`), a comma list of them, or
    "both" (the default methods). features: the stored features to probe (default: all).
    holdout: the validation share of train when the store has no `val` split. epochs and
    batch_size: the grid trainer's passes and minibatch (linear heads, attentive and MLP
    probes). dtype: float32 or float64; memory_mb: features held at once, beyond it streamed.
    settings: each method's `Options` (`probekit.methods.PROBE_METHODS[m].options`); a method
    not named there has its defaults. `ProbeOptions.of` also takes a method's options by their
    flat names (`lrs`, `cs`, `attn_lrs`, `seg_epochs`, `dense_ks`, `mlp_widths`, ...).
    """

    method: str | Sequence[str] = "both"
    features: str | Sequence[str] | None = None
    holdout: float = DEFAULT_HOLDOUT
    seed: int = 0
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_PROBE_BATCH_SIZE
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "auto"
    memory_mb: int | None = None
    allow_partial: bool = False
    test_split: str = "test"
    write: bool = True
    out: str | os.PathLike[str] | None = None  # where records go (default: beside the store)
    settings: Mapping[str, MethodOptions] = field(default_factory=dict)
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
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not is_count(value):
                raise OptionError(f"{name} must be a positive integer, not {value!r}.")
        mb = self.memory_mb
        if mb is not None and not is_count(mb):
            raise OptionError(f"memory_mb must be a positive number of MiB, not {mb!r}.")
        choice("dtype", self.dtype, ("float32", "float64"))
        for m, given in self.settings.items():
            choice("settings", m, list(PROBE_METHODS))
            if type(given) is not PROBE_METHODS[m].options:
                raise OptionError(
                    f"settings[{m!r}] must be {m}'s options "
                    f"(probekit.methods.PROBE_METHODS[{m!r}].options), not {type(given).__name__}."
                )
        object.__setattr__(self, "settings", dict(self.settings))

    def of_method(self, method: str) -> MethodOptions:
        """`method`'s own options: as given, else its defaults."""
        given = self.settings.get(method)
        return given if given is not None else PROBE_METHODS[method].options()

    @classmethod
    def names(cls) -> list[str]:
        """Every name `of` takes: the shared options, then every method's flat names."""
        shared = [f.name for f in fields(cls) if f.init and f.name != "settings"]
        return [*shared, "settings", *method_flags()]

    @classmethod
    def of(cls, options: ProbeOptions | None = None, **changes: Any) -> ProbeOptions:
        """`options` (default: the defaults) with `changes`: shared options by name, a
        method's own by its flat name (`attn_lrs=...`); an unknown name is an error."""
        flags = method_flags()
        shared = [f.name for f in fields(cls) if f.init]
        known = [*shared, *flags]
        for name in changes:
            if name not in known:
                raise OptionError(f"probe has no option {name!r}." + close_matches(name, known))
        current = {} if options is None else {k: getattr(options, k) for k in shared}
        current.update((k, v) for k, v in changes.items() if k not in flags)
        settings = dict(current.get("settings") or {})
        per: dict[str, dict[str, Any]] = {}
        for flat, value in changes.items():
            if flat in flags:
                per.setdefault(flags[flat].method, {})[flags[flat].name] = value
        for m, values in per.items():
            settings[m] = replace(settings.get(m) or PROBE_METHODS[m].options(), **values)
        return cls(**{**current, "settings": settings})

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ProbeOptions:
        """Options of the entries of `values` that are options (a command's arguments, each
        by its option's name), the others left out."""
        known = set(cls.names())
        return cls.of(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """What decides the result of `probe` (the record file's hash): the shared options
        and the options of each method run."""
        return {
            "methods": list(self.methods),
            "features": list(self.features or ()),
            "holdout": self.holdout,
            "seed": self.seed,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "test_split": self.test_split,
            "settings": {m: self.of_method(m).to_dict() for m in self.methods},
        }

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
    # rows a caller read once for many selections (few-shot episodes): by part ("fit", "val")
    # and feature group, the rows of that part as `fit` and `val` would read them
    held: Mapping[tuple[str, tuple[str, ...]], Rows] = field(default_factory=dict)

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
        held = self.held.get(("fit", tuple(group)))
        return held if held is not None else self.rows_of(group, "train", self.fit_rows, share)

    def val(self, group: Sequence[str], share: float = 1.0) -> Rows:
        held = self.held.get(("val", tuple(group)))
        if held is not None:
            return held
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
