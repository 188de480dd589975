"""The ProbekitError tree: user mistakes and unavailable resources, each saying what to do."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable

__all__ = [
    "BackboneError",
    "DatasetError",
    "InvalidImageError",
    "LayerSpecError",
    "OptionError",
    "ProbekitError",
    "ProbekitWarning",
    "StoreError",
    "WeightsError",
    "choice",
    "close_matches",
    "not_a_file",
]


class ProbekitError(Exception):
    """Base of every error probekit raises for a user mistake or an unavailable resource."""


class OptionError(ProbekitError, ValueError):
    """An argument out of its range or of the wrong kind, found before any work is done."""


class BackboneError(ProbekitError, KeyError):
    """Unknown backbone name or a model that probekit cannot extract from."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class WeightsError(ProbekitError, OSError):
    """Weights that cannot be found, downloaded or safely loaded."""


class LayerSpecError(ProbekitError, ValueError):
    """A `--layers` or `--pool` value that does not parse or does not fit the model."""


class DatasetError(ProbekitError, ValueError):
    """A dataset spec that does not parse, points nowhere, or holds no images."""


class InvalidImageError(ProbekitError, ValueError):
    """An image that cannot be decoded (raised only under `strict=True`)."""


class StoreError(ProbekitError, OSError):
    """A feature store that is missing, incomplete, incompatible or out of date."""


class ProbekitWarning(UserWarning):
    """Something probekit did differently from what was asked, and why (e.g. a pool fallback)."""


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' suffix for an error message, or '' when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)
    return f" Did you mean {', '.join(matches)}?" if matches else ""


def not_a_file(path: str | os.PathLike[str], what: str) -> str | None:
    """Why `path` cannot be read as the `what` file the user named, or None when it can."""
    if os.path.isfile(path):
        return None
    why = "is a directory" if os.path.isdir(path) else "does not exist"
    return f"{what} {os.fspath(path)!r} {why}; pass an existing file."


def choice(name: str, value: object, allowed: Iterable[str]) -> str:
    """`value` if it is one of `allowed`, else an OptionError naming them (and a close match)."""
    options = list(allowed)
    if isinstance(value, str) and value in options:
        return value
    hint = close_matches(value, options) if isinstance(value, str) else ""
    raise OptionError(f"unknown {name} {value!r}; use {_one_of(options)}.{hint}")


def _one_of(options: list[str]) -> str:
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]
