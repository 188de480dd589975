"""A triage's resume journal: finished evaluations, kept across interruptions."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from probekit.cache.store import FeatureStore

__all__ = ["Journal", "journal_key"]


class Journal:
    """Finished evaluations of a triage, one JSON line each, appended and synced as they end:
    a rerun into the same report folder keeps them (a torn last line is ignored)."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["key"]] = entry["value"]
                except (ValueError, KeyError, TypeError):
                    continue  # cut short by a kill

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def add(self, key: str, value: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = value


def journal_key(
    label: str,
    store: FeatureStore,
    targets: list[FeatureStore],
    methods: list[str],
    ks: Sequence[int],
    features: list[str] | None,
    fewshot: Any = None,
    probe_options: Mapping[str, Any] | None = None,
) -> str:
    """What an evaluation's numbers depend on: model label, the stores (each extraction has its
    own creation time) and the evaluation options."""
    ident = [(s.meta.get("cache_key"), s.meta.get("created")) for s in [store, *targets]]
    options: list[Any] = [methods, sorted(int(k) for k in ks)]
    if features is not None:
        options.append(features)
    if fewshot is not None:  # shots and episodes (the episodes' seed is fixed: 0)
        options.append(["fewshot", fewshot])
    if probe_options:  # the probe methods' own options, where given
        options.append(["probe", sorted(probe_options.items())])
    blob = json.dumps([label, ident, *options], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
