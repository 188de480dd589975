"""`probekit triage`, `probekit report` and `probekit demo`: leaderboards from records."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from probekit.cli._common import (
    CacheDir,
    DownloadOpt,
    LayersOpt,
    PoolOpt,
    QuietOpt,
    ReferenceOpt,
    TokensOpt,
    TriageSizeOpt,
    out,
    parse_ks,
    with_method_flags,
)
from probekit.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IMG_SIZE,
    DEFAULT_KS,
    DEFAULT_LAYERS,
    DEFAULT_POOLS,
)
from probekit.methods import METHODS, all_methods

if TYPE_CHECKING:
    from probekit.report import Report

__all__ = ["demo", "print_report", "report_cmd", "triage_cmd"]


def print_report(rep: Report, files: dict[str, str]) -> None:
    """The report document on the terminal (`probekit.report.document`), then where the files
    are."""
    from probekit.report.document import document, to_terminal

    to_terminal(document(rep), out)
    report_md = Path(files["report.md"])
    pngs = [Path(p).name for name, p in files.items() if name.endswith(".png")]
    out.print(
        f"report: {report_md}  (results.csv, results.jsonl"
        + (f"; plots: {', '.join(pngs)}" if pngs else "")
        + f" in {report_md.parent})"
    )


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
    download: DownloadOpt = False,
    transfer: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Comma list of 'SOURCE->TARGET': probes trained on SOURCE, tested on TARGET."
        ),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            help=f"Any of {', '.join(all_methods())} (attentive stores tokens: --tokens)."
        ),
    ] = ",".join(METHODS),
    layers: LayersOpt = DEFAULT_LAYERS,
    pool: PoolOpt = DEFAULT_POOLS,
    img_size: TriageSizeOpt = str(DEFAULT_IMG_SIZE),
    tokens: TokensOpt = None,
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
    shots: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Few-shot episodes too: train images per class, e.g. 1,5,10 \\[default: none]."
        ),
    ] = None,
    episodes: Annotated[int, typer.Option(help="Seeded episodes per number of shots.")] = 5,
    concat: Annotated[
        bool,
        typer.Option(
            "--concat",
            help="Logistic regression on every pair of backbones side by side vs each alone.",
        ),
    ] = False,
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
    **method_options: Any,
) -> None:
    """Every backbone x dataset: extract (cached), kNN and probes; a report and a leaderboard."""
    from probekit import distributed
    from probekit.triaging import triage

    if download:
        from probekit.datasets.torchvision import with_download

        data = with_download(data)
    result = triage(
        backbones,
        data,
        transfer=transfer,
        methods=methods,
        layers=layers,
        pool=pool,
        img_size=img_size,
        tokens=tokens,
        ks=parse_ks(k),
        features=features,
        reference=reference,
        shots=shots,
        episodes=episodes,
        concat=concat,
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
        probe_options=method_options,
    )
    if distributed.current().is_main:  # under torchrun, rank 0 reports
        print_report(result.report, result.files)


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
    from probekit.report import load_records, write_report

    records = load_records(results)
    rep, files = write_report(records, out_dir, reference=reference, plots=plots)
    print_report(rep, files)


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
    print_report(result.report, result.files)


triage_cmd = with_method_flags(triage_cmd)
