"""Few-shot episodes: seeded nested sampling from the fit part only (a test that catches a
validation or test row sampled), per-episode kNN and logistic regression against independent
references, the t interval against scipy, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_store

import probekit.fewshot as fs
from probekit.errors import OptionError, ProbekitWarning
from probekit.probes.rows import holdout_split


def _blob_store(tmp_path: Path, val: bool = False) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 1.5
    y = rng.integers(0, 4, 500)
    x = (centres[y] + rng.normal(size=(500, 16))).astype(np.float32)
    splits = {"train": (x[:300], y[:300]), "test": (x[400:], y[400:])}
    if val:
        splits["val"] = (x[300:400], y[300:400])
    return write_store(tmp_path / "s.zarr", splits, list("abcd"))


def test_episodes_are_seeded_nested_and_class_ordered() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 60)
    rows = np.arange(100, 160)
    one = fs.sample_episodes(labels, rows, 1, 4, seed=7)
    five = fs.sample_episodes(labels, rows, 5, 4, seed=7)
    assert [list(e) for e in five] == [list(e) for e in fs.sample_episodes(labels, rows, 5, 4, 7)]
    other = fs.sample_episodes(labels, rows, 5, 4, 8)
    assert any(list(a) != list(b) for a, b in zip(five, other, strict=True))
    lab = dict(zip(rows, labels, strict=True))
    for e1, e5 in zip(one, five, strict=True):
        assert set(e1) <= set(e5) <= set(rows)  # nested, and only from the rows given
        assert [lab[r] for r in e5] == sorted(lab[r] for r in e5)  # class by class
        assert [lab[r] for r in e5] == [lab[r] for r in five[0]]  # the same labels each time
    assert len({tuple(e) for e in five}) == 4  # different episodes


def test_support_never_holds_a_validation_or_test_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _blob_store(tmp_path)
    drawn: list[np.ndarray] = []
    real = fs.sample_episodes

    def spy(labels: np.ndarray, rows: np.ndarray, *a: int) -> list[np.ndarray]:
        out = real(labels, rows, *a)
        drawn.extend(out)
        return out

    monkeypatch.setattr(fs, "sample_episodes", spy)
    with pytest.warns(ProbekitWarning, match="200 shots asked"):  # more than a class has
        res = fs.fewshot(path, shots=[1, 5, 200], episodes=3, seed=3, write=False)
    # the holdout the probes use (seed 3, 10%): never sampled, even asking for every row
    import probekit

    y_train = probekit.open_store(path).labels("train")
    fit, val = holdout_split(y_train, 0.1, 3)
    everything = np.concatenate(drawn)
    assert len(everything) and not set(everything) & set(val)
    assert set(everything) <= set(fit)
    assert len(drawn[-1]) == len(fit)  # 200 shots: every fit row, and no more
    digests = {r.extra["support_ids_sha256"] for r in res.records}
    assert len(digests) == 3  # one per shots
    # the resume key's hash: the same samples, from the labels alone
    import hashlib

    per_shots = [
        next(r for r in res.records if r.hyper["shots"] == s).extra["support_ids_sha256"]
        for s in (1, 5, 200)
    ]
    key = fs.support_digest(probekit.open_store(path), [1, 5, 200], 3, seed=3)
    assert key == hashlib.sha256(",".join(per_shots).encode()).hexdigest()[:16]
    assert fs.support_digest(probekit.open_store(path), [1, 5, 200], 3, seed=4) != key
    # a real val split: support only from train
    vpath = _blob_store(tmp_path / "v", val=True)
    drawn.clear()
    fs.fewshot(vpath, shots=[2], episodes=2, write=False)
    assert set(np.concatenate(drawn)) <= set(range(300))


def test_episode_scores_equal_independent_references(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    import probekit

    path = _blob_store(tmp_path)
    res = fs.fewshot(path, shots=[5], episodes=3, seed=0, write=False)
    store = probekit.open_store(path)
    x_tr, y_tr = store.features("train", "head/embed"), store.labels("train")
    x_te, y_te = store.features("test", "head/embed"), store.labels("test")
    fit, _ = holdout_split(y_tr, 0.1, 0)
    episodes = fs.sample_episodes(y_tr[fit], fit, 5, 3, 0)
    knn = next(r for r in res.records if r.method == "knn")
    logreg = next(r for r in res.records if r.method == "logreg")
    mean, std = x_tr[fit].astype(np.float64).mean(0), x_tr[fit].astype(np.float64).std(0)
    for e, rows in enumerate(episodes):
        # kNN: cosine, weighted vote exp(s / 0.07), with the k the episode chose
        k = knn.extra["chosen"][e]["k"]
        a = x_tr[rows] / np.linalg.norm(x_tr[rows], axis=1, keepdims=True)
        q = x_te / np.linalg.norm(x_te, axis=1, keepdims=True)
        s = q @ a.T
        votes = np.zeros((len(q), 4))
        for i in range(len(q)):
            for j in np.argsort(-s[i])[:k]:
                votes[i, y_tr[rows][j]] += np.exp(s[i, j] / 0.07)
        assert knn.extra["episodes_top1"][e] == pytest.approx((votes.argmax(1) == y_te).mean())
        # logistic regression with the C the episode chose: scikit-learn on the same rows
        c = logreg.extra["chosen"][e]["C"]
        clf = LogisticRegression(C=c, max_iter=5000, tol=1e-8)
        clf.fit((x_tr[rows] - mean) / std, y_tr[rows])
        want = (clf.predict((x_te - mean) / std) == y_te).mean()
        assert logreg.extra["episodes_top1"][e] == pytest.approx(want, abs=0.011)
    lo, hi = knn.extra["ci95"]
    assert lo <= knn.value <= hi
    assert knn.value == pytest.approx(np.mean(knn.extra["episodes_top1"]))
    assert {r.method for r in res.records} == {"knn", "linear", "logreg"}
    assert all(r.kind == "fewshot" and r.hyper["shots"] == 5 for r in res.records)


def test_t_interval_equals_scipy() -> None:
    from scipy import stats

    v = [0.61, 0.58, 0.66, 0.63, 0.6]
    want = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert fs.t_interval(v) == pytest.approx(want)
    assert fs.t_interval([0.5]) == (0.5, 0.5)


def test_bad_fewshot_options_are_one_line_errors(tmp_path: Path) -> None:
    path = _blob_store(tmp_path)
    with pytest.raises(OptionError, match="shots must be positive"):
        fs.fewshot(path, shots=[0, 5], write=False)
    with pytest.raises(OptionError, match="episodes must be a positive"):
        fs.fewshot(path, episodes=0, write=False)
    with pytest.raises(OptionError, match="few-shot method 'svm'"):
        fs.fewshot(path, methods="knn,svm", write=False)


def test_fewshot_cli_and_triage(tmp_path: Path) -> None:
    import csv
    import json

    from typer.testing import CliRunner

    import probekit
    from probekit.cli import app

    path = _blob_store(tmp_path)
    runner = CliRunner()
    got = runner.invoke(app, ["fewshot", str(path), "--shots", "1,5", "--episodes", "2"])
    assert got.exit_code == 0, got.output
    assert "5" in got.output and "95% CI" in got.output and "records:" in got.output
    js = runner.invoke(
        app, ["fewshot", str(path), "--shots", "2", "--episodes", "2", "--methods", "knn", "--json"]
    )
    (rec,) = [json.loads(line) for line in js.output.strip().splitlines()]
    assert rec["kind"] == "fewshot" and rec["hyper"] == {"shots": 2, "episodes": 2, "seed": 0}
    bad = runner.invoke(app, ["fewshot", str(path), "--shots", "a,b"])
    assert bad.exit_code == 1 and "shots" in bad.output

    res = probekit.triage(
        ["test_resnet@random", "test_vit@random"],
        ["synthetic:16"],
        img_size=64,
        layers="last",
        methods="knn,logreg",
        shots="1,3",
        episodes=2,
        out=tmp_path / "rep",
        cache_dir=tmp_path / "cache",
        quiet=True,
        log=None,
    )
    assert "## Few-shot" in Path(res.files["report.md"]).read_text()
    assert "fewshot.png" in res.files
    with open(res.files["results.csv"]) as f:
        rows = list(csv.DictReader(f))
    few = [r for r in rows if r["shots"]]
    assert {(r["model"], r["method"], r["shots"]) for r in few} == {
        (m, k, s)
        for m in ("test_resnet@random", "test_vit@random")
        for k in ("knn", "logreg")
        for s in ("1", "3")
    }
    assert all(r["episodes"] == "2" for r in few)
    assert all(not r["shots"] for r in rows if r not in few)


def test_more_shots_than_a_class_has_is_warned_and_recorded_as_it_is(tmp_path: Path) -> None:
    import probekit

    path = _blob_store(tmp_path)
    fit = holdout_split(probekit.open_store(path).labels("train"), 0.1, 0)[0]
    have = np.bincount(probekit.open_store(path).labels("train")[fit]).min()
    with pytest.warns(ProbekitWarning, match=rf"{have + 20} shots asked, but"):
        res = fs.fewshot(path, shots=[have + 20], episodes=1, methods="knn", write=False)
    (rec,) = res.records
    assert rec.hyper["shots"] == have + 20 and rec.extra["support_per_class"] == have
    assert min(rec.extra["support_per_class_each"]) == have
