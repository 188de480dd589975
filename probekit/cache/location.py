"""Where stores live: a local path, or a UPath for an fsspec URL; the cache root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from probekit.errors import StoreError

__all__ = ["Location", "cache_root", "is_remote", "location", "writable"]


# A store's place: a local Path, or a UPath for any fsspec URL that Zarr reads and writes
# (s3://bucket/prefix, gs://..., ...); credentials come from the storage client's own config.
Location = Any


def location(path: str | os.PathLike[str] | Any) -> Location:
    """A local path (expanded, absolute), or a UPath for a URL such as s3://bucket/prefix."""
    if is_remote(path):
        try:
            import fsspec  # type: ignore[import-untyped]
            from upath import UPath

            fsspec.get_filesystem_class(str(path).split("://")[0])
        except (ImportError, ValueError) as e:
            raise StoreError(
                f"cannot use {str(path)!r}: {e}; object-store caches need "
                "`pip install 'probekit[s3]'` (or the fsspec package of that protocol)."
            ) from None
        return path if isinstance(path, UPath) else UPath(str(path))
    return Path(path).expanduser().resolve()


def is_remote(path: Any) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Location:
    """`cache_dir`, else `$PROBEKIT_CACHE`, else `~/.cache/probekit`; a URL for object storage."""
    given = cache_dir or os.environ.get("PROBEKIT_CACHE")
    root = location(given or Path.home() / ".cache" / "probekit")
    if not is_remote(root) and root.exists() and not root.is_dir():
        said = "cache_dir" if cache_dir else "PROBEKIT_CACHE" if given else "the default cache"
        raise StoreError(
            f"{said} {str(root)!r} is a file, not a directory; pass a directory (or one that "
            "does not exist yet) with --cache-dir or PROBEKIT_CACHE."
        )
    return root


def writable(path: Location) -> bool:
    """Whether this process may create files in directory `path` (or in the nearest existing
    directory above it); object stores say so on write, and count as writable."""
    if is_remote(path):
        return True
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return os.access(p, os.W_OK)
