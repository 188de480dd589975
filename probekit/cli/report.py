"""`probekit triage`, `probekit report` and `probekit demo`: leaderboards from records."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

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


def _print_trust(rep: Report) -> None:
    """Few-shot, calibration, structure, similarity and side-by-side tables, one per task."""
    from probekit.report.trust import sections

    for sec in sections(rep):
        for task, header, rows in sec.tables:
            table = Table(*header, title=f"{task}: {sec.title.lower()}")
            for row in rows:
                table.add_row(*row)
            out.print(table)
        out.print(sec.note)


def print_report(rep: Report, files: dict[str, str]) -> None:
    """The leaderboard of every task, the ranking with BoB's caveat, the reference deltas."""
    from probekit.report import (
        BEST_NOTE,
        BOB_CAVEAT,
        DELTA_COLUMNS,
        DELTA_NOTE,
        delta_method,
        delta_texts,
        leaderboard_rows,
    )
    from probekit.report.render import COST_HEADER, COST_NOTE, cost_rows

    for metric, task in ((m, t) for m in rep.metrics for t in rep.tasks if rep.shows(t, m)):
        name = "top-1" if metric == "top1" else metric
        table = Table(
            "model",
            *[f"{m} {name} [95% CI] feature" for m in rep.methods_of(task, metric)],
            title=f"{task}: test {name} (%), chosen without the test split",
        )
        for row in leaderboard_rows(rep, task, metric=metric):
            table.add_row(*row)
        out.print(table)
        for said in rep.warnings.get(task, []) if metric == "top1" else []:
            out.print(f"warning ({task}): {said}")
    if rep.best:
        out.print(BEST_NOTE)
    if cost_rows(rep):
        table = Table(*COST_HEADER, title="cost and resolution")
        for row in cost_rows(rep):
            table.add_row(*row)
        out.print(table)
        out.print(COST_NOTE)
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
    if rep.agreements:
        from probekit.report.agreement import AGREEMENT_NOTE
        from probekit.report.render import AGREEMENT_HEADER, agreement_rows

        table = Table(*AGREEMENT_HEADER, title="how far the methods' rankings agree")
        for row in agreement_rows(rep):
            table.add_row(*row)
        out.print(table)
        out.print(AGREEMENT_NOTE)
    for flag in rep.flags:
        out.print(f"note: {flag.text()}")
    _print_trust(rep)
    if rep.reference and rep.deltas:
        table = Table(
            "task", "method", "model", *DELTA_COLUMNS, title=f"difference to {rep.reference}"
        )
        for d in rep.deltas:
            table.add_row(d["task"], delta_method(d), d["model"], *delta_texts(d))
        out.print(table)
        out.print(DELTA_NOTE)
    for e in rep.errors:
        out.print(
            f"FAILED {e.model} on {e.dataset} ({e.extra.get('stage')}): {e.extra.get('message')}"
        )
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
