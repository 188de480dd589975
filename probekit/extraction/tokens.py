"""The token cache's size, said before anything is written: each chosen layer's patch tokens
(N, T, D) per split, in the store's dtype; a store that would not fit the free space of its
disk is a one-line error that says how to shrink it."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from probekit.cache.store import is_remote
from probekit.errors import StoreError
from probekit.extraction.model import token_grid

if TYPE_CHECKING:
    from probekit.extraction.model import FeatureExtractor

__all__ = ["TOKEN_CHUNK_BYTES", "check_token_space", "gib", "token_bytes", "token_meta"]

# a token store's chunks hold at most this many float32 bytes per row chunk (the writer's
# shared buffers hold three of them)
TOKEN_CHUNK_BYTES = 64 * 2**20


def token_bytes(images: int, shapes: Mapping[str, tuple[int, int]], dtype: str = "float16") -> int:
    """Bytes of the token arrays of `images` rows (before compression: tokens barely compress)."""
    item = 2 if dtype == "float16" else 4
    return images * sum(t * d for t, d in shapes.values()) * item


def gib(n: float) -> str:
    """Bytes as GiB, MiB or KiB."""
    if n >= 2**28:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _free_bytes(path: Any) -> int | None:
    """Free bytes of the disk that will hold `path` (None for an object store)."""
    if is_remote(path):
        return None
    p = Path(str(path)).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


class _Planned(Protocol):
    """What the space check reads of an `ExtractPlan` (named here, not imported: the plan
    imports this module)."""

    @property
    def images(self) -> int: ...

    @property
    def options(self) -> Any: ...

    @property
    def path(self) -> Path: ...


def check_token_space(plan: _Planned, fx: FeatureExtractor) -> int:
    """Say the token arrays' estimated size (stderr, unless quiet) and refuse a store that would
    not fit the free space; returns the estimate in bytes."""
    shapes = fx.token_shapes
    need = token_bytes(plan.images, shapes, plan.options.dtype)
    per_image = token_bytes(1, shapes, plan.options.dtype)
    grids = ", ".join(f"{n.split('/')[0]} {g[0]}x{g[1]}" for n, g in fx.grids.items())
    if not plan.options.quiet:
        print(
            f"token cache: {plan.images} images x {gib(per_image)} ({grids}; "
            f"{len(shapes)} layer{'s' if len(shapes) != 1 else ''}) = about {gib(need)}",
            file=sys.stderr,
        )
    free = _free_bytes(plan.path)
    if free is not None and need > 0.95 * free:
        last = list(shapes)[-1]
        fewer = token_bytes(plan.images, {last: shapes[last]}, plan.options.dtype)
        raise StoreError(
            f"the token cache needs about {gib(need)} and {plan.path.parent} has {gib(free)} "
            f"free: shrink it with {_smaller_grid(plan, fx)}fewer layers (--layers last: "
            f"about {gib(fewer)}), or use --cache-dir on a larger disk."
        )
    return need


def _smaller_grid(plan: _Planned, fx: FeatureExtractor) -> str:
    """'--tokens G (about X) or ' for a grid G smaller than the largest stored one (8, or
    half of it), '' where every stored map is 1x1 already."""
    largest = max(max(g) for g in fx.grids.values())
    g = 8 if largest > 8 else largest // 2
    if g < 1:
        return ""
    d = {k: v[1] for k, v in fx.token_shapes.items()}
    smaller = {}
    for k in fx.token_shapes:
        gh, gw = token_grid(str(g), fx.maps[k])
        smaller[k] = (gh * gw, d[k])
    size = gib(token_bytes(plan.images, smaller, plan.options.dtype))
    return f"--tokens {g} (about {size}) or "


def token_meta(fx: FeatureExtractor) -> dict[str, Any]:
    """What a store records of its tokens: the grid asked for, the prefix tokens left out, and
    each layer's map, stored grid and pooling."""
    n_prefix = int(getattr(fx.model, "num_prefix_tokens", 0) or 0)
    return {
        "grid": fx.tokens,
        "prefix_tokens_excluded": n_prefix,
        "layers": {
            name: {
                "map": list(fx.maps[name]),
                "grid": list(fx.grids[name]),
                "pooling": "none" if fx.grids[name] == fx.maps[name] else "adaptive_avg_pool2d",
            }
            for name in fx.token_shapes
        },
    }
