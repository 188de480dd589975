from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_store
from sklearn.linear_model import LogisticRegression

import probekit
from probekit.cache.store import FeatureStore
from probekit.errors import ProbekitError, ProbekitWarning
from probekit.metrics import decode_outcomes, encode_outcomes, mcnemar_p, paired_bootstrap_ci
from probekit.probes import (
    bootstrap_ci,
    fit_logreg,
    holdout_split,
    logreg_objective,
    probe,
    train_linear_heads,
)


def _blobs(seed: int, n: int, d: int = 12, classes: int = 4, noise: float = 2.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    return (centers[y] + noise * rng.normal(size=(n, d))).astype(np.float64), y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c", [1e-3, 0.1, 10.0])
def test_logreg_matches_scikit_learn(c: float, dtype: torch.dtype) -> None:
    x, y = _blobs(0, 400)
    xt, yt = _blobs(0, 2000)[0][400:], _blobs(0, 2000)[1][400:]
    mean, std = x.mean(0), x.std(0)
    x, xt = (x - mean) / std, (xt - mean) / std
    ref = LogisticRegression(C=c, solver="lbfgs", tol=1e-10, max_iter=10_000).fit(x, y)
    tol = 1e-10 if dtype == torch.float64 else 1e-5  # float32 gradients are not exact to 1e-10
    info: dict = {}
    w, b = fit_logreg(torch.from_numpy(x).to(dtype), torch.from_numpy(y), 4, c, tol=tol, info=info)
    w64, b64 = w.double().numpy(), b.double().numpy()
    ours = logreg_objective(x, y, w64, b64, c)
    theirs = logreg_objective(x, y, ref.coef_, ref.intercept_, c)
    assert ours == pytest.approx(theirs, rel=1e-4)
    acc = ((xt @ w64.T + b64).argmax(1) == yt).mean()
    assert abs(acc - ref.score(xt, yt)) <= 0.003
    assert info["iterations"] > 0


def test_batched_heads_equal_heads_trained_alone() -> None:
    x, y = _blobs(1, 300)
    x2, _ = _blobs(7, 300)  # a second feature of the same width, on the same rows
    xt = torch.from_numpy(np.stack([x, x2])).float()
    yt = torch.from_numpy(y)
    lrs, wds = [1e-3, 1e-2, 0.1], [0.0, 1e-2]
    kw = {"epochs": 3, "batch_size": 32, "seed": 5}
    heads = train_linear_heads(xt, yt, 4, lrs, wds, **kw)
    assert heads.weight.shape == (2, 12, 6, 4)
    for li in range(2):
        for i, (lr, wd) in enumerate([(lr, wd) for lr in lrs for wd in wds]):
            alone = train_linear_heads(xt[li], yt, 4, [lr], [wd], **kw)
            torch.testing.assert_close(
                heads.weight[li, :, i], alone.weight[0, :, 0], rtol=1e-4, atol=1e-6
            )
            torch.testing.assert_close(heads.bias[li, i], alone.bias[0, 0], rtol=1e-4, atol=1e-6)
    adam = train_linear_heads(xt, yt, 4, lrs, wds, optimizer="adamw", **kw)
    assert torch.isfinite(adam.weight).all()


def test_linear_heads_follow_autograd_and_keep_the_best_epoch() -> None:
    """The hand-written softmax gradient equals autograd's; best epochs are tracked per head."""
    from probekit.probes.linear import LinearHeads, _softmax_minus_onehot

    x, y = _blobs(2, 64)
    xt, yt = torch.from_numpy(x)[None], torch.from_numpy(y)
    w = torch.randn(1, 12, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    heads = LinearHeads(w.detach(), b.detach(), *[np.zeros((1, 3))] * 3)
    p = _softmax_minus_onehot(heads, xt, yt) / len(yt)  # (1, B, H, C)
    g_w = torch.einsum("lbd,lbhc->ldhc", xt, p)
    g_b = p.sum(1)
    logits = torch.einsum("lbd,ldhc->lbhc", xt, w) + b[:, None]
    loss = sum(torch.nn.functional.cross_entropy(logits[0, :, i], yt) for i in range(3))
    loss.backward()
    torch.testing.assert_close(g_w, w.grad)
    torch.testing.assert_close(g_b, b.grad)
    xv, yv = torch.from_numpy(x[:20]).float(), yt[:20]
    best = train_linear_heads(
        xt[0].float(), yt, 4, [1e-2, 10.0], [0.0], epochs=4, seed=0, x_val=xv, y_val=yv
    )
    assert best.epoch.shape == (1, 2) and (best.epoch >= 1).all() and (best.epoch <= 4).all()
    logits = best.logits(xv[None])  # (1, V, H, C)
    acc = (logits.argmax(-1) == yv[None, :, None]).double().mean(1).numpy()
    np.testing.assert_allclose(acc, best.val_acc)


def test_holdout_is_stratified_and_seeded() -> None:
    y = np.repeat(np.arange(5), [40, 30, 20, 10, 1])
    fit, val = holdout_split(y, 0.1, seed=0)
    assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == len(y)
    assert np.bincount(y[val], minlength=5)[:4].tolist() == [4, 3, 2, 1]
    assert 100 in fit  # the single example of class 4 stays in the fit part
    assert np.array_equal(holdout_split(y, 0.1, seed=0)[1], val)
    assert not np.array_equal(holdout_split(y, 0.1, seed=1)[1], val)


def test_bootstrap_ci_brackets_the_mean() -> None:
    correct = (np.random.default_rng(0).random(400) < 0.8).astype(float)
    lo, hi = bootstrap_ci(correct)
    half = 1.96 * np.sqrt(0.8 * 0.2 / 400)
    assert lo < correct.mean() < hi
    assert hi - lo == pytest.approx(2 * half, rel=0.2)


def test_paired_bootstrap_ci_matches_resampling_the_images() -> None:
    rng = np.random.default_rng(3)
    a = rng.random(300) < 0.75
    b = np.where(rng.random(300) < 0.8, a, ~a)  # mostly the same images right, as two models
    lo, hi = paired_bootstrap_ci(a, b, n_boot=20000)
    # the reference: resample image indices, both models together
    idx = rng.integers(0, 300, size=(20000, 300))
    diffs = a[idx].mean(1) - b[idx].mean(1)
    ref_lo, ref_hi = np.quantile(diffs, [0.025, 0.975])
    assert lo == pytest.approx(ref_lo, abs=0.006) and hi == pytest.approx(ref_hi, abs=0.006)
    # pairing narrows the interval: unpaired intervals of the two means are wider
    assert hi - lo < np.sqrt(2) * (bootstrap_ci(a)[1] - bootstrap_ci(a)[0])
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap_ci(a, b[:-1])


def test_mcnemar_p_is_the_exact_binomial_tail_of_the_disagreements() -> None:
    from math import comb

    rng = np.random.default_rng(5)
    for _ in range(20):
        a, b = rng.random(60) < 0.7, rng.random(60) < rng.uniform(0.3, 0.9)
        only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
        n, low = only_a + only_b, min(only_a, only_b)
        tail = sum(comb(n, i) for i in range(low + 1)) / 2**n  # brute force, both tails
        assert mcnemar_p(a, b) == pytest.approx(min(1.0, 2 * tail))
        assert mcnemar_p(a, b) == mcnemar_p(b, a)
    assert mcnemar_p(a, a) == 1.0


def test_outcomes_round_trip() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 1001):
        scored = rng.random(n) < 0.9
        right = rng.random(int(scored.sum())) < 0.5
        d = json.loads(json.dumps(encode_outcomes(scored, right, "fp")))
        got_scored, got_right = decode_outcomes(d)
        assert np.array_equal(got_scored, scored) and np.array_equal(got_right[scored], right)
        assert not got_right[~scored].any() and d["fingerprint"] == "fp"


def _store(
    tmp_path: Path,
    name: str,
    seed: int = 2,
    test_labels: np.ndarray | None = None,
    classes: int = 4,
) -> Path:
    x, y = _blobs(seed, 700, classes=classes)
    test_y = y[500:] if test_labels is None else test_labels
    return write_store(
        tmp_path / name,
        {"train": (x[:500], y[:500]), "test": (x[500:], test_y)},
        [f"c{i}" for i in range(classes)],
    )


SMALL = {"lrs": [1e-2, 0.1], "wds": [0.0], "epochs": 3, "cs": [1e-3, 1e-1, 10.0], "write": False}


def test_probe_end_to_end(tmp_path: Path) -> None:
    res = probe(_store(tmp_path, "a.zarr"), **{**SMALL, "write": True})
    assert set(res.selected) == {"linear", "logreg"}
    assert res.selected["logreg"]["C"] in SMALL["cs"]
    assert res.selected["linear"]["heads"] == 2
    for m in ("linear", "logreg"):
        top1 = res.value("top1", method=m, split="test")
        assert 0.7 < top1 <= 1.0
        rec = next(r for r in res.records if r.method == m and r.metric == "top1")
        lo, hi = rec.extra["ci95"]
        assert lo <= top1 <= hi
        assert res.value("train_top1", method=m) > 0.7
    assert res.path is not None and Path(res.path).is_file()


class _Spy(FeatureStore):
    """Logs which split each read touches, in order."""

    log: list[str]

    def labels(self, split: str) -> np.ndarray:
        self.log.append(split)
        return super().labels(split)

    def features(self, split: str, name: str = "head/embed") -> np.ndarray:
        self.log.append(split)
        return super().features(split, name)


def test_selection_never_reads_the_test_split(tmp_path: Path) -> None:
    """Selection is the same whatever the test labels are, and no test read comes before it."""
    a = probekit.open_store(_store(tmp_path, "a.zarr"))
    shuffled = np.random.default_rng(9).integers(0, 4, 200)
    b = probekit.open_store(_store(tmp_path, "b.zarr", test_labels=shuffled))
    assert probe(a, **SMALL).selected == probe(b, **SMALL).selected
    spy = _Spy(a.path, a.group)
    spy.log = []
    result = probe(spy, **SMALL)
    first_test = spy.log.index("test")
    assert "train" not in spy.log[first_test:]  # every test read comes after all training reads
    assert result.selected


def test_a_real_val_split_replaces_the_holdout(tmp_path: Path) -> None:
    x, y = _blobs(4, 900)
    path = write_store(
        tmp_path / "v.zarr",
        {"train": (x[:500], y[:500]), "val": (x[500:700], y[500:700]), "test": (x[700:], y[700:])},
        ["a", "b", "c", "d"],
    )
    res = probe(path, **SMALL)
    for m in ("linear", "logreg"):
        train = next(r for r in res.records if r.method == m and r.metric == "train_top1")
        # the probe fits on the whole train split (plus val for the logreg refit): no holdout
        assert train.n == (700 if m == "logreg" else 500)
    spy = _Spy(path, probekit.open_store(path).group)
    spy.log = []
    probe(spy, **SMALL)
    assert "val" in spy.log and spy.log.index("val") < spy.log.index("test")


def test_degenerate_inputs(tmp_path: Path) -> None:
    x, _ = _blobs(3, 100)
    one = write_store(
        tmp_path / "one.zarr",
        {"train": (x[:80], np.zeros(80, np.int64)), "test": (x[80:], np.zeros(20, np.int64))},
        ["a"],
    )
    with pytest.raises(ProbekitError, match="fewer than 2 classes"):
        probe(one, **SMALL)
    # a class only the test split has: a sensible result, that class scored 0
    y = np.arange(100) % 3
    missing = write_store(
        tmp_path / "missing.zarr",
        {"train": (x[:80], y[:80]), "test": (x[80:], np.full(20, 3))},
        ["a", "b", "c", "d"],
    )
    with pytest.warns(ProbekitWarning, match=r"no train images \('d'\).* at most 0\.0%"):
        res = probe(missing, **SMALL)
    assert res.value("top1", method="logreg") == 0.0
    # constant features: standardization leaves them at zero, no NaN
    const = x.copy()
    const[:, :5] = 7.0
    cst = write_store(
        tmp_path / "const.zarr",
        {"train": (const[:80], y[:80]), "test": (const[80:], y[80:])},
        ["a", "b", "c"],
    )
    res = probe(cst, **SMALL)
    assert all(np.isfinite(r.value) for r in res.records)


def test_transfer_needs_matching_classes(tmp_path: Path) -> None:
    src = _store(tmp_path, "src.zarr")
    same = _store(tmp_path, "same.zarr", seed=2)
    res = probe(src, eval_on=[same], method="logreg", **SMALL)
    splits = {r.dataset for r in res.records if r.metric == "top1"}
    assert splits == {"arrays:src.zarr", "arrays:same.zarr"}
    other = _store(tmp_path, "other.zarr", classes=5)
    with pytest.raises(ProbekitError, match="not among the probe's training classes"):
        probe(src, eval_on=[other], method="logreg", **SMALL)


@pytest.mark.slow
def test_pretrained_effnet_lite0_probe_beats_random_init_and_transfers() -> None:
    kw = dict(img_size=64, layers="last", pool="mean", quiet=True)
    tops = {}
    for random_init in (False, True):
        ext = probekit.extract("effnet_lite0", "mnist5k", random_init=random_init, **kw)
        digits = probekit.extract("effnet_lite0", "digits", random_init=random_init, **kw)
        res = probe(
            ext.store_path,
            method="logreg",
            features=["head/embed"],
            cs=[1e-3, 1e-2, 1e-1, 1.0],
            eval_on=[digits.store_path],
        )
        tops[random_init] = next(
            r.value for r in res.records if r.metric == "top1" and r.dataset == "mnist5k"
        )
        transfer = [r for r in res.records if r.metric == "top1" and r.dataset == "digits"]
        assert len(transfer) == 1 and 0.0 <= transfer[0].value <= 1.0
    assert tops[False] > tops[True] + 0.02, tops


def _two_feature_store(tmp_path: Path, n: int = 900, d: int = 16) -> Path:
    x, y = _blobs(3, n + 300, d=d)
    x2, _ = _blobs(4, n + 300, d=d)
    feats = {"layer0/mean": x, "head/embed": x2}
    return write_store(
        tmp_path / "two.zarr",
        {
            "train": ({k: v[:n] for k, v in feats.items()}, y[:n]),
            "test": ({k: v[n:] for k, v in feats.items()}, y[n:]),
        },
        [f"c{i}" for i in range(4)],
        chunk_rows=128,
    )


def test_windowed_minibatches_visit_every_row_once() -> None:
    from probekit.probes import Rows
    from probekit.probes.linear import minibatches

    n = 1000
    rows = Rows.of(torch.arange(n, dtype=torch.float64)[None, :, None])
    y = torch.arange(n)
    gen = torch.Generator().manual_seed(0)
    for window in (n, 300, 97, 40):  # whole, and windows that do not divide into batches
        seen, sizes = [], []
        for xb, yb in minibatches(rows, y, 64, window, gen):
            assert torch.equal(xb[0, :, 0].long(), yb)  # features and labels stay paired
            seen.append(yb)
            sizes.append(len(yb))
        assert torch.equal(torch.cat(seen).sort().values, y)
        assert sizes[:-1] == [64] * (len(sizes) - 1) and len(sizes) == -(-n // 64)


def test_windowed_minibatches_mix_rows_stored_sorted_by_class() -> None:
    """A store's rows are often sorted by class (mnist5k, image folders): a streamed window is
    made of many small blocks, so every batch still holds nearly every class."""
    from probekit.probes import Rows
    from probekit.probes.linear import minibatches

    n, classes = 4000, 10
    y = torch.arange(n) * classes // n  # sorted by class
    rows = Rows.of(y.double()[None, :, None])
    gen = torch.Generator().manual_seed(0)
    batches = list(minibatches(rows, y, 256, 1100, gen))
    assert min(len(yb.unique()) for _, yb in batches) >= classes - 1
    assert max(int(yb.bincount().max()) for _, yb in batches) < 3 * 256 // classes


def test_streamed_features_give_the_same_probes(tmp_path: Path) -> None:
    """Rows read from the store a block at a time give the same floats, heads and logistic
    regression as the same rows held in memory."""
    from probekit.probes import Rows, feature_stats

    store = probekit.open_store(_two_feature_store(tmp_path))
    names = ["layer0/mean", "head/embed"]
    rows = np.flatnonzero(np.arange(900) % 7 != 3)  # not contiguous: chunks read in part
    x_all = np.stack([store.features("train", nm) for nm in names]).astype(np.float64)
    stats = [feature_stats(store, "train", nm, rows, block=50) for nm in names]
    for (mean, std), x in zip(stats, x_all, strict=True):
        np.testing.assert_allclose(mean, x[rows].mean(0), rtol=1e-12)
        np.testing.assert_allclose(std, x[rows].std(0), rtol=1e-12)
    mean = torch.tensor(np.stack([m for m, _ in stats]), dtype=torch.float32)
    std = torch.tensor(np.stack([s for _, s in stats]), dtype=torch.float32)
    row_bytes = 2 * 16 * 4
    streamed = Rows.from_store(store, "train", names, rows, mean, std, budget=100 * row_bytes)
    held = Rows.from_store(store, "train", names, rows, mean, std, budget=10**9)
    assert not streamed.resident and streamed.block == 100 and held.resident
    assert held.data is not None
    assert torch.equal(torch.cat(list(streamed.blocks()), 1), held.data)
    expect = (torch.from_numpy(x_all[:, rows]).float() - mean[:, None]) / std[:, None]
    torch.testing.assert_close(held.data, expect)

    y = torch.from_numpy(store.labels("train")[rows])
    kw = {"epochs": 3, "batch_size": 32, "seed": 1, "x_val": held, "y_val": y}
    a = train_linear_heads(streamed, y, 4, [1e-2, 0.1], [0.0, 1e-3], **kw)
    b = train_linear_heads(held, y, 4, [1e-2, 0.1], [0.0, 1e-3], window=100, **kw)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert np.array_equal(a.epoch, b.epoch)

    one_s = Rows.from_store(store, "train", names[:1], rows, mean[:1], std[:1], budget=4096)
    one_h = Rows.from_store(store, "train", names[:1], rows, mean[:1], std[:1], budget=10**9)
    assert not one_s.resident and one_h.resident
    ws, bs = fit_logreg(one_s, y, 4, 0.1, tol=1e-6)
    wh, bh = fit_logreg(one_h, y, 4, 0.1, tol=1e-6)
    assert one_h.data is not None
    z, yn = one_h.data[0].double().numpy(), y.numpy()
    objective_s = logreg_objective(z, yn, ws.numpy(), bs.numpy(), 0.1)
    assert objective_s == pytest.approx(
        logreg_objective(z, yn, wh.numpy(), bh.numpy(), 0.1), rel=1e-7
    )
    torch.testing.assert_close(ws, wh, rtol=1e-3, atol=1e-4)  # the same minimum, to tolerance


def test_probe_streams_features_beyond_its_memory_budget(tmp_path: Path) -> None:
    x, y = _blobs(5, 4000, d=128, classes=4, noise=3.0)
    path = write_store(
        tmp_path / "big.zarr",
        {"train": (x[:3000], y[:3000]), "test": (x[3000:], y[3000:])},
        [f"c{i}" for i in range(4)],
        chunk_rows=256,
    )  # 3000 x 128 float32 = 1.5 MiB of train features: more than a 1 MiB budget
    kw = {**SMALL, "cs": [1e-3, 1e-2, 0.1, 1.0]}
    held = probe(path, **kw)
    streamed = probe(path, memory_mb=1, **kw)
    assert "features_streamed" not in held.selected["logreg"]
    for m in ("linear", "logreg"):
        assert streamed.selected[m]["features_streamed"] is True
    assert streamed.selected["logreg"]["C"] == held.selected["logreg"]["C"]
    assert streamed.value("top1", method="logreg") == pytest.approx(
        held.value("top1", method="logreg"), abs=0.002
    )
    # the linear heads see the rows in a windowed order: close, not equal
    assert streamed.value("top1", method="linear") == pytest.approx(
        held.value("top1", method="linear"), abs=0.03
    )
    with pytest.raises(ProbekitError, match="memory_mb must be a positive number of MiB"):
        probe(path, memory_mb=0, **kw)
