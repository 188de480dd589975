"""The `probekit` command line: a thin typer layer over the Python API (same names)."""

from __future__ import annotations

import errno
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional, cast

import typer
from rich.console import Console
from rich.table import Table

from probekit import __version__, distributed
from probekit.backbones import DEFAULT_LAYERS, list_backbones
from probekit.cache.store import cache_root, is_remote, list_stores, open_store
from probekit.errors import ProbekitError, ProbekitWarning
from probekit.extraction import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_POOLS,
)
from probekit.extraction import (
    extract as extract_features,
)
from probekit.neighbors import DEFAULT_KS, DEFAULT_MEMORY_MB, DEFAULT_TEMPERATURE
from probekit.neighbors import knn as run_knn
from probekit.probes import probe as run_probe
from probekit.report import (
    BEST_NOTE,
    BOB_CAVEAT,
    DELTA_COLUMNS,
    DELTA_NOTE,
    METHODS,
    Report,
    delta_texts,
    leaderboard_rows,
    load_records,
    write_report,
)

__all__ = ["app", "main"]


class _Group(typer.core.TyperGroup):
    """Turns every ProbekitError into one line on stderr and exit code 1 (no traceback)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ProbekitError as e:
            err.print(f"error: {e}")
            raise typer.Exit(code=1) from None
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            err.print(
                f"error: cannot write {e.filename or 'the cache'}: {os.strerror(e.errno)}. "
                "Free space (or use --cache-dir on another disk) and run the same command "
                "again: finished chunks are kept."
            )
            raise typer.Exit(code=1) from None


app = typer.Typer(
    cls=_Group,
    name="probekit",
    help="Triage pretrained vision backbones: cached multi-layer features, kNN and linear probes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
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
    Optional[Path],  # noqa: UP045
    typer.Option(help="Local weights: .safetensors, or .pth/.pt of tensors (weights_only)."),
]
RandomInitOpt = Annotated[bool, typer.Option(help="Random (seeded) weights, a baseline.")]
ImgSizeOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(help="Override the input resolution."),
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
    typer.Option("--backbone", "-b", help="Alias or timm name\\[.tag] (with --data)."),
]
DataOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--data", "-d", help="Dataset spec, as for extract (with --backbone)."),
]


def _store_path(
    store: str | None, backbone: str | None, data: str | None, **extract_kw: Any
) -> str:
    """The store to evaluate: as given, or extracted (a cache hit when it exists)."""
    if store is not None:
        return store
    if not backbone or not data:
        raise ProbekitError("give a STORE path, or --backbone and --data.")
    res = extract_features(backbone, data, **extract_kw)
    out.print(res.summary())
    return res.store_path


def _parse_ks(k: str) -> list[int]:
    try:
        return [int(x) for x in k.split(",") if x.strip()]
    except ValueError:
        raise ProbekitError(f"--k takes integers such as 10,20,100,200, not {k!r}.") from None


def _version(value: bool) -> None:
    if value:
        out.print(f"probekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """probekit: which pretrained vision backbone should I use?"""


@app.command()
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


@app.command()
def extract(
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Alias or timm name\\[.tag].")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="imagefolder:PATH, csv:FILE, mnist5k, digits, lfw-faces, synthetic[:N].",
        ),
    ],
    layers: LayersOpt = DEFAULT_LAYERS,
    pool: PoolOpt = DEFAULT_POOLS,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    img_size: ImgSizeOpt = None,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float16 or float32.")] = "float16",
    precision: Annotated[
        str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = DEFAULT_BATCH_SIZE,
    num_workers: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="Decoding worker processes \\[default: every core to build the pixel cache; "
            "beside the model, all cores but 2 on CUDA, half of them on the CPU]."
        ),
    ] = None,
    chunk_rows: Annotated[
        int, typer.Option(help="Rows per store chunk (the resume unit).")
    ] = DEFAULT_CHUNK_ROWS,
    compile: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option("--compile/--no-compile", help="torch.compile \\[default: on for CUDA]."),
    ] = None,
    pixel_cache: Annotated[
        bool,
        typer.Option(help="Decode each image once into a uint8 pixel store shared by backbones."),
    ] = False,
    pixel_size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="One pixel cache for any centre-crop geometry: short sides resized to this many "
            "px (>= the backbone's resize), crops cut and resized on the device."
        ),
    ] = None,
    decode: Annotated[
        str, typer.Option(help="cpu (workers), or gpu: JPEGs decoded and resized on CUDA.")
    ] = "cpu",
    cache_dir: CacheDir = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first unreadable image.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Discard an existing store and extract anew.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Extract pooled multi-layer features into the Zarr feature cache (resumable, cache-aware)."""
    if dtype not in ("float16", "float32"):
        raise ProbekitError(f"unknown dtype {dtype!r}; use float16 or float32.")
    result = extract_features(
        backbone,
        data,
        layers=layers,
        pool=pool,
        weights=weights,
        random_init=random_init,
        img_size=img_size,
        dtype=dtype,  # type: ignore[arg-type]
        precision=precision,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        chunk_rows=chunk_rows,
        compile=compile,
        pixel_cache=pixel_cache,
        pixel_size=pixel_size,
        decode=decode,  # type: ignore[arg-type]
        cache_dir=cache_dir,
        strict=strict,
        overwrite=overwrite,
        quiet=quiet,
    )
    if not distributed.current().is_main:
        return  # under torchrun, rank 0 reports
    out.print(result.summary())
    if result.invalid:
        store = open_store(result.store_path)
        for split in store.splits:
            for image_id, reason in store.invalid(split)[:20]:
                out.print(f"  invalid ({split}): {image_id}: {reason}")


