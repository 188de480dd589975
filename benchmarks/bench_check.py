"""What a store's self-check costs: the cheap check (every array's metadata, one listing, the
done flags) against a whole cache hit of `extract` on the same store, and the full check
(`probekit verify`: every chunk decoded).

The store: test_resnet (random init) over mnist5k in chunks of --chunk-rows rows (80: 50 chunks
per array of the train split), the default layers and pools. Each timing is the median of
--repeats calls in this process, measured in one run (ratios, not absolute times, carry over
to other machines).

    python benchmarks/bench_check.py [--chunk-rows 80 --repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import cpu_name, save_result

import probekit
from probekit.cache.store import open_store


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
        arrays = 5 + len(store.feature_names)  # labels, valid, ids, errors, done + features

        def hit() -> None:
            assert probekit.extract("test_resnet@random", "mnist5k", **kw).cache_hit

        hit()  # warm: imports, the dataset's first load
        cache_hit = median_s(hit, args.repeats)
        cheap = median_s(lambda: open_store(made.store_path, check=False).check(), args.repeats)
        opened = median_s(lambda: open_store(made.store_path, check=False), args.repeats)
        full = median_s(lambda: probekit.verify(made.store_path), max(3, args.repeats // 5))
        size = sum(f.stat().st_size for f in Path(made.store_path).rglob("*") if f.is_file())
    rows = {
        "chunks_per_array": chunks,
        "arrays_per_split": arrays,
        "store_mib": round(size / 2**20, 2),
        "cache_hit_s": round(cache_hit, 5),
        "cheap_check_s": round(cheap, 5),
        "open_without_check_s": round(opened, 5),
        "cheap_check_share_of_cache_hit": round(cheap / cache_hit, 4),
        "full_check_s": round(full, 4),
    }
    print(f"store: {chunks} chunks per array, {arrays} arrays per split, {size / 2**20:.1f} MiB")
    print(f"cache hit of extract      {cache_hit * 1e3:8.1f} ms  (the check included)")
    print(f"cheap check               {cheap * 1e3:8.1f} ms  ({cheap / cache_hit:.1%} of it)")
    print(f"open without the check    {opened * 1e3:8.1f} ms")
    print(f"full check (verify)       {full * 1e3:8.1f} ms")
    save_result("bench_check", "cpu", cpu_name(), rows, *([args.out] if args.out else []))


if __name__ == "__main__":
    main()
