"""`probekit extract`: a backbone over a dataset into the feature cache."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from probekit.cli._common import (
    CacheDir,
    DownloadOpt,
    ImgSizeOpt,
    LayersOpt,
    PoolOpt,
    QuietOpt,
    RandomInitOpt,
    TokensOpt,
    WeightsOpt,
    out,
)
from probekit.datasets import DATASET_KINDS
from probekit.defaults import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_ROWS, DEFAULT_LAYERS, DEFAULT_POOLS

__all__ = ["extract"]


def extract(
    backbone: Annotated[
        str,
        typer.Option(
            "--backbone",
            "-b",
            help="Alias or timm name\\[.tag], NAME@random or NAME@WEIGHTS_FILE.",
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help=", ".join(k.usage for k in DATASET_KINDS.values()) + ".",
        ),
    ],
    layers: LayersOpt = DEFAULT_LAYERS,
    pool: PoolOpt = DEFAULT_POOLS,
    download: DownloadOpt = False,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    img_size: ImgSizeOpt = None,
    tokens: TokensOpt = None,
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
        str,
        typer.Option(
            help="cpu (workers, exact); gpu: JPEGs decoded and resized on CUDA; draft: workers "
            "decode big JPEGs at 1/2-1/8 scale (faster, features close, stored apart)."
        ),
    ] = "cpu",
    cache_dir: CacheDir = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first unreadable image.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Discard an existing store and extract anew.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Extract pooled multi-layer features into the Zarr feature cache (resumable, cache-aware)."""
    from probekit import distributed
    from probekit.cache.store import open_store
    from probekit.extraction import ExtractOptions, extract
    from probekit.specs import options_from

    options = options_from(ExtractOptions, locals())  # every option, by its own name
    if download:
        from probekit.datasets.torchvision import with_download

        data = with_download(data)
    result = extract(backbone, data, weights=weights, random_init=random_init, options=options)
    if not distributed.current().is_main:
        return  # under torchrun, rank 0 reports
    out.print(result.summary())
    if result.invalid:
        store = open_store(result.store_path)
        for split in store.splits:
            for image_id, reason in store.invalid(split)[:20]:
                out.print(f"  invalid ({split}): {image_id}: {reason}")
