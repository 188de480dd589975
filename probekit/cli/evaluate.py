"""`probekit knn` and `probekit probe`: evaluate one store (extracted first if named by
backbone and data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from probekit.cli._common import (
    AllowPartialOpt,
    BackboneOpt,
    CacheDir,
    DataOpt,
    ImgSizeOpt,
    LayersOpt,
    PoolOpt,
    QuietOpt,
    RandomInitOpt,
    RecordsOut,
    StoreArg,
    TokensOpt,
    WeightsOpt,
    parse_ks,
    store_path,
    with_method_flags,
)
from probekit.cli._common import out as stdout  # `out` is the commands' --out
from probekit.defaults import (
    DEFAULT_EPOCHS,
    DEFAULT_HOLDOUT,
    DEFAULT_KS,
    DEFAULT_LAYERS,
    DEFAULT_MEMORY_MB,
    DEFAULT_POOLS,
    DEFAULT_PROBE_BATCH_SIZE,
    DEFAULT_TEMPERATURE,
)
from probekit.errors import OptionError
from probekit.methods import PROBE_METHODS
from probekit.specs import parse_list

__all__ = ["knn_cmd", "probe_cmd"]


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
    out: RecordsOut = None,
    quiet: QuietOpt = False,
) -> None:
    """kNN classification (DINO protocol) or retrieval on cached features, every layer and pool."""
    from probekit import distributed
    from probekit.extraction import ExtractOptions
    from probekit.neighbors import KnnOptions, knn
    from probekit.specs import options_from

    given = dict(locals(), ks=parse_ks(k), vote_method=vote)
    # the extraction a store named by --backbone and --data gets: these options alone
    extract_options = ExtractOptions(
        layers=layers, pool=pool, img_size=img_size, cache_dir=cache_dir, quiet=quiet
    )
    path = store_path(store, backbone, data, given, extract_options)
    result = knn(path, options=options_from(KnnOptions, given))
    if not distributed.current().is_main:
        return  # under torchrun the ranks share the search; rank 0 reports
    rows = result.table()
    table = Table(*rows[0], title=f"kNN ({result.backend}), {test_split} vs {train_split}")
    for row in rows[1:]:
        table.add_row(*row)
    stdout.print(table)
    stdout.print(f"records: {result.path or 'not written (read-only store; see --out)'}")


def probe_cmd(
    store: StoreArg = None,
    backbone: BackboneOpt = None,
    data: DataOpt = None,
    layers: LayersOpt = DEFAULT_LAYERS,
    pool: PoolOpt = DEFAULT_POOLS,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    img_size: ImgSizeOpt = None,
    tokens: TokensOpt = None,
    method: Annotated[
        str,
        typer.Option(
            help="Probe methods (comma list), or both (linear and logreg): "
            + "; ".join(f"{m.name}: {m.summary}" for m in PROBE_METHODS.values())
            + "."
        ),
    ] = "both",
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
    holdout: Annotated[float, typer.Option(help="Validation fraction of train.")] = DEFAULT_HOLDOUT,
    epochs: Annotated[
        int, typer.Option(help="Linear heads, attentive and MLP probes: passes over the rows.")
    ] = DEFAULT_EPOCHS,
    batch_size: Annotated[
        int, typer.Option(help="Linear heads, attentive and MLP probes: minibatch size.")
    ] = DEFAULT_PROBE_BATCH_SIZE,
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
    out: RecordsOut = None,
    quiet: QuietOpt = False,
    **method_options: Any,
) -> None:
    """Probes on cached features (every method of the registry), chosen on validation data,
    tested once."""
    from probekit.cache.store import is_remote
    from probekit.extraction import ExtractOptions
    from probekit.probes import ProbeOptions, probe

    given = {**locals(), **method_options}
    # the extraction a store named by --backbone and --data gets: these options alone (the
    # probe's own batch_size, dtype and device are the probe's); attentive needs tokens
    wants_tokens = any(
        m in PROBE_METHODS and PROBE_METHODS[m].tokens for m in parse_list(method, "--method")
    )
    extract_options = ExtractOptions(
        layers=layers,
        pool=pool,
        img_size=img_size,
        tokens=tokens or ("all" if wants_tokens else None),
        cache_dir=cache_dir,
        quiet=quiet,
    )
    path = store_path(store, backbone, data, given, extract_options)
    others: list[str] = []
    for spec in parse_list(eval_on, "--eval-on"):
        if is_remote(spec) or Path(spec).expanduser().is_dir():  # a store
            others.append(spec)
        elif backbone:
            others.append(store_path(None, backbone, spec, given, extract_options))
        else:
            raise OptionError(f"--eval-on {spec!r}: give store paths, or --backbone to extract.")
    result = probe(path, eval_on=others, options=ProbeOptions.from_values(given))
    for title, rows in (
        ("probes (selection on validation only)", result.table()),
        ("dense probes (selection on validation only)", result.dense_table()),
        ("box probes (selection on validation only)", result.box_table()),
    ):
        if len(rows) > 1:
            table = Table(*rows[0], title=title)
            for row in rows[1:]:
                table.add_row(*row)
            stdout.print(table)
    stdout.print(f"records: {result.path or 'not written (read-only store; see --out)'}")


probe_cmd = with_method_flags(probe_cmd)


def compare_cmd(
    stores: Annotated[
        list[str], typer.Argument(help="Feature stores of the same images (`probekit ls`).")
    ],
    split: Annotated[str, typer.Option(help="The split whose images are compared.")] = "test",
    features: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Comma list of features every store holds [default: all stored]."),
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Neighbours of mutual kNN.")] = 10,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per pair of features.")
    ] = False,
    concat: Annotated[
        bool,
        typer.Option(
            "--concat", help="Also logreg on two stores' features side by side vs each alone."
        ),
    ] = False,
) -> None:
    """Representation similarity: debiased linear CKA and mutual kNN between every pair of
    stored features (of one or more stores), on the images they share (matched by id)."""
    import json

    from probekit.similarity import compare

    names = [f.strip() for f in features.split(",") if f.strip()] if features else None
    res = compare(stores, split=split, features=names, k=k, concat=concat)
    if as_json:
        for p in res.pairs:
            stdout.print(json.dumps(p.to_dict()))
        for e in res.ensembles:
            stdout.print(json.dumps({"concat": e.to_dict()}))
        return
    table = Table("model a", "feature a", "model b", "feature b", "images", "CKA", f"mutual {k}-NN")
    for p in res.pairs:
        table.add_row(
            res.labels[p.store_a],
            p.feature_a,
            res.labels[p.store_b],
            p.feature_b,
            str(p.n),
            f"{p.cka:.3f}",
            f"{p.mutual_knn:.3f}",
        )
    stdout.print(table)
    stdout.print(
        "CKA: how alike the two representations are up to rotation and scale (1: the same, "
        f"0: unrelated). mutual {k}-NN: the share of each image's {k} nearest neighbours both "
        f"agree on (1: the same neighbourhoods, about {k / max(1, res.pairs[0].n - 1):.3f} by "
        "chance)."
    )
    if res.ensembles:
        from probekit.report.trust import ENSEMBLE_HEADER, ENSEMBLE_NOTE, ensemble_row

        table = Table(*ENSEMBLE_HEADER, title="side by side")
        for e in res.ensembles:
            table.add_row(*ensemble_row(e.record(res.dataset, res.split)))
        stdout.print(table)
        stdout.print(ENSEMBLE_NOTE)


def structure_cmd(
    store: Annotated[str, typer.Argument(help="A feature store (`probekit ls`).")],
    split: Annotated[str, typer.Option(help="The split whose images are measured.")] = "test",
    features: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Comma list of stored features [default: all stored]."),
    ] = None,
    seed: Annotated[int, typer.Option(help="k-means seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False,
) -> None:
    """Label-free and cluster metrics of every stored feature: RankMe (effective rank) and
    k-means NMI and ARI against the labels."""
    import json

    from probekit.structure import structure

    names = [f.strip() for f in features.split(",") if f.strip()] if features else None
    res = structure(store, split=split, features=names, seed=seed)
    if as_json:
        for r in res.records:
            stdout.print(json.dumps(r.to_dict()))
        return
    table = Table("feature", "RankMe", "k-means NMI", "k-means ARI")
    for name, v in res.rows.items():
        table.add_row(name, f"{v['rankme']:.1f}", f"{v['nmi']:.3f}", f"{v['ari']:.3f}")
    stdout.print(table)
    stdout.print(
        "RankMe: how many directions the features really use (no labels needed; higher often "
        "transfers better). NMI / ARI: how well k-means clusters, one per class, recover the "
        "classes (1: exactly, 0: chance)."
    )


def transfer_cmd(
    store: Annotated[str, typer.Argument(help="A feature store (`probekit ls`).")],
    scores: Annotated[str, typer.Option(help="Comma list: logme, hscore.")] = "logme,hscore",
    split: Annotated[str, typer.Option(help="The split whose labels are scored.")] = "train",
    features: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Comma list of stored features [default: all stored]."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False,
) -> None:
    """Transferability scores of every stored feature, in seconds, without a probe: LogME and
    H-score on the train split's labels, beside the backbone's parameter count."""
    import json

    from probekit.transferability import SCORES, transferability

    names = [f.strip() for f in features.split(",") if f.strip()] if features else None
    res = transferability(store, scores=scores, split=split, features=names)
    if as_json:
        for r in res.records:
            stdout.print(json.dumps(r.to_dict()))
        return
    shown = [s for s in SCORES if any(s in v for v in res.rows.values())]
    table = Table("feature", *shown)
    for name, v in res.rows.items():
        table.add_row(name, *(f"{v[s]:.4g}" for s in shown))
    stdout.print(table)
    stdout.print(
        f"parameters: {res.params / 1e6:.1f} M. Higher scores should transfer better; studies "
        "find the best score changes with the data, and that kNN or the parameter count often "
        "ranks backbones as well: read them beside a probe, never alone."
    )


def fewshot_cmd(
    store: Annotated[str, typer.Argument(help="A feature store (`probekit ls`).")],
    shots: Annotated[str, typer.Option(help="Train images per class, a comma list.")] = "1,2,5,10",
    episodes: Annotated[int, typer.Option(help="Seeded episodes per number of shots.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the episodes and the holdout.")] = 0,
    methods: Annotated[
        str,
        typer.Option(help="knn and any probe method of pooled features (linear, logreg, mlp)."),
    ] = "knn,linear,logreg",
    feature: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="The stored feature [default: head/embed]."),
    ] = None,
    out: RecordsOut = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False,
) -> None:
    """Few-shot episodes: SHOTS train images per class (never validation or test images),
    kNN and the probe methods per episode, mean test top-1 with a 95% interval across
    episodes."""
    import json

    from probekit.fewshot import fewshot

    res = fewshot(
        store,
        shots=shots,
        episodes=episodes,
        seed=seed,
        methods=methods,
        feature=feature,
        out=out,
    )
    if as_json:
        for r in res.records:
            stdout.print(json.dumps(r.to_dict()))
        return
    table = Table("method", "shots", "episodes", "test top-1 (%)", "95% CI", "feature")
    for r in res.records:
        lo, hi = r.extra["ci95"]
        table.add_row(
            r.method,
            str(r.hyper["shots"]),
            str(r.hyper["episodes"]),
            f"{100 * r.value:.2f}",
            f"[{100 * lo:.1f}, {100 * hi:.1f}]",
            r.feature,
        )
    stdout.print(table)
    if res.path:
        stdout.print(f"records: {res.path}")
