"""What a triage will do, decided before it runs: models, datasets, transfers, methods."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from probekit.datasets import Dataset, load_dataset
from probekit.defaults import DEFAULT_IMG_SIZE
from probekit.errors import OptionError, ProbekitError
from probekit.extraction import ExtractOptions, Geometry, geometry_transform
from probekit.methods import PROBE_METHODS, all_methods
from probekit.specs import ModelSpec, as_ints, is_count, parse_list, parse_models

__all__ = ["TriagePlan", "parse_sizes", "parse_transfers"]


def parse_transfers(spec: str | Sequence[str] | None) -> list[tuple[str, str]]:
    """`SRC->DST` pairs: probes trained on SRC's train split, tested on DST's test split."""
    out = []
    for item in parse_list(spec, "transfer"):
        src, sep, dst = item.partition("->")
        if not sep or not src.strip() or not dst.strip():
            raise OptionError(f"transfer {item!r}: write SOURCE->TARGET, e.g. 'mnist5k->digits'.")
        out.append((src.strip(), dst.strip()))
    return out


@dataclass(frozen=True)
class TriagePlan:
    """A triage decided before it runs: the models, datasets (listed and checked once, up
    front: a bad spec stops before any work), transfers, methods and the extraction options."""

    models: list[ModelSpec]
    data_specs: list[str]
    pairs: list[tuple[str, str]]  # transfers: probes trained on SRC, tested on DST
    methods: list[str]
    ks: list[int]
    features: list[str] | None  # None: every stored feature
    reference: str | None
    datasets: dict[str, Dataset]
    extract: ExtractOptions  # with the pixel cache policy decided (img_size: the first size)
    # the evaluation resolutions (None: each model's own): every backbone runs at each
    sizes: tuple[int | None, ...] = (DEFAULT_IMG_SIZE,)
    # few-shot episodes (`probekit.fewshot`): shots per class (none: no few-shot) and episodes
    shots: tuple[int, ...] = ()
    episodes: int = 5
    # tokens were asked for by dense or box probes alone: stored only for datasets with masks
    # or boxes
    dense_tokens_only: bool = False
    # the probe methods' own options by flat name (checked): what every probe is given
    probe_options: dict[str, Any] = field(default_factory=dict)

    @property
    def sweep(self) -> bool:
        """More than one resolution: every entry is named with its size."""
        return len(self.sizes) > 1

    def at(self, size: int | None) -> ExtractOptions:
        return replace(self.extract, img_size=size)

    def for_dataset(self, options: ExtractOptions, ds: Dataset) -> ExtractOptions:
        """`options` for one dataset: no tokens for a dataset without masks or boxes where
        only dense or box probes asked for them."""
        if self.dense_tokens_only and not (ds.dense or ds.detection):
            return replace(options, tokens=None)
        return options

    @classmethod
    def resolve(
        cls,
        backbones: str | Sequence[str],
        data: str | Sequence[str],
        *,
        transfer: str | Sequence[str] | None,
        methods: str | Sequence[str],
        ks: Sequence[int],
        features: str | Sequence[str] | None,
        reference: str | None,
        pixel_cache: bool | None,
        pixel_size: int | str | None,
        extract: ExtractOptions,
        img_size: int | str | Sequence[int | str] | None = DEFAULT_IMG_SIZE,
        shots: Sequence[int] | str | None = None,
        episodes: int = 5,
        probe_options: Mapping[str, Any] | None = None,
    ) -> TriagePlan:
        models = parse_models(backbones)
        given = _probe_options(probe_options)
        shot_list = tuple(sorted({int(v) for v in as_ints(shots, "shots")})) if shots else ()
        if any(v < 1 for v in shot_list):
            raise OptionError(f"shots must be positive integers (e.g. 1,5,10), not {shots!r}.")
        if not is_count(episodes):
            raise OptionError(f"episodes must be a positive integer, not {episodes!r}.")
        sizes = parse_sizes(img_size)
        data_specs = parse_list(data, "data")
        if not data_specs:
            raise OptionError("no datasets given; e.g. --data imagefolder:PATH,mnist5k.")
        pairs = parse_transfers(transfer)
        for src, _ in pairs:
            if src not in data_specs:
                raise OptionError(f"transfer source {src!r} is not among --data ({data_specs}).")
        wanted = parse_list(methods, "methods")
        known = all_methods()
        bad = [m for m in wanted if m not in known]
        if bad or not wanted:
            raise OptionError(f"unknown methods {bad}; use any of {', '.join(known)}.")
        if reference is not None and reference not in [b.label for b in models]:
            labels = ", ".join(b.label for b in models)
            raise OptionError(f"--reference {reference!r} is not among --backbones ({labels}).")
        datasets = _load_datasets(data_specs, pairs)
        for size in sizes:  # a size some model cannot take stops before any work
            if size is not None:
                _check_img_size(models, size)
        # the pixel cache pays off as soon as a second backbone (or size) reads the same images
        use_pixels = len(models) * len(sizes) > 1 if pixel_cache is None else pixel_cache
        # one pixel store for every size where it can: squares for the largest resize
        largest = None if None in sizes else max(s for s in sizes if s is not None)
        side = _pixel_size(pixel_size, models, largest)
        if side is not None and not use_pixels:
            raise OptionError("pixel_size needs the pixel cache: drop --no-pixel-cache.")
        # attentive and dense probes read tokens: all of them unless a grid is asked
        tokens = extract.tokens
        token_methods = [m for m in wanted if m in PROBE_METHODS and PROBE_METHODS[m].tokens]
        dense_only = tokens is None and bool(token_methods)
        dense_only = dense_only and all(
            PROBE_METHODS[m].dense or PROBE_METHODS[m].boxes for m in token_methods
        )
        if tokens is None and token_methods:
            tokens = "all"
        options = ExtractOptions.of(
            extract, pixel_cache=use_pixels, pixel_size=side, img_size=sizes[0], tokens=tokens
        )
        ks_list = [int(k) for k in as_ints(ks, "ks")]
        return cls(
            models, data_specs, pairs, wanted, ks_list, _names(features), reference, datasets,
            options, sizes, shot_list, int(episodes), dense_only, given,
        )  # fmt: skip

    def announce(self, say: Callable[[str], None]) -> None:
        """The run's header, and how to decode once where several geometries each decode."""
        said = ", ".join("native" if s is None else f"{s}px" for s in self.sizes)
        say(
            f"triage: {len(self.models)} backbones x {len(self.data_specs)} datasets"
            + (f" + {len(self.pairs)} transfers" if self.pairs else "")
            + f", methods {', '.join(self.methods)}, evaluated at {said}"
        )
        opts = self.extract
        if opts.pixel_cache and opts.pixel_size is None and len(self.models) > 1:
            kinds = {g.describe() for g in _geometries(self.models, opts.img_size)}
            if len(kinds) > 1:  # each geometry decodes the images once: say how to decode once
                say(
                    f"pixel cache: {len(self.models)} backbones, {len(kinds)} geometries, each "
                    "decodes the images once; --pixel-size auto decodes them once for all (each "
                    "backbone's crop cut and resized on the device: close to, not equal to, its "
                    "own resize)"
                )


