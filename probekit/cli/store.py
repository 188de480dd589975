"""`probekit backbones`, `probekit ls` and `probekit info`: what there is (no model is built,
nothing heavier than the stores' metadata is read)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from probekit.cli._common import CacheDir, out
from probekit.defaults import DEFAULT_LAYERS

__all__ = ["backbones", "info", "ls", "verify"]


def backbones(
    pattern: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(help="Wildcard over aliases and timm pretrained names, e.g. 'vit_*dino*'."),
    ] = None,
    group: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="supervised, ssl, vision-language, generative, depth or random."),
    ] = None,
    bob: Annotated[
        bool, typer.Option("--bob", help="Only the Battle of the Backbones models.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON records.")] = False,
) -> None:
    """List backbone aliases (and timm names matching PATTERN) with params and default layers."""
    from probekit.backbones import list_backbones

    rows = list_backbones(pattern, group=group, bob=bob)
    if as_json:
        out.print_json(json.dumps([r.to_dict() for r in rows]))
        return
    table = Table(
        "alias",
        "timm name",
        "group",
        "BoB",
        "availability",
        "params (M)",
        f"default layers ({DEFAULT_LAYERS})",
        "weights",
    )
    for r in rows:
        table.add_row(
            r.alias or "-",
            r.timm_name,
            r.group,
            "yes" if r.bob else "",
            r.availability,
            f"{r.params_m:.1f}",
            ",".join(map(str, r.default_layers)) + " + head" if r.default_layers else "head",
            r.weights,
        )
    out.print(table)
    if group == "generative" and not rows:
        out.print("no generative backbone is built in yet (the Stable Diffusion encoder is not).")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def ls(cache_dir: CacheDir = None) -> None:
    """List the feature stores in the cache: dataset, backbone, input, layers, splits, size..."""
    from probekit.cache.listing import list_stores
    from probekit.cache.location import cache_root

    stores = list_stores(cache_dir)
    if not stores:
        out.print(f"no feature stores under {cache_root(cache_dir)}")
        return
    table = Table("dataset", "backbone", "weights", "input", "layers", "splits", "size", "complete")
    table.add_column("path", overflow="fold")  # whole, to be copied
    for s in stores:
        layers = sorted({n.split("/")[0] for n in s.layers})
        table.add_row(
            s.dataset,
            s.backbone,
            s.weights,
            s.input,
            ",".join(layers),
            " ".join(f"{k}:{v}" for k, v in s.splits.items()),
            _size(s.size_bytes),
            "yes" if s.complete else "NO",
            s.path,
        )
    out.print(table)


def info(
    store: Annotated[str, typer.Argument(help="Path or URL of a feature store (`probekit ls`).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the full metadata as JSON.")
    ] = False,
) -> None:
    """Show one feature store: config, weights, splits, features and invalid images."""
    from probekit.cache.location import location
    from probekit.cache.meta import StoreMeta

    path = location(store)
    meta = StoreMeta.read(path)  # the metadata alone: no array is opened
    if as_json:
        out.print_json(json.dumps(dict(meta.raw)))
        return
    w = meta.weights
    from probekit.cache.store import open_store

    report = open_store(path, allow_partial=True, check=False).check()  # cheap: no chunk read
    out.print(f"store     {path}")
    out.print(f"status    {meta.status}  (key {meta.cache_key}, format {meta.format_version})")
    if not report.ok:
        out.print(f"DAMAGED   {report.message()}")
    out.print(f"dataset   {meta.dataset.spec}  ({len(meta.class_names)} classes)")
    out.print(f"backbone  {meta.backbone.name} = {meta.backbone.timm_name}")
    out.print(
        f"weights   {w['source']} {w['ref']}"
        + (f" sha256 {w['sha256']}" if w.get("sha256") else "")
    )
    out.print(f"input     {dict(meta.preprocessing)}")
    f32 = meta.float32_features
    out.print(
        f"precision {meta.precision}, stored {meta.config['dtype']}"
        + (f" (float32: {', '.join(f32)})" if f32 else "")
    )
    for note in meta.raw.get("pool_notes", []):
        out.print(f"note      {note}")
    out.print("splits    " + ", ".join(f"{k} {v}" for k, v in meta.splits.items()))
    out.print("features  " + ", ".join(f"{n} ({meta.feature_dims[n]})" for n in meta.feature_names))
    if meta.is_complete and report.ok and meta.raw.get("invalid"):  # read from the arrays
        fs = open_store(path, check=False)
        for split in fs.splits:
            for image_id, reason in fs.invalid(split):
                out.print(f"invalid   {split}: {image_id}: {reason}")


def verify(
    store: Annotated[str, typer.Argument(help="Path or URL of a feature store (`probekit ls`).")],
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Recompute the damaged chunks with the extraction the store records.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Read every chunk of a feature store (the full check); exit 1 when damage remains, 2
    when it is sound but incomplete (chunks pending)."""
    from probekit.extraction.repair import verify as run_verify

    result = run_verify(store, repair=repair, quiet=as_json)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
    else:
        out.print(result.summary())
    if not result.ok:
        if not as_json:
            out.print(f"run `probekit verify --repair {result.store}` to recompute them.")
        raise typer.Exit(code=1)
    if not result.complete:  # sound, but not finished: not a store to read yet
        raise typer.Exit(code=2)
