"""The small grammars every command shares: comma lists, and a model as `NAME`, `NAME@random`
or `NAME@WEIGHTS_FILE`, with the one rule that names it in reports (`model_label`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from probekit.errors import OptionError, close_matches

if TYPE_CHECKING:
    from probekit.backbones import Backbone

__all__ = [
    "ModelSpec",
    "as_ints",
    "is_count",
    "model_label",
    "options_from",
    "options_of",
    "parse_list",
    "parse_models",
]


T = TypeVar("T")


def options_of(cls: type[T], what: str, options: T | None, changes: Mapping[str, Any]) -> T:
    """`options` (default: `cls()`) with `changes`, made anew so every value is checked again;
    a name that is no option of `cls` is an error naming the close ones."""
    known = [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]
    for name in changes:
        if name not in known:
            raise OptionError(f"{what} has no option {name!r}." + close_matches(name, known))
    current = {} if options is None else {k: getattr(options, k) for k in known}
    return cls(**{**current, **changes})


def options_from(cls: type[T], values: Mapping[str, Any]) -> T:
    """`cls` made of the entries of `values` that are its options (a command's arguments,
    where each keeps its option's name), the others left out."""
    known = {f.name for f in fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in values.items() if k in known})


def is_count(value: Any) -> bool:
    """A positive integer (not a bool, not a float): what a size or a count option takes."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def as_ints(value: Any, what: str) -> tuple[int, ...]:
    """One integer or a list of them (or a comma list of digits), as a tuple."""
    if isinstance(value, str):
        value = parse_list(value, what)
    items = [value] if isinstance(value, (int, np.integer)) else value
    try:
        out = []
        for v in items:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError(v)
            out.append(int(v))
    except (TypeError, ValueError):
        raise OptionError(
            f"{what} takes an integer or a list of integers, not {value!r}."
        ) from None
    return tuple(out)


def parse_list(value: str | Sequence[Any] | None, what: str) -> list[str]:
    """A comma list (or a sequence of strings) as its non-empty, stripped items."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise OptionError(f"{what} takes a comma list or a list of strings, not {value!r}.")
    return [s.strip() for s in items if s.strip()]


def model_label(name: str, source: str, ref: str | None = None) -> str:
    """The name a model goes by in records and reports: `name`, `name@random` (random init),
    `name@<weights file name>` (a local file)."""
    if source in ("random-init", "random"):
        return f"{name}@random"
    if source == "file" and ref:
        return f"{name}@{Path(ref).name}"
    return name


@dataclass(frozen=True)
class ModelSpec:
    """A backbone as a command names it: `NAME` (its default weights), `NAME@random` (seeded
    random init, a baseline) or `NAME@WEIGHTS_FILE` (local weights)."""

    name: str
    weights: str | None = None
    random_init: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise OptionError("a backbone needs a name: NAME, NAME@random or NAME@WEIGHTS_FILE.")
        if self.weights is not None and self.random_init:
            raise OptionError("pass either weights (a file) or random init, not both.")

    @classmethod
    def parse(
        cls,
        text: str,
        *,
        weights: str | os.PathLike[str] | None = None,
        random_init: bool = False,
    ) -> ModelSpec:
        """`NAME[@random|@FILE]`; `weights`/`random_init` given apart say the same as a suffix."""
        name, _, arg = text.strip().partition("@")
        if not name:
            raise OptionError(f"backbone {text!r}: give NAME, NAME@random or NAME@WEIGHTS_FILE.")
        file = None if weights is None else os.fspath(weights)
        if arg == "random":
            random_init = True
        elif arg:
            if file is not None and file != arg:
                raise OptionError(f"backbone {text!r} names weights twice ({arg} and {file}).")
            file = arg
        return cls(name, file, random_init)

    @property
    def label(self) -> str:
        """The name this model goes by in records and reports (`model_label`)."""
        if self.random_init:
            return model_label(self.name, "random-init")
        if self.weights is not None:
            return model_label(self.name, "file", self.weights)
        return self.name

    @property
    def text(self) -> str:
        """The spec as written: `NAME`, `NAME@random` or `NAME@FILE` (`parse` reads it back)."""
        if self.random_init:
            return f"{self.name}@random"
        return self.name if self.weights is None else f"{self.name}@{self.weights}"

    @property
    def is_builder(self) -> bool:
        """Whether a Python function builds it (`module:function`, or an alias naming one):
        nothing is known of it before it is built (or its card read)."""
        from probekit.backbones.aliases import ALIASES
        from probekit.backbones.builders import PYTHON_PATH

        alias = ALIASES.get(self.name)
        return bool(PYTHON_PATH.match(self.name)) or (alias is not None and bool(alias.builder))

    def create(
        self,
        *,
        img_size: int | None = None,
        load: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Backbone:
        """The model with these weights (`load=False`: its skeleton, with nothing loaded;
        `cache_dir`: where a builder's card is kept)."""
        from probekit.backbones import create_backbone

        return create_backbone(
            self.name,
            weights=self.weights,
            random_init=self.random_init,
            img_size=img_size,
            load=load,
            cache_dir=cache_dir,
        )


def parse_models(spec: str | Sequence[str]) -> list[ModelSpec]:
    """A comma list of models; an empty list or a repeated label is an error."""
    out = [ModelSpec.parse(item) for item in parse_list(spec, "backbones")]
    if not out:
        raise OptionError("no backbones given; e.g. --backbones dino_vits16,convnext_tiny.")
    labels = [b.label for b in out]
    if len(set(labels)) != len(labels):
        raise OptionError(f"backbones repeat: {', '.join(labels)}.")
    return out