@app.command(name="knn")
def knn_cmd(
    store: StoreArg = None,
    backbone: BackboneOpt = None,
    data: DataOpt = None,
    layers: LayersOpt = DEFAULT_LAYERS,
    pool: PoolOpt = DEFAULT_POOLS,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    img_size: ImgSizeOpt = None,
    k: Annotated[str, typer.Option("--k", help="Neighbour counts, one search at the largest.")] = (
        ",".join(map(str, DEFAULT_KS))
    ),
    temperature: Annotated[
        float, typer.Option(help="T of the exp(s/T) vote.")
    ] = DEFAULT_TEMPERATURE,
    vote: Annotated[str, typer.Option(help="weighted (DINO), majority, or both.")] = "weighted",
    features: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Stored features to evaluate, e.g. layer11/cls,head/embed; lastN/POOL "
            "concatenates the model's last N layers (last4/cls) \\[default: all stored]."
        ),
    ] = None,
    train_split: Annotated[str, typer.Option(help="Database split.")] = "train",
    test_split: Annotated[str, typer.Option(help="Query split.")] = "test",
    retrieval: Annotated[
        bool, typer.Option(help="Rank the whole gallery: mAP, mAP@R, MRR, P@k, R@k.")
    ] = False,
    backend: Annotated[str, typer.Option(help="auto, faiss, faiss-gpu or torch.")] = "auto",
    memory_mb: Annotated[
        int, typer.Option(help="Block budget for streaming the database.")
    ] = DEFAULT_MEMORY_MB,
    allow_partial: AllowPartialOpt = False,
    max_queries: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Query a seeded random sample of this many rows \\[default: all]."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the query sample.")] = 0,
    cache_dir: CacheDir = None,
    quiet: QuietOpt = False,
) -> None:
    """kNN classification (DINO protocol) or retrieval on cached features, every layer and pool."""
    store = _store_path(
        store,
        backbone,
        data,
        layers=layers,
        pool=pool,
        weights=weights,
        random_init=random_init,
        img_size=img_size,
        cache_dir=cache_dir,
        quiet=quiet,
    )
    ks = _parse_ks(k)
    if vote not in ("weighted", "majority", "both"):
        raise ProbekitError(f"unknown vote {vote!r}; use weighted, majority or both.")
    result = run_knn(
        store,
        ks=ks,
        temperature=temperature,
        vote_method=vote,  # type: ignore[arg-type]
        features=features.split(",") if features else None,
        train_split=train_split,
        test_split=test_split,
        retrieval=retrieval,
        backend=backend,
        memory_mb=memory_mb,
        allow_partial=allow_partial,
        max_queries=max_queries,
        seed=seed,
    )
    if not distributed.current().is_main:
        return  # under torchrun the ranks share the search; rank 0 reports
    rows = result.table()
    table = Table(*rows[0], title=f"kNN ({result.backend}), {test_split} vs {train_split}")
    for row in rows[1:]:
        table.add_row(*row)
    out.print(table)
    out.print(f"records: {result.path}")


