"""What a store's self-check costs: the cheap check (every array's metadata, one listing, the
done flags) against a whole cache hit of `extract` on the same store, and the full check
(`probekit verify`: every chunk decoded).

The store: test_resnet (random init) over mnist5k in chunks of --chunk-rows rows (80: 50 chunks
per array of the train split), the default layers and pools. Each timing is the median of
--repeats calls in this process, measured in one run (ratios, not absolute times, carry over
to other machines).

The chunks' crc32s: the full check with and without comparing them, and what recording them
costs a writer, on one chunk of ViT-S/16 patch tokens (256 rows x 196 x 384 float16, 38.5 MB)
written with and without them.

    python benchmarks/bench_check.py [--chunk-rows 80 --repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from common import cpu_name, save_result

import probekit
from probekit.cache.check import values_crc
from probekit.cache.store import FeatureStore, StoreConfig, open_store


def median_s(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk-rows", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        kw = dict(cache_dir=root, chunk_rows=args.chunk_rows, quiet=True)
        made = probekit.extract("test_resnet@random", "mnist5k", **kw)
        store = open_store(made.store_path, check=False)
        chunks = {s: store.num_chunks(s) for s in store.splits}
        # labels, valid, ids, errors, done, crc + features
        arrays = 6 + len(store.feature_names)

        def hit() -> None:
            assert probekit.extract("test_resnet@random", "mnist5k", **kw).cache_hit

        hit()  # warm: imports, the dataset's first load
        cache_hit = median_s(hit, args.repeats)
        cli = [sys.executable, "-m", "probekit", "extract", "-b", "test_resnet@random"]
        cli += ["-d", "mnist5k", "--cache-dir", root, "--chunk-rows", str(args.chunk_rows)]
        cli_hit = median_s(lambda: subprocess.run(cli, check=True, capture_output=True), 3)
        cheap = median_s(lambda: open_store(made.store_path, check=False).check(), args.repeats)
        opened = median_s(lambda: open_store(made.store_path, check=False), args.repeats)
        full = median_s(lambda: probekit.verify(made.store_path), max(3, args.repeats // 5))
        crc_arrays = store.meta["crc_arrays"]
        store.update_meta(crc_arrays=[])  # as a store without crc32s: nothing to compare
        full_no_crc = median_s(lambda: probekit.verify(made.store_path), max(3, args.repeats // 5))
        store.update_meta(crc_arrays=crc_arrays)
        size = sum(f.stat().st_size for f in Path(made.store_path).rglob("*") if f.is_file())
        write, write_no_crc, crc_only = token_chunk_write(Path(root), args.repeats)
    rows = {
        "chunks_per_array": chunks,
        "arrays_per_split": arrays,
        "store_mib": round(size / 2**20, 2),
        "cache_hit_s": round(cache_hit, 5),
        "cheap_check_s": round(cheap, 5),
        "open_without_check_s": round(opened, 5),
        "cheap_check_share_of_cache_hit": round(cheap / cache_hit, 4),
        "cli_cache_hit_s": round(cli_hit, 3),
        "cheap_check_share_of_cli_cache_hit": round(cheap / cli_hit, 4),
        "full_check_s": round(full, 4),
        "full_check_without_crc_s": round(full_no_crc, 4),
        "token_chunk_write_s": round(write, 4),
        "token_chunk_write_without_crc_s": round(write_no_crc, 4),
        "token_chunk_crc_s": round(crc_only, 4),
        "crc_share_of_token_chunk_write": round(crc_only / write, 4),
    }
    print(f"store: {chunks} chunks per array, {arrays} arrays per split, {size / 2**20:.1f} MiB")
    print(f"cache hit of extract      {cache_hit * 1e3:8.1f} ms  (in this process, with the check)")
    print(f"cheap check               {cheap * 1e3:8.1f} ms  ({cheap / cache_hit:.1%} of it)")
    print(f"open without the check    {opened * 1e3:8.1f} ms")
    share = cheap / cli_hit
    print(f"cache hit from the CLI    {cli_hit * 1e3:8.1f} ms  (new process; check {share:.1%})")
    print(f"full check (verify)       {full * 1e3:8.1f} ms  ({full_no_crc * 1e3:.1f} ms no crc)")
    print(
        f"token chunk write         {write * 1e3:8.1f} ms  ({write_no_crc * 1e3:.1f} ms without "
        f"crc32s; the crc32 alone {crc_only * 1e3:.1f} ms, {crc_only / write:.1%})"
    )
    save_result("bench_check", "cpu", cpu_name(), rows, *([args.out] if args.out else []))


def token_chunk_write(root: Path, repeats: int) -> tuple[float, float, float]:
    """One chunk of tokens written (with its crc32s, without), and its crc32 alone."""
    rows, shape = 256, (196, 384)
    cfg = StoreConfig("bench", "vit", "random", {}, (11,), ("mean",), "float16", "fp32")
    dims = {n: 384 for n in cfg.feature_names}
    store = FeatureStore.create(
        root / "tokens.zarr",
        cfg,
        {},
        {"train": rows},
        dims,
        rows,
        set(),
        token_shapes={"layer11/tokens": shape},
    )
    rng = np.random.default_rng(0)
    columns = {
        "layer11/tokens": rng.standard_normal((rows, *shape)).astype(np.float16),
        "labels": np.zeros(rows, np.int64),
        "valid": np.ones(rows, bool),
        "ids": np.array([f"im{i}" for i in range(rows)]),
        "errors": np.array([""] * rows),
    }
    columns.update({n: np.zeros((rows, 384), np.float16) for n in cfg.feature_names})
    write = median_s(lambda: store.write_chunk("train", 0, rows, columns), repeats)
    with mock.patch.object(FeatureStore, "_crc_row", return_value=None):
        write_no_crc = median_s(lambda: store.write_chunk("train", 0, rows, columns), repeats)
    crc_only = median_s(lambda: values_crc(columns["layer11/tokens"]), repeats)
    return write, write_no_crc, crc_only


if __name__ == "__main__":
    main()