def _load_datasets(
    data_specs: Sequence[str], pairs: Sequence[tuple[str, str]]
) -> dict[str, Dataset]:
    """Every dataset of the triage by its spec (a transfer's target too); a transfer from a
    dataset to itself is an error."""
    datasets: dict[str, Dataset] = {}
    for spec in [*data_specs, *[dst for _, dst in pairs]]:
        if spec not in datasets:
            datasets[spec] = load_dataset(spec)
    for src, dst in pairs:
        if datasets[src].spec == datasets[dst].spec:
            raise OptionError(
                f"transfer {src}->{dst} is from a dataset to itself ({datasets[src].spec}); "
                "its test split is already evaluated. Name two datasets, e.g. "
                "'mnist5k->digits'."
            )
    return datasets


def parse_sizes(value: int | str | Sequence[int | str] | None) -> tuple[int | None, ...]:
    """Evaluation resolutions: `native` (each model's own pretrained size; None), an integer
    for all, or a comma list of them (a resolution sweep)."""
    items: list[Any]
    if value is None or isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        items = parse_list(value, "img_size")
    else:
        items = list(value)
    out: list[int | None] = []
    for item in items:
        if item is None or (isinstance(item, str) and item.strip().lower() == "native"):
            size = None
        else:
            try:
                size = int(item)
            except (TypeError, ValueError):
                raise OptionError(
                    f"img_size {item!r}: give native, a number of pixels or a comma list "
                    "(224,336,448)."
                ) from None
            if size <= 0:
                raise OptionError(f"img_size must be a positive number of pixels, not {size}.")
        if size in out:
            raise OptionError(f"img_size {value!r} names {size or 'native'} twice.")
        out.append(size)
    if not out:
        raise OptionError("img_size is empty; give native, a number of pixels or a list.")
    return tuple(out)