@app.command(name="probe")
def probe_cmd(
    store: StoreArg = None,
    backbone: BackboneOpt = None,
    data: DataOpt = None,
    layers: LayersOpt = DEFAULT_LAYERS,
    pool: PoolOpt = DEFAULT_POOLS,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    img_size: ImgSizeOpt = None,
    method: Annotated[str, typer.Option(help="linear (batched heads), logreg, or both.")] = "both",
    features: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Stored features to probe, e.g. layer11/cls; lastN/POOL concatenates the "
            "model's last N layers (DINO: last4/cls) \\[default: all stored]."
        ),
    ] = None,
    eval_on: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Transfer: dataset specs (extracted like --data) or store paths."),
    ] = None,
    holdout: Annotated[float, typer.Option(help="Validation fraction of train.")] = 0.1,
    epochs: Annotated[int, typer.Option(help="Linear heads: passes over the features.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Linear heads: minibatch size.")] = 256,
    optimizer: Annotated[str, typer.Option(help="Linear heads: sgd or adamw.")] = "sgd",
    tol: Annotated[
        float, typer.Option(help="Logistic regression: stop when no gradient entry exceeds it.")
    ] = 1e-4,
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    memory_mb: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="Features held at once, MiB; beyond it they stream from the store "
            "\\[default: half the free memory of the device]."
        ),
    ] = None,
    allow_partial: AllowPartialOpt = False,
    seed: Annotated[int, typer.Option(help="Holdout and minibatch seed.")] = 0,
    cache_dir: CacheDir = None,
    quiet: QuietOpt = False,
) -> None:
    """Linear probes on cached features, chosen on validation data, tested once."""
    others: list[str] = []
    extract_kw: dict[str, Any] = dict(
        layers=layers,
        pool=pool,
        weights=weights,
        random_init=random_init,
        img_size=img_size,
        cache_dir=cache_dir,
        quiet=quiet,
    )
    store = _store_path(store, backbone, data, **extract_kw)
    for spec in (eval_on or "").split(","):
        if not spec.strip():
            continue
        if is_remote(spec) or Path(spec).expanduser().is_dir():  # a store
            others.append(spec)
        elif backbone:
            others.append(_store_path(None, backbone, spec.strip(), **extract_kw))
        else:
            raise ProbekitError(f"--eval-on {spec!r}: give store paths, or --backbone to extract.")
    if method not in ("linear", "logreg", "both") or optimizer not in ("sgd", "adamw"):
        raise ProbekitError("--method is linear, logreg or both; --optimizer is sgd or adamw.")
    if dtype not in ("float32", "float64"):
        raise ProbekitError(f"unknown dtype {dtype!r}; use float32 or float64.")
    result = run_probe(
        store,
        method=cast(Any, method),
        features=features.split(",") if features else None,
        holdout=holdout,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=cast(Any, optimizer),
        tol=tol,
        dtype=cast(Any, dtype),
        device=device,
        memory_mb=memory_mb,
        allow_partial=allow_partial,
        eval_on=others,
    )
    table = Table(
        "method",
        "feature",
        "chosen on validation",
        "val top-1",
        "dataset",
        "test top-1 [95% CI]",
        "top-5",
        "balanced",
        "train top-1",
        title="linear probes (selection on validation only)",
    )
    for m, cfg in result.selected.items():
        hyper = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in cfg.items()
            if k not in ("feature", "val_top1")
        )
        rec = {(r.metric, r.dataset): r for r in result.records if r.method == m}
        train = next(r for r in result.records if r.method == m and r.metric == "train_top1")
        for (metric, dataset), r in rec.items():
            if metric != "top1":
                continue
            lo, hi = r.extra["ci95"]
            table.add_row(
                m,
                cfg["feature"],
                hyper,
                f"{100 * cfg['val_top1']:.2f}",
                dataset,
                f"{100 * r.value:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                f"{100 * rec[('top5', dataset)].value:.2f}",
                f"{100 * rec[('balanced_accuracy', dataset)].value:.2f}",
                f"{100 * train.value:.2f}" + (" (underfit)" if train.extra["underfit"] else ""),
            )
    out.print(table)
    out.print(f"records: {result.path}")


