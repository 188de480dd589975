"""kNN speed vs scikit-learn, and peak memory when the database is larger than the block budget.

speed:  Q queries x N database x D dims, every k of DEFAULT_KS. probekit searches once at
        max(k) and votes for all k; scikit-learn's KNeighborsClassifier(algorithm="brute",
        metric="cosine") is fit and asked to predict once per k, as a user would. Both use
        uniform (majority) votes, so the predictions must agree.
memory: a float16 feature store of N_big x D rows (written once to a temporary cache) is the
        database; probekit.knn streams it in blocks of --memory-mb. Runs in a fresh process
        and reports its peak RSS.
selection: leave-one-out kNN on a store's N-row train split (how a triage chooses k and the
        feature), every train row a query vs --selection-queries sampled ones (the triage's
        default): time, top-1 at every k, and whether both choose the same k.

    python benchmarks/bench_knn.py [--queries 10000 --database 100000 --dim 384]
                                   [--big 2000000 --big-queries 1000 --memory-mb 512]
                                   [--selection-queries 20000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, cpu_name, save_result

from probekit.neighbors import DEFAULT_KS, l2_normalize, search, vote


def peak_rss_kib() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    parent across fork+exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> tuple:
    labels = rng.integers(0, len(centers), n)
    x = centers[labels] + rng.normal(size=(n, dim)).astype(np.float32)
    return x.astype(np.float32), labels


def speed(n_q: int, n_db: int, dim: int) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(100, dim)).astype(np.float32) * 0.6
    db, db_y = clustered(rng, n_db, dim, centers)
    qs, q_y = clustered(rng, n_q, dim, centers)
    vote(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32), [1], 3)  # numba JIT warm-up
    t = time.perf_counter()
    sims, idx = search(l2_normalize(qs), l2_normalize(db), max(DEFAULT_KS), backend="faiss")
    ours = vote(db_y[idx], sims, DEFAULT_KS, 100, method="majority")
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    agree, acc = {}, {}
    for k in DEFAULT_KS:
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine").fit(db, db_y)
        pred = clf.predict(qs)
        agree[k] = float((pred == ours[k][:, 0]).mean())
        acc[k] = float((ours[k][:, 0] == q_y).mean())
    t_sk = time.perf_counter() - t
    return {
        "queries": n_q,
        "database": n_db,
        "dim": dim,
        "ks": list(DEFAULT_KS),
        "probekit_s": round(t_ours, 2),
        "sklearn_s": round(t_sk, 2),
        "speedup": round(t_sk / t_ours, 2),
        "prediction_agreement": agree,
        "top1_majority": acc,
    }


def build_store(cache: Path, n: int, n_q: int, dim: int, spread: float = 0.6) -> str:
    """A probekit store with a float16 feature of n train rows and n_q test rows (100 classes,
    their centres `spread` apart in units of the noise: smaller is harder)."""
    from probekit.cache.store import FeatureStore, StoreConfig

    cfg = StoreConfig("bench", "bench", "random", {}, (), (), "float16", "fp32")
    rows = 65536
    path = cache / "bench" / "bench.zarr"
    meta = {
        "dataset": {"spec": "bench", "fingerprint": "-"},
        "backbone": {"name": "bench"},
        "weights": {"source": "random"},
        "class_names": [str(i) for i in range(100)],
    }
    store = FeatureStore.create(
        path, cfg, meta, {"train": n, "test": n_q}, {"head/embed": dim}, rows, set()
    )
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(100, dim)).astype(np.float32) * spread
    for split, size in (("train", n), ("test", n_q)):
        for c, start in enumerate(range(0, size, rows)):
            m = min(rows, size - start)
            x, y = clustered(rng, m, dim, centers)
            store.write_chunk(
                split,
                c,
                rows,
                {
                    "head/embed": x.astype(np.float16),
                    "labels": y,
                    "valid": np.ones(m, bool),
                    "ids": np.array([f"{split}{start + i}" for i in range(m)]),
                    "errors": np.array([""] * m),
                },
            )
    store.update_meta(status="complete")
    return str(path)


def memory_child(path: str, memory_mb: int) -> None:
    import probekit

    t = time.perf_counter()
    res = probekit.knn(path, ks=DEFAULT_KS, memory_mb=memory_mb, backend="faiss", write=False)
    seconds = time.perf_counter() - t
    peak = peak_rss_kib() / 2**20  # KiB -> GiB
    print(
        json.dumps(
            {
                "seconds": round(seconds, 1),
                "peak_rss_gib": round(peak, 3),
                "top1_k20": res.value("top1", k=20),
            }
        )
    )


def memory(n: int, n_q: int, dim: int, memory_mb: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = build_store(Path(tmp), n, n_q, dim)
        build = time.perf_counter() - t
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        out = subprocess.run(
            [sys.executable, __file__, "--child", path, "--memory-mb", str(memory_mb)],
            capture_output=True,
            text=True,
            check=True,
        )
        child = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "database": n,
        "queries": n_q,
        "dim": dim,
        "memory_mb": memory_mb,
        "store_gib": round(size / 2**30, 2),
        "build_s": round(build, 1),
        **child,
    }


def selection(n: int, dim: int, sample: int) -> dict:
    import probekit

    out: dict = {"train": n, "dim": dim}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_store(Path(tmp), n, 100, dim, spread=0.2)  # top-1 depends on k
        for name, mq in (("all", None), ("sampled", sample)):
            t = time.perf_counter()
            res = probekit.knn(
                path,
                ks=DEFAULT_KS,
                test_split="train",
                max_queries=mq,
                backend="faiss",
                write=False,
            )
            top1 = {k: round(res.value("top1", k=k), 4) for k in DEFAULT_KS}
            out[name] = {
                "queries": res.records[0].n,
                "seconds": round(time.perf_counter() - t, 1),
                "top1": top1,
                "chosen_k": max(DEFAULT_KS, key=lambda k: (top1[k], -k)),
            }
    out["speedup"] = round(out["all"]["seconds"] / out["sampled"]["seconds"], 1)
    out["same_choice"] = out["all"]["chosen_k"] == out["sampled"]["chosen_k"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--database", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--big", type=int, default=2_000_000)
    ap.add_argument("--big-queries", type=int, default=1000)
    ap.add_argument("--memory-mb", type=int, default=512)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--selection-queries", type=int, default=20_000)
    ap.add_argument("--skip-selection", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.child:
        memory_child(args.child, args.memory_mb)
        return
    result = {
        "device": "cpu",
        "device_name": cpu_name(),
        "speed": speed(args.queries, args.database, args.dim),
    }
    s = result["speed"]
    print(
        f"speed  {s['queries']} x {s['database']} x {s['dim']}, k={s['ks']}: probekit "
        f"{s['probekit_s']} s, scikit-learn {s['sklearn_s']} s, {s['speedup']}x; "
        f"prediction agreement {s['prediction_agreement']}"
    )
    if not args.skip_memory:
        result["memory"] = m = memory(args.big, args.big_queries, args.dim, args.memory_mb)
        print(
            f"memory {m['database']} x {m['dim']} float16 store ({m['store_gib']} GiB), "
            f"{m['queries']} queries, budget {m['memory_mb']} MiB: peak RSS "
            f"{m['peak_rss_gib']} GiB, {m['seconds']} s"
        )
    if not args.skip_selection:
        result["selection"] = sel = selection(args.database, args.dim, args.selection_queries)
        print(
            f"selection leave-one-out on {sel['train']} x {sel['dim']}: every row a query "
            f"{sel['all']['seconds']} s (k={sel['all']['chosen_k']}), "
            f"{sel['sampled']['queries']} sampled {sel['sampled']['seconds']} s "
            f"(k={sel['sampled']['chosen_k']}), {sel['speedup']}x; top-1 by k "
            f"{sel['all']['top1']} vs {sel['sampled']['top1']}"
        )
    save_result(
        "bench_knn",
        "cpu",
        cpu_name(),
        {k: v for k, v in result.items() if k not in ("device", "device_name")},
        args.out,
    )


if __name__ == "__main__":
    main()
