"""What loads on first use: names of a package (PEP 562), and torch for the modules the CLI
reads at start-up (probe methods, for their options): importing them stays light."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["LazyAttributes", "lazy_module", "lazy_names"]


def lazy_names(package: dict[str, Any], where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `where[name]` (a module) for `name`, once."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        package[name] = value
        return value

    return __getattr__


def lazy_module(name: str) -> ModuleType:
    """Module `name`, imported on the first attribute read (the standard library's
    `importlib.util.LazyLoader`); the module itself where it is imported already."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None, name
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


class LazyAttributes:
    """A submodule (`torch.nn.functional`) whose attributes are read from it on use: its
    package is imported on the first read, not when this is made."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:  # called only for names not yet copied here
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)  # the next read is a plain attribute: no lookup per call
        return value