def _print_report(rep: Report, files: dict[str, str]) -> None:
    """The leaderboard of every task, the ranking with BoB's caveat, the reference deltas."""
    for task in rep.tasks:
        table = Table(
            "model",
            *[f"{m} top-1 [95% CI] feature" for m in rep.methods],
            title=f"{task}: test top-1 (%), chosen without the test split",
        )
        for row in leaderboard_rows(rep, task):
            table.add_row(*row)
        out.print(table)
    if rep.best:
        out.print(BEST_NOTE)
    if rep.ranking:
        table = Table("rank", *rep.ranking, title="ranking across tasks: mean z-score (BoB)")
        for i in range(max(len(v) for v in rep.ranking.values())):
            table.add_row(
                str(i + 1),
                *[
                    f"{r[i][0]} ({r[i][1]:+.2f})" if i < len(r) else ""
                    for r in rep.ranking.values()
                ],
            )
        out.print(table)
        out.print(BOB_CAVEAT)
    if rep.reference and rep.deltas:
        table = Table(
            "task", "method", "model", *DELTA_COLUMNS, title=f"difference to {rep.reference}"
        )
        for d in rep.deltas:
            table.add_row(d["task"], d["method"], d["model"], *delta_texts(d))
        out.print(table)
        out.print(DELTA_NOTE)
    for e in rep.errors:
        out.print(f"FAILED {e['model']} on {e['dataset']} ({e.get('stage')}): {e['message']}")
    report_md = Path(files["report.md"])
    pngs = [Path(p).name for name, p in files.items() if name.endswith(".png")]
    out.print(
        f"report: {report_md}  (results.csv, results.jsonl"
        + (f"; plots: {', '.join(pngs)}" if pngs else "")
        + f" in {report_md.parent})"
    )


ReferenceOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="Show every model's difference to this one: paired bootstrap interval, McNemar p."
    ),
]


@app.command(name="triage")
def triage_cmd(
    backbones: Annotated[
        str,
        typer.Option(
            "--backbones",
            "-b",
            help="Comma list: NAME, NAME@random (random-init baseline) or NAME@WEIGHTS_FILE.",
        ),
    ],
    data: Annotated[str, typer.Option("--data", "-d", help="Comma list of dataset specs.")],
    transfer: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Comma list of 'SOURCE->TARGET': probes trained on SOURCE, tested on TARGET."
        ),
    ] = None,
    methods: Annotated[str, typer.Option(help="Any of knn, linear, logreg.")] = ",".join(METHODS),
    layers: LayersOpt = DEFAULT_LAYERS,
    pool: PoolOpt = DEFAULT_POOLS,
    img_size: ImgSizeOpt = None,
    k: Annotated[str, typer.Option("--k", help="kNN neighbour counts to choose from.")] = (
        ",".join(map(str, DEFAULT_KS))
    ),
    features: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Features kNN and probes choose from, names every backbone has: head/embed, "
            "lastN/POOL (its last N layers side by side, e.g. last4/cls) \\[default: all stored]."
        ),
    ] = None,
    reference: ReferenceOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory.")] = Path(
        "probekit-report"
    ),
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = DEFAULT_BATCH_SIZE,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16, fp16.")] = "auto",
    plots: Annotated[bool, typer.Option(help="Write PNG plots.")] = True,
    pixel_cache: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--pixel-cache/--no-pixel-cache",
            help="Decode each image once per geometry \\[default: on for 2+ backbones].",
        ),
    ] = None,
    pixel_size: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="One pixel cache for all backbones: short sides resized to this many px, or "
            "'auto' (the largest resize among them); crops cut and resized on the device."
        ),
    ] = None,
    cache_dir: CacheDir = None,
    quiet: QuietOpt = False,
) -> None:
    """Every backbone x dataset: extract (cached), kNN and probes; a report and a leaderboard."""
    from probekit.triaging import triage

    result = triage(
        backbones,
        data,
        transfer=transfer,
        methods=methods,
        layers=layers,
        pool=pool,
        img_size=img_size,
        ks=_parse_ks(k),
        features=features,
        reference=reference,
        out=out_dir,
        batch_size=batch_size,
        device=device,
        precision=precision,
        pixel_cache=pixel_cache,
        pixel_size=pixel_size,
        cache_dir=cache_dir,
        plots=plots,
        quiet=quiet,
        log=out.print,
    )
    if distributed.current().is_main:  # under torchrun, rank 0 reports
        _print_report(result.report, result.files)


@app.command(name="report")
def report_cmd(
    results: Annotated[
        list[Path],
        typer.Argument(
            help="results.jsonl files, report directories, or the *.jsonl records of stores."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory.")] = Path(
        "probekit-report"
    ),
    reference: ReferenceOpt = None,
    plots: Annotated[bool, typer.Option(help="Write PNG plots.")] = True,
) -> None:
    """Re-render a report from stored result records; records of several runs combine."""
    records = load_records(results)
    rep, files = write_report(records, out_dir, reference=reference, plots=plots)
    _print_report(rep, files)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory.")] = Path(
        "probekit-demo"
    ),
    cache_dir: CacheDir = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Offline triage: packaged ImageNet EfficientNet-Lite0/1 vs random init, kNN and probes."""
    from probekit.demo import run_demo

    result = run_demo(out=out_dir, cache_dir=cache_dir, quiet=quiet, log=out.print)
    _print_report(result.report, result.files)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


@app.command(name="ls")
def ls(cache_dir: CacheDir = None) -> None:
    """List the feature stores in the cache: dataset, backbone, input, layers, splits, size..."""
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


@app.command()
def info(
    store: Annotated[str, typer.Argument(help="Path or URL of a feature store (`probekit ls`).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the full metadata as JSON.")
    ] = False,
) -> None:
    """Show one feature store: config, weights, splits, features and invalid images."""
    fs = open_store(store, allow_partial=True)
    meta = fs.meta
    if as_json:
        out.print_json(json.dumps(meta))
        return
    w = meta["weights"]
    out.print(f"store     {fs.path}")
    out.print(
        f"status    {meta['status']}  (key {meta['cache_key']}, format {meta['format_version']})"
    )
    out.print(f"dataset   {meta['dataset']['spec']}  ({len(fs.class_names)} classes)")
    out.print(f"backbone  {meta['backbone']['name']} = {meta['backbone']['timm_name']}")
    out.print(
        f"weights   {w['source']} {w['ref']}"
        + (f" sha256 {w['sha256']}" if w.get("sha256") else "")
    )
    out.print(f"input     {meta['config']['preprocessing']}")
    out.print(
        f"precision {meta['precision']}, stored {meta['config']['dtype']}"
        + (f" (float32: {', '.join(meta['float32_features'])})" if meta["float32_features"] else "")
    )
    for note in meta.get("pool_notes", []):
        out.print(f"note      {note}")
    out.print("splits    " + ", ".join(f"{k} {v}" for k, v in meta["splits"].items()))
    out.print(
        "features  " + ", ".join(f"{n} ({meta['feature_dims'][n]})" for n in fs.feature_names)
    )
    for split in fs.splits:
        bad = fs.invalid(split) if fs.is_complete else []
        for image_id, reason in bad:
            out.print(f"invalid   {split}: {image_id}: {reason}")


def main() -> None:
    """Entry point of the `probekit` script."""
    warnings.simplefilter("default", ProbekitWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # type: ignore[assignment]
    app()
