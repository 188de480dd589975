"""A probe method's own options: a frozen dataclass whose fields say their default, their help
and how they are checked (`option(...)`). `ProbeOptions`, the `probe` command's flags, the
record file's hash and a leaderboard's shown hyperparameters are all derived from it, so a new
method adds its options in its own module and nowhere else.

Importable without torch: the CLI builds its flags from these dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Literal

from probekit.errors import OptionError, choice

__all__ = ["Flag", "MethodOptions", "option", "parse_value"]

# how a field's value is checked (and typed on the command line)
Check = Literal[
    "numbers>0", "numbers>=0", "ints>0", "count", "count?", "number>0", "choice", "bool"
]


def option(
    default: Any,
    help: str,
    check: Check,
    *,
    flat: str | None = None,
    choices: Sequence[str] = (),
) -> Any:
    """A method option: its `default`, its `help` (CLI and docs), its `check`, and the `flat`
    name it goes by among every method's options (the `probe` keyword and `--flag`; default:
    the field's own name). Lists are kept as tuples."""
    meta = {"help": help, "check": check, "flat": flat, "choices": tuple(choices)}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Flag:
    """One method option as the CLI and `ProbeOptions.of` see it."""

    method: str
    name: str  # the field's name
    flat: str  # the keyword and flag it goes by (`attn_lrs`, `--attn-lrs`)
    default: Any
    help: str
    check: Check
    choices: tuple[str, ...]

    @property
    def is_list(self) -> bool:
        return self.check in ("numbers>0", "numbers>=0", "ints>0")


def _numbers(name: str, values: Any, zero: bool) -> tuple[float, ...]:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    if isinstance(values, (int, float)):
        values = [values]
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise OptionError(f"{name} takes a list of numbers, not {values!r}.") from None
    if not out or any(not math.isfinite(v) or v < 0 or (v == 0 and not zero) for v in out):
        least = "0 or more" if zero else "above 0"
        raise OptionError(f"{name} must be a non-empty list of numbers {least}, got {values!r}.")
    return out


def _ints(name: str, values: Any) -> tuple[int, ...]:
    from probekit.specs import as_ints

    out = as_ints(values, name)
    if not out or min(out) < 1:
        raise OptionError(f"{name} takes positive integers such as 10,30, not {values!r}.")
    return tuple(sorted(set(out)))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_value(flag: Flag, value: Any) -> Any:
    """`value` checked (and normalized: lists as tuples) as `flag` says, or a one-line error
    naming the flag."""
    name, check = flag.flat, flag.check
    if check in ("numbers>0", "numbers>=0"):
        return _numbers(name, value, zero=check == "numbers>=0")
    if check == "ints>0":
        return _ints(name, value)
    if check == "count" or (check == "count?" and value is not None):
        if not _count(value):
            raise OptionError(f"{name} must be a positive integer, not {value!r}.")
    elif check == "number>0":
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise OptionError(f"{name} must be a positive number, not {value!r}.")
    elif check == "choice":
        choice(name, value, flag.choices)
    elif check == "bool" and not isinstance(value, bool):
        raise OptionError(f"{name} is true or false, not {value!r}.")
    return value


@dataclass(frozen=True)
class MethodOptions:
    """The base of every method's `Options`: fields made by `option(...)`, checked when made.

    `shown`: the chosen hyperparameters a leaderboard entry shows (from `Selection.config`).
    """

    shown: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for flag in self.flags(""):
            object.__setattr__(self, flag.name, parse_value(flag, getattr(self, flag.name)))

    @classmethod
    def flags(cls, method: str) -> list[Flag]:
        out = []
        for f in fields(cls):
            meta = f.metadata
            default = f.default if f.default is not MISSING else None
            out.append(
                Flag(
                    method,
                    f.name,
                    meta.get("flat") or f.name,
                    default,
                    meta["help"],
                    meta["check"],
                    meta["choices"],
                )
            )
        return out

    @classmethod
    def from_flat(cls, method: str, values: Mapping[str, Any]) -> MethodOptions:
        """This method's options from flat names (`attn_lrs=...`); absent ones keep defaults."""
        given = {f.name: values[f.flat] for f in cls.flags(method) if f.flat in values}
        return cls(**given)

    def to_dict(self) -> dict[str, Any]:
        """Every option by its field name, lists as lists (JSON, the record file's hash)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }
