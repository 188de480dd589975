from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from typer.testing import CliRunner

import probekit
from probekit.cli import app
from probekit.errors import ProbekitError
from probekit.neighbors import l2_normalize, search, vote

BACKENDS = ["faiss", "torch"]


def _data(seed: int, n: int = 400, q: int = 60, d: int = 16, classes: int = 7):
    rng = np.random.default_rng(seed)
    db = l2_normalize(rng.normal(size=(n, d)))
    qs = l2_normalize(rng.normal(size=(q, d)))
    return db, qs, rng.integers(0, classes, n), rng.integers(0, classes, q)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_mb", [0, 1, 512])  # 0: one database row per block
def test_search_equals_brute_force(backend: str, memory_mb: int) -> None:
    db, qs, _, _ = _data(0)
    sims, idx = search(qs, db, 25, backend=backend, memory_mb=memory_mb)
    full = qs @ db.T
    want = np.argsort(-full, axis=1)[:, :25]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(sims, np.take_along_axis(full, want, 1), rtol=1e-5, atol=1e-6)


def test_search_streams_blocks_and_excludes_self() -> None:
    db, _, _, _ = _data(1, n=97)
    blocks = ((s, db[s : s + 10]) for s in range(0, len(db), 10))
    _, idx = search(db, blocks, 5, backend="faiss", exclude=np.arange(len(db)))
    full = db @ db.T
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :5])
    assert not (idx == np.arange(len(db))[:, None]).any()


def test_fewer_queries_than_any_block_and_k_too_large() -> None:
    db, qs, _, _ = _data(2, n=30, q=3)
    _, idx = search(qs, db, 30, backend="faiss")
    assert idx.shape == (3, 30) and sorted(idx[0]) == list(range(30))
    with pytest.raises(ProbekitError, match="larger than the database"):
        search(qs, db, 31, backend="faiss")
    with pytest.raises(ProbekitError, match="besides the query itself"):
        search(db, db, 30, backend="faiss", exclude=np.arange(30))


def test_weighted_vote_equals_the_dino_formula() -> None:
    rng = np.random.default_rng(3)
    q, kmax, c, t = 50, 40, 9, 0.07
    sims = np.sort(rng.uniform(-1, 1, size=(q, kmax)), axis=1)[:, ::-1].astype(np.float32)
    labels = rng.integers(0, c, size=(q, kmax))
    ranked = vote(labels, sims, [1, 5, 20, 40], c, t, "weighted")
    for k in (1, 5, 20, 40):
        onehot = np.eye(c)[labels[:, :k]]  # (q, k, c)
        scores = (onehot * np.exp(sims[:, :k, None].astype(np.float64) / t)).sum(1)
        want = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(ranked[k][:, : min(5, c)], want)


@pytest.mark.parametrize("k", [1, 4, 10, 33])
def test_majority_vote_equals_scikit_learn(k: int) -> None:
    db, qs, db_y, _ = _data(4, n=300, q=80, classes=5)
    sims, idx = search(qs, db, k, backend="faiss")
    ours = vote(db_y[idx], sims, [k], 5, method="majority")[k][:, 0]
    ref = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine").fit(db, db_y)
    np.testing.assert_array_equal(ours, ref.predict(qs))


def _brute_retrieval(sims: np.ndarray, gy: np.ndarray, qy: np.ndarray) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for i in range(len(qy)):
        order = [j for j in np.argsort(-sims[i], kind="stable") if np.isfinite(sims[i, j])]
        rel = [gy[j] == qy[i] for j in order]
        r = sum(rel)
        if r == 0:
            continue
        precs = [sum(rel[: j + 1]) / (j + 1) for j in range(len(rel)) if rel[j]]
        out.setdefault("mAP", []).append(sum(precs) / r)
        out.setdefault("mAP@R", []).append(
            sum(sum(rel[: j + 1]) / (j + 1) for j in range(r) if rel[j]) / r
        )
        out.setdefault("MRR", []).append(1 / (rel.index(True) + 1))
        for k in (1, 5, 10):
            out.setdefault(f"precision@{k}", []).append(sum(rel[:k]) / k)
            out.setdefault(f"recall@{k}", []).append(sum(rel[:k]) / r)
    return {key: float(np.mean(v)) for key, v in out.items()}


@pytest.mark.parametrize("same_split", [False, True])
def test_retrieval_metrics_equal_brute_force(same_split: bool) -> None:
    db, qs, db_y, q_y = _data(5, n=120, q=40, classes=6)
    if same_split:
        qs, q_y = db, db_y
    res = probekit.knn(
        (db, db_y, qs, q_y),
        retrieval=True,
        write=False,
        train_split="train",
        test_split="train" if same_split else "test",
    )
    sims = qs @ db.T
    if same_split:
        np.fill_diagonal(sims, -np.inf)
    want = _brute_retrieval(sims, db_y, q_y)
    got = {r.metric: r.value for r in res.records}
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_knn_on_a_store_writes_records(cache_dir: Path) -> None:
    ext = probekit.extract(
        "test_vit",
        "synthetic:8",
        random_init=True,
        layers="last2",
        pool="cls,mean",
        chunk_rows=8,
        num_workers=0,
        quiet=True,
    )
    with pytest.raises(ProbekitError, match="larger than the database"):
        probekit.knn(ext.store_path, ks=[1, 200])
    res = probekit.knn(ext.store_path, ks=[1, 3, 24], vote_method="both")
    assert res.path is not None and Path(res.path).parent == Path(ext.store_path).parent
    lines = [json.loads(x) for x in Path(res.path).read_text().splitlines()]
    assert len(lines) == len(res.records)
    assert all(r["schema"] == 2 and r["kind"] == "knn" for r in lines)
    features = {r["feature"] for r in lines}
    assert features == {"layer4/cls", "layer4/mean", "layer5/cls", "layer5/mean", "head/embed"}
    store = probekit.open_store(ext.store_path)
    # recompute one number independently: majority vote, k=3, from the stored arrays
    tr, te = store.features("train", "layer5/mean"), store.features("test", "layer5/mean")
    ref = KNeighborsClassifier(n_neighbors=3, algorithm="brute", metric="cosine")
    acc = (ref.fit(tr, store.labels("train")).predict(te) == store.labels("test")).mean()
    assert res.value("top1", layer="layer5", pool="mean", k=3, vote="majority") == acc
    assert res.value("top5", layer="layer5", pool="mean", k=24, vote="weighted") == 1.0


def test_knn_cli(cache_dir: Path) -> None:
    runner = CliRunner()
    args = [
        "knn",
        "-b",
        "test_resnet",
        "-d",
        "synthetic:8",
        "--random-init",
        "--pool",
        "mean",
        "--layers",
        "last",
        "--k",
        "1,5",
        "--quiet",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "kNN (faiss), test vs train" in res.output and "head/embed" in res.output
    assert "records: " in res.output
    res = runner.invoke(app, [*args[:-3], "--k", "500"])
    assert res.exit_code == 1 and "larger than the database" in res.output
    res = runner.invoke(app, ["knn"])
    assert res.exit_code == 1 and "--backbone and --data" in res.output


@pytest.mark.slow
def test_pretrained_effnet_lite0_beats_random_init_on_mnist5k() -> None:
    kw = dict(img_size=64, layers="last", pool="mean", quiet=True)
    accs = {}
    for random_init in (False, True):
        ext = probekit.extract("effnet_lite0", "mnist5k", random_init=random_init, **kw)
        res = probekit.knn(ext.store_path, ks=[20], features=["head/embed"])
        accs[random_init] = res.value("top1", k=20)
    assert accs[False] > accs[True] + 0.05, accs
    assert accs[False] > 0.85, accs


def test_query_gallery_splits_mean_retrieval(image_folder: Path) -> None:
    (image_folder / "train").rename(image_folder / "gallery")
    (image_folder / "test").rename(image_folder / "query")
    ext = probekit.extract(
        "test_resnet",
        f"imagefolder:{image_folder}",
        random_init=True,
        pool="mean",
        layers="last",
        num_workers=0,
        quiet=True,
    )
    res = probekit.knn(ext.store_path)
    metrics = {r.metric for r in res.records}
    assert metrics == {
        "mAP",
        "mAP@R",
        "MRR",
        "precision@1",
        "precision@5",
        "precision@10",
        "recall@1",
        "recall@5",
        "recall@10",
    }
    assert all(r.split == "query" and r.n == 4 for r in res.records)
    assert all(0.0 <= r.value <= 1.0 for r in res.records)


def test_per_class_and_balanced_accuracy_equal_scikit_learn() -> None:
    from sklearn.metrics import balanced_accuracy_score, recall_score

    db, qs, db_y, q_y = _data(6, n=200, q=90, classes=4)
    res = probekit.knn((db, db_y, qs, q_y), ks=[5], vote_method="majority", write=False)
    pred = KNeighborsClassifier(n_neighbors=5, algorithm="brute", metric="cosine")
    pred = pred.fit(db, db_y).predict(qs)
    want = recall_score(q_y, pred, average=None, labels=range(4))
    worst = next(r for r in res.records if r.metric == "worst_class_accuracy")
    np.testing.assert_allclose(worst.extra["per_class"], want)
    assert worst.value == pytest.approx(want.min())
    assert res.value("balanced_accuracy", k=5) == pytest.approx(balanced_accuracy_score(q_y, pred))
    assert res.value("top1", k=5) == pytest.approx((pred == q_y).mean())


def test_last_n_features_concatenate_the_models_last_layers(tmp_path: Path) -> None:
    """`last2/cls` reads the last two layers' features side by side (DINO's linear protocol
    concatenates the last 4 blocks' class tokens): as if the concatenation had been stored."""
    from conftest import write_store

    from probekit.cache.store import open_store

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 5))

    def split(n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        y = rng.integers(0, 3, n)
        x = {f"layer{i}/cls": centers[y, : 2 + i] + rng.normal(size=(n, 2 + i)) for i in range(4)}
        return {**x, "head/embed": rng.normal(size=(n, 3))}, y

    splits = {"train": split(90), "test": split(40)}
    path = write_store(tmp_path / "s.zarr", splits, ["a", "b", "c"], chunk_rows=16, num_layers=4)
    cat = {
        s: (np.concatenate([x["layer2/cls"], x["layer3/cls"]], 1).astype(np.float32), y)
        for s, (x, y) in splits.items()
    }
    flat = write_store(tmp_path / "flat.zarr", cat, ["a", "b", "c"], chunk_rows=16)
    store, ref = open_store(path), open_store(flat)
    assert store.feature_dim("last2/cls") == 4 + 5
    np.testing.assert_array_equal(store.features("train", "last2/cls"), cat["train"][0])
    rows = np.array([1, 5, 40, 89])
    sparse = store.read_rows("train", "last2/cls", rows)
    np.testing.assert_array_equal(sparse, cat["train"][0][rows])
    blocks = [b for _, b in store.iter_features("train", "last2/cls", rows=16)]
    np.testing.assert_array_equal(np.concatenate(blocks), cat["train"][0])
    assert store.parts("last1/cls") == ["layer3/cls"]
    assert store.parts("head/embed") == ["head/embed"]
    # kNN and a probe on it give what they give on the stored concatenation
    ks = [1, 5, 20]
    got = probekit.knn(store, ks=ks, features=["last2/cls"], memory_mb=1, write=False)
    want = probekit.knn(ref, ks=ks, memory_mb=1, write=False)
    assert [r.value for r in got.records] == [r.value for r in want.records]
    p_got = probekit.probe(store, method="logreg", features=["last2/cls"], write=False)
    p_want = probekit.probe(ref, method="logreg", write=False)
    assert p_got.selected["logreg"]["feature"] == "last2/cls"
    assert p_got.value("top1", method="logreg", split="test") == pytest.approx(
        p_want.value("top1", method="logreg", split="test")
    )
    for bad, msg in [("last5/cls", "pick N from 1 to 4"), ("last2/mean", "lacks layer2/mean")]:
        with pytest.raises(ProbekitError, match=msg):
            probekit.knn(store, features=[bad], write=False)


def test_max_queries_samples_queries_against_the_whole_database(tmp_path: Path) -> None:
    """A sample of the queries gets exactly the neighbours it gets among all queries, self
    left out where database and queries are one split (with invalid rows in between)."""
    import zarr
    from conftest import write_store

    from probekit.cache.store import open_store

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    x = rng.normal(size=(4, 8))[y] + 1.5 * rng.normal(size=(300, 8))
    path = write_store(
        tmp_path / "s.zarr", {"train": (x, y), "test": (x[:120], y[:120])}, list("abcd")
    )
    valid = zarr.open_group(str(path), mode="r+")["train/valid"]
    valid[[3, 50, 51, 200]] = False  # invalid rows: query rows and database rows part ways
    store = open_store(path)
    key = ("head/embed", 5, "weighted")
    sampled = {}
    for split in ("train", "test"):
        full = probekit.knn(store, ks=[5], test_split=split, write=False)
        part = probekit.knn(store, ks=[5], test_split=split, max_queries=40, seed=3, write=False)
        assert full.queried is not None and part.queried is not None
        assert part.queried.sum() == 40 and not (part.queried & ~full.queried).any()
        np.testing.assert_array_equal(part.right[key], full.right[key][part.queried[full.queried]])
        assert part.records[0].n == 40
        sampled[split] = part.queried
    again = probekit.knn(store, ks=[5], test_split="train", max_queries=40, seed=3, write=False)
    other = probekit.knn(store, ks=[5], test_split="train", max_queries=40, seed=4, write=False)
    assert np.array_equal(again.queried, sampled["train"])
    assert not np.array_equal(other.queried, sampled["train"])
    with pytest.raises(ProbekitError, match="max_queries must be a positive"):
        probekit.knn(store, max_queries=0, write=False)


def test_a_huge_k_is_refused_before_anything_is_allocated() -> None:
    """k is checked against the database before the search allocates (queries, k) results:
    10^12 neighbours is a one-line error, not an out-of-memory kill."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)).astype(np.float32), np.arange(40) % 4
    tracemalloc.start()
    with pytest.raises(ProbekitError, match=r"k=1000000000000 is larger than the database"):
        probekit.knn((x, y, x[:5], y[:5]), ks=[10**12], write=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 * 2**20
