"""Names of a package that load on first use (PEP 562): importing the package stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: dict[str, Any], where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `where[name]` (a module) for `name`, once."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        package[name] = value
        return value

    return __getattr__