def _geometries(specs: Sequence[ModelSpec], img_size: int | None) -> list[Geometry]:
    """Each backbone's preprocessing geometry (backbones that cannot be built are left out:
    their extraction fails on its own, as a row of the report)."""
    out = []
    for b in specs:
        if b.is_builder:  # known once built (by its extraction): not built for a plan
            continue
        try:
            bb = b.create(img_size=img_size, load=False)
        except ProbekitError:
            continue
        out.append(geometry_transform(dict(bb.data_config)))
    return out


def _check_img_size(specs: Sequence[ModelSpec], img_size: int) -> None:
    from probekit.extraction.plan import check_img_size

    for b in specs:
        if b.is_builder:  # takes a size or says so when its extraction starts
            continue
        try:
            skeleton = b.create(img_size=img_size, load=False)
        except OptionError:  # the size itself: stops here
            raise
        except ProbekitError:  # fails on its own, as a row of the report
            continue
        check_img_size(b.name, skeleton, img_size)


def _pixel_size(
    value: int | str | None, specs: Sequence[ModelSpec], img_size: int | None
) -> int | None:
    """The side of a pixel cache shared by `specs`: as given, or "auto": the largest resize of
    a centre-crop geometry among them (None when none has one)."""
    if value is None or isinstance(value, int):
        return value
    if value.strip().lower() != "auto":
        try:
            return int(value)
        except ValueError:
            raise OptionError(
                f"pixel_size {value!r} is neither a number of pixels nor 'auto'."
            ) from None
    sides = [g.center[0] for g in _geometries(specs, img_size) if g.center is not None]
    return max(sides, default=None)


def _names(spec: str | Sequence[str] | None) -> list[str] | None:
    """A comma list (or a sequence) of feature names; None: every stored feature."""
    if spec is None:
        return None
    names = parse_list(spec, "features")
    if not names:
        raise OptionError("features is empty; name features (e.g. last4/cls) or leave it out.")
    return names


def _probe_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The probe methods' own options by flat name, each checked now (a one-line error names
    an unknown one and the names there are); those at their defaults left out (a run that
    names them equals one that does not)."""
    from probekit.errors import close_matches
    from probekit.methods import method_flags
    from probekit.probes.options import parse_value

    given = dict(options or {})
    flags = method_flags()
    unknown = sorted(set(given) - set(flags))
    if unknown:
        raise OptionError(
            f"unknown probe option {unknown[0]!r}: the probe methods' options are "
            f"{', '.join(flags)}." + close_matches(unknown[0], list(flags))
        )
    parsed = {k: parse_value(flags[k], v) for k, v in given.items()}  # each checked
    return {k: v for k, v in parsed.items() if v != parse_value(flags[k], flags[k].default)}
