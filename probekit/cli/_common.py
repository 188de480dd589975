"""What the commands share: the consoles, the option types declared once (same names as the
Python API's parameters), and the translations from command-line text to API values."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from probekit.errors import OptionError

__all__ = [
    "AllowPartialOpt",
    "BackboneOpt",
    "CacheDir",
    "DataOpt",
    "DownloadOpt",
    "ImgSizeOpt",
    "LayersOpt",
    "PoolOpt",
    "QuietOpt",
    "RandomInitOpt",
    "ReferenceOpt",
    "StoreArg",
    "TokensOpt",
    "TriageSizeOpt",
    "WeightsOpt",
    "err",
    "out",
    "parse_ks",
    "store_path",
    "with_method_flags",
]

# markup off: messages hold user paths and specs, where [brackets] must print as they are
out = Console(
    highlight=False, markup=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160
)
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)

CacheDir = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Option(
        "--cache-dir",
        help="Cache root: a directory, or a URL such as s3://bucket/prefix "
        "\\[default: $PROBEKIT_CACHE or ~/.cache/probekit].",
    ),
]

# options shared by the commands that may extract (same names as the Python API's parameters)
LayersOpt = Annotated[
    str, typer.Option(help="last, lastN, all, or block indices (e.g. 3,-1); head is always kept.")
]
PoolOpt = Annotated[
    str,
    typer.Option(
        help="Any of cls, mean, cls+mean, gem (comma list). On models without a class token "
        "cls falls back to mean (a warning when mean was not asked)."
    ),
]
WeightsOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="Weights: a local .safetensors, or .pth/.pt of tensors (weights_only); or a URL "
        "(downloaded once into torch.hub's cache, its sha256 recorded)."
    ),
]
RecordsOut = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="Directory for the records (JSON Lines) \\[default: beside the store; a read-only "
        "store's records are not written without it]."
    ),
]
RandomInitOpt = Annotated[bool, typer.Option(help="Random (seeded) weights, a baseline.")]
ImgSizeOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        help="Input resolution for every model (short side resized to N/0.875, centre N "
        "cropped; each model's own normalization) \\[default: the model's pretrained size]."
    ),
]
TriageSizeOpt = Annotated[
    str,
    typer.Option(
        help="Evaluation resolution of every backbone: N (short side resized to N/0.875, centre "
        "N cropped), native (each model's pretrained size), or a list 224,336,448 (a sweep)."
    ),
]
TokensOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="Also store each chosen layer's patch tokens (N, T, D) for attentive probes: all, "
        "or a grid side g (tokens average-pooled to g x g). The size is said first and checked "
        r"against free space \[default: none]."
    ),
]
AllowPartialOpt = Annotated[
    bool,
    typer.Option(
        "--allow-partial",
        help="Read an incomplete store: only the chunks written so far (with a warning).",
    ),
]
QuietOpt = Annotated[bool, typer.Option(help="No progress bar.")]
# commands that evaluate a store take it by path, or by --backbone/--data (extracted if needed)
StoreArg = Annotated[
    Optional[str],  # noqa: UP045
    typer.Argument(help="A feature store; or give --backbone and --data (extracts if needed)."),
]
BackboneOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--backbone",
        "-b",
        help="Alias or timm name\\[.tag], NAME@random or NAME@WEIGHTS_FILE (with --data).",
    ),
]
DataOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--data", "-d", help="Dataset spec, as for extract (with --backbone)."),
]
DownloadOpt = Annotated[
    bool,
    typer.Option(
        "--download",
        help="torchvision:NAME:ROOT datasets may download their files (online); without it "
        "they read what is under ROOT.",
    ),
]
ReferenceOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="Show every model's difference to this one: paired bootstrap interval, McNemar p."
    ),
]


def store_path(
    store: str | None,
    backbone: str | None,
    data: str | None,
    given: Mapping[str, Any],
    options: Any,
) -> str:
    """The store to evaluate: as given, or extracted with `options` (`ExtractOptions`; a cache
    hit when it exists); `given` holds the command's weights and random-init arguments."""
    if store is not None:
        return store
    if not backbone or not data:
        raise OptionError("give a STORE path, or --backbone and --data.")
    from probekit.extraction import extract

    weights, random_init = given.get("weights"), bool(given.get("random_init"))
    res = extract(backbone, data, weights=weights, random_init=random_init, options=options)
    out.print(res.summary())
    return res.store_path


def parse_ks(k: str) -> list[int]:
    """`--k 10,20,100`."""
    try:
        return [int(x) for x in k.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--k takes integers such as 10,20,100,200, not {k!r}.") from None


def with_method_flags(fn: Callable[..., None]) -> Callable[..., None]:
    """`fn(..., **method_options)` as a command with one option per probe method option of the
    registry (`probekit.methods.method_flags`: `--attn-lrs`, `--dense-ks`, ...), each with the
    help and default its method's `Options` gives: a new method's options need no edit here."""
    from probekit.methods import method_flags

    sig = inspect.signature(fn, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    keyword = inspect.Parameter.KEYWORD_ONLY
    added = []
    for flag in method_flags().values():
        kind: Any = str
        default = flag.default
        if flag.is_list:
            default = ",".join(map(str, flag.default))
        elif flag.check == "count":
            kind = int
        elif flag.check == "count?":
            kind = Optional[int]  # noqa: UP045 - typer needs Optional at runtime
        elif flag.check == "number>0":
            kind = float
        elif flag.check == "bool":
            kind = bool
        option = typer.Option(help=flag.help.replace("[", "\\["))
        added.append(
            inspect.Parameter(
                flag.flat, keyword, default=default, annotation=Annotated[kind, option]
            )
        )
    params = [p.replace(kind=keyword) for p in own] + added

    @functools.wraps(fn)
    def command(**kwargs: Any) -> None:
        fn(**kwargs)

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
