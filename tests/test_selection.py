"""Every choice made on validation is the validation winner, even where that winner is the
worst on test: planted data (and planted validation scores) whose unique validation winner is
known, and assertions on the configuration chosen. Each test here fails under a mutation of the
selection code that takes another configuration (the closing note of the change lists them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_store

import probekit
from probekit.errors import ProbekitError
from probekit.probes import ProbeOptions, probe
from probekit.probes.grid import GridFit, best_head, train_grid
from probekit.probes.rows import Rows

CLASSES = ["a", "b", "c"]


def _clusters(rng: np.random.Generator, y: np.ndarray, spread: float, d: int = 8) -> np.ndarray:
    centres = np.eye(3, d) * 4.0
    return (centres[y] + rng.normal(0, spread, (len(y), d))).astype(np.float32)


def _planted(tmp_path: Path) -> Path:
    """Two features, each a cluster per class (and head/embed, noise). `layer2/mean` separates
    train and val cleanly (the validation winner) but its test rows sit in the next class's
    cluster (test top-1 near 0); `layer1/mean` is noisy on val (the loser there) and clean on
    test."""
    rng = np.random.default_rng(0)
    y = {s: np.tile(np.arange(3), n) for s, n in (("train", 60), ("val", 30), ("test", 30))}
    # the winner is wider than the others: methods that train features of one width together
    # (linear, MLP) choose across groups too
    winner = {s: _clusters(rng, y[s], 0.5, d=12) for s in ("train", "val")}
    winner["test"] = _clusters(rng, (y["test"] + 1) % 3, 0.5, d=12)
    decoy = {s: _clusters(rng, y[s], 0.5) for s in ("train", "test")}
    noisy = y["val"].copy()
    flip = rng.permutation(len(noisy))[: len(noisy) // 3]
    noisy[flip] = (noisy[flip] + 1) % 3  # a third of val in the wrong cluster
    decoy["val"] = _clusters(rng, noisy, 0.5)
    noise = {s: rng.normal(0, 1, (len(y[s]), 8)).astype(np.float32) for s in y}  # head/embed
    splits = {
        s: ({"layer1/mean": decoy[s], "layer2/mean": winner[s], "head/embed": noise[s]}, y[s])
        for s in y
    }
    return write_store(tmp_path / "planted.zarr", splits, CLASSES)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("linear", {"lrs": [1e-3, 0.1], "wds": [0.0], "epochs": 5}),
        ("logreg", {"cs": [1e-3, 1.0]}),
        ("mlp", {"mlp_lrs": [1e-2], "mlp_wds": [0.0], "mlp_widths": [16], "batch_size": 32}),
    ],
)
def test_the_validation_winner_is_chosen_though_worst_on_test(
    tmp_path: Path, method: str, options: dict[str, Any]
) -> None:
    path = _planted(tmp_path)
    res = probe(path, method=method, write=False, **options)
    val = {r.feature: r.value for r in res.records if r.metric == "val_top1"}
    assert val["layer2/mean"] > val["layer1/mean"]  # the planted winner, unique
    assert res.selected[method]["feature"] == "layer2/mean"
    assert res.value("top1", method=method, split="test") < 0.1  # worst on test, as planted
    # the decoy alone is the better test model: what a wrong choice would have reported
    other = probe(path, method=method, features="layer1/mean", write=False, **options)
    assert other.value("top1", method=method, split="test") > 0.9


def test_knn_chooses_feature_and_k_on_validation(tmp_path: Path) -> None:
    """Searched on the val split, kNN's choice (`select_knn`) is the planted winner's feature,
    at the smaller k among equal scores; tested, that choice is the worse test model."""
    from probekit.records import select_knn

    path = _planted(tmp_path)
    on_val = probekit.knn(path, ks=[1, 20], test_split="val", write=False)
    sel = [r for r in on_val.records if r.metric == "top1"]
    val = {(r.feature, r.hyper["k"]): r.value for r in sel}
    assert min(val[("layer2/mean", k)] for k in (1, 20)) > max(
        val[("layer1/mean", k)] for k in (1, 20)
    )
    chosen = select_knn(sel)
    assert (chosen.feature, chosen.hyper["k"]) == ("layer2/mean", 1)
    on_test = probekit.knn(path, ks=[1], write=False)
    test = {r.feature: r.value for r in on_test.records if r.metric == "top1"}
    assert test["layer2/mean"] < 0.1 < 0.9 < test["layer1/mean"]


def test_logreg_takes_the_c_of_the_best_validation_accuracy(tmp_path: Path) -> None:
    """C path [1e-4, 1e2] on one feature whose validation set is noisy where the small C's
    prediction (the class prior) is right: the val winner is C = 1e-4, recomputed here with
    scikit-learn; a choice of the last C of the path would be wrong."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    y_train = np.r_[np.zeros(120, int), np.ones(40, int), np.full(40, 2)]
    x_train = _clusters(rng, y_train, 1.0)
    y_val = np.r_[np.zeros(40, int), np.ones(10, int), np.full(10, 2)]
    x_val = _clusters(rng, (y_val + rng.integers(0, 3, len(y_val))) % 3, 1.0)  # scrambled
    y_test = np.tile(np.arange(3), 20)
    x_test = _clusters(rng, y_test, 1.0)
    path = write_store(
        tmp_path / "c.zarr",
        {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)},
        CLASSES,
    )
    cs = [1e-4, 1e2]
    res = probe(path, method="logreg", cs=cs, write=False)
    store = probekit.open_store(path)
    mean, std = x_train.mean(0), x_train.std(0)
    accs = []
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=5000).fit((x_train - mean) / std, y_train)
        accs.append(clf.score((x_val - mean) / std, y_val))
    assert accs[0] > accs[1]  # the planted winner, unique
    assert res.selected["logreg"]["C"] == cs[int(np.argmax(accs))] == 1e-4
    assert store.class_names == CLASSES
    # the large C separates the clean test clusters: the winner is the worse test model
    assert res.value("top1", method="logreg", split="test") < 0.5


class _Planted:
    """A stub `GridModel` of 1 x 3 heads whose validation scores after each epoch are given:
    its one parameter counts the steps taken (each head's value at its kept epoch tells which
    epoch was kept)."""

    def __init__(self, main: list[list[float]], tie: list[list[float]]):
        self.p = torch.zeros(1, 3)
        self.main, self.tie, self.epoch = np.array(main), np.array(tie), 0
        self.steps_per_epoch = 0

    def state(self) -> dict[str, torch.Tensor]:
        return {"p": self.p}

    def update(self, xb: torch.Tensor, yb: torch.Tensor, scale: float, step: int) -> None:
        self.p += 1

    def scores(self, rows: Rows, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        e = self.epoch
        self.epoch += 1
        return self.main[e][None], self.tie[e][None]


def test_the_grid_trainer_keeps_each_heads_best_validation_epoch() -> None:
    # head 0: best at epoch 2; head 1: equal main at epochs 1 and 3, tie-breaker picks 3;
    # head 2: equal everywhere: the first epoch
    main = [[0.5, 0.7, 0.4], [0.9, 0.6, 0.4], [0.8, 0.7, 0.4]]
    tie = [[0.0, -2.0, 0.0], [0.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
    model = _Planted(main, tie)
    rows = Rows.of(torch.zeros(4, 2))
    fit = train_grid(model, rows, torch.zeros(4, dtype=torch.long), epochs=3, batch_size=4,
                     seed=0, val=rows, y_val=torch.zeros(4, dtype=torch.long))  # fmt: skip
    assert fit.epoch.tolist() == [[2, 3, 1]]
    assert model.p.tolist() == [[2.0, 3.0, 1.0]]  # each head holds its kept epoch's weights
    assert fit.main.tolist() == [[0.9, 0.7, 0.4]]


def test_best_head_takes_main_score_then_tie_breaker_then_grid_order() -> None:
    main = np.array([[0.5, 0.9, 0.9], [0.9, 0.1, 0.2]])
    tie = np.array([[0.0, -0.3, -0.2], [-0.2, 0.0, 0.0]])
    assert best_head(main, tie) == (0, 2)  # 0.9 three times; -0.2 twice: the first in order
    assert best_head(main[1:], tie[1:]) == (0, 0)


def _fake_fit(main: np.ndarray, tie: np.ndarray) -> GridFit:
    return GridFit(np.ones(main.shape, int), main, tie)


def test_attentive_chooses_its_planted_validation_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attentive probe's choice over (layer, lr, wd) is the unique best validation
    accuracy: training replaced by planted scores, the grid's worst-loss head winning."""
    from probekit.probes import attentive

    ext = probekit.extract(
        "test_vit@random", "synthetic:24", tokens="all", layers="all", pool="cls", quiet=True
    )
    store = probekit.open_store(ext.store_path)
    n_layers = len(store.token_names)
    real = attentive.train_attentive_heads

    def planted(*args: Any, **kwargs: Any) -> attentive.AttentiveHeads:
        kwargs["epochs"] = 1
        heads = real(*args, **kwargs)
        acc = np.full(heads.val_acc.shape, 0.5)
        loss = np.full(heads.val_acc.shape, 0.1)
        acc[n_layers - 2, 1] = 0.9  # the winner: not the last layer, not the first config
        loss[n_layers - 2, 1] = 5.0  # and the worst loss of all
        acc[0, 0], loss[0, 0] = 0.9, 6.0  # the same accuracy with a worse loss
        heads.val_acc, heads.val_loss = acc, loss
        return heads

    monkeypatch.setattr(attentive, "train_attentive_heads", planted)
    res = probe(ext.store_path, method="attentive", attn_lrs=[1e-3], attn_wds=[0.0, 0.1],
                write=False)  # fmt: skip
    chosen = res.selected["attentive"]
    assert chosen["feature"] == store.token_names[n_layers - 2]
    assert (chosen["lr"], chosen["wd"]) == (1e-3, 0.1)
    assert chosen["val_top1"] == 0.9


@pytest.mark.filterwarnings("ignore:.*test classes have no train pixels")  # digit-scenes:24
def test_linseg_and_dense_knn_choose_their_planted_validation_winners(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from probekit.dense import knn as dense_knn
    from probekit.dense import linseg

    ext = probekit.extract(
        "test_vit@random", "digit-scenes:24", tokens="all", layers="all", pool="cls", quiet=True
    )
    store = probekit.open_store(ext.store_path)
    names = list(store.token_names)
    real = linseg.train_seg_heads
    calls: list[list[float]] = []

    def planted(*args: Any, **kwargs: Any) -> linseg.SegHeads:
        kwargs["epochs"] = 1
        heads = real(*args, **kwargs)
        miou = np.full(heads.val_miou.shape, 0.2)
        pix = np.full(heads.val_miou.shape, 0.5)
        if not kwargs.get("concat"):
            miou[1, 2] = 0.6  # layer 1, config (lr 2, wd 1): the winner, with a worse pixel acc
            pix[1, 2] = 0.1
            miou[0, 0], pix[0, 0] = 0.6 - 1e-9, 0.9  # close, but lower mIoU
        calls.append(miou.ravel().tolist())
        heads.val_miou, heads.val_acc = miou, pix
        return heads

    monkeypatch.setattr(linseg, "train_seg_heads", planted)
    res = probe(ext.store_path, method="linseg", seg_lrs=[1e-3, 1e-2], seg_wds=[0.0, 1e-2],
                write=False)  # fmt: skip
    chosen = res.selected["linseg"]
    assert chosen["feature"] == names[1] and (chosen["lr"], chosen["wd"]) == (1e-2, 0.0)
    assert calls

    real_conf = dense_knn._confusions

    def planted_conf(data: Any, split: str, rows: np.ndarray, name: str, bank: Any,
                     ks: list[int]) -> dict[int, np.ndarray]:  # fmt: skip
        out = real_conf(data, split, rows, name, bank, ks)
        if split != data.val_split:
            return out
        c = data.n_classes
        for k in ks:  # layer 2 at the middle k: a perfect diagonal; all else a bad guess
            good = name == names[2] and k == sorted(ks)[1]
            cm = np.eye(c, dtype=np.int64) * 10 if good else np.ones((c, c), np.int64)
            out[k] = np.repeat(cm[None], len(rows), 0)
        return out

    monkeypatch.setattr(dense_knn, "_confusions", planted_conf)
    res = probe(ext.store_path, method="dense-knn", dense_ks=[1, 3, 5], write=False)
    chosen = res.selected["dense-knn"]
    assert chosen["feature"] == names[2] and chosen["k"] == 3


def test_a_probe_is_not_tested_on_another_backbones_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(3), 20)
    splits = {s: ({"head/embed": _clusters(rng, y, 0.5)}, y) for s in ("train", "test")}
    a = write_store(tmp_path / "a.zarr", splits, CLASSES, backbone="model_a")
    b = write_store(tmp_path / "b.zarr", splits, CLASSES, backbone="model_b")
    same = write_store(tmp_path / "a2.zarr", splits, CLASSES, backbone="model_a")
    ok = probe(a, method="logreg", cs=[1.0], eval_on=[same], write=False)
    assert {r.dataset for r in ok.records if r.metric == "top1"}
    with pytest.raises(ProbekitError, match=r"same .*backbone"):
        probe(a, method="logreg", cs=[1.0], eval_on=[b], write=False)


def test_method_options_by_flat_name_reach_their_method() -> None:
    opts = ProbeOptions.of(method="attentive,mlp", attn_lrs=[1e-2], mlp_widths="8,4", cs=[2.0])
    assert opts.of_method("attentive").lrs == (1e-2,)  # type: ignore[attr-defined]
    assert opts.of_method("mlp").widths == (4, 8)  # type: ignore[attr-defined]
    assert opts.of_method("logreg").cs == (2.0,)  # type: ignore[attr-defined]
    assert opts.of_method("linear").lrs == probekit.probes.DEFAULT_LRS  # type: ignore[attr-defined]
    changed = ProbeOptions.of(opts, attn_wds=[0.5])
    assert changed.of_method("attentive").lrs == (1e-2,)  # type: ignore[attr-defined]
    assert changed.to_dict() != opts.to_dict()  # another record file
    with pytest.raises(ProbekitError, match="attn_lrs"):
        ProbeOptions.of(attn_lrs=[-1.0])
    with pytest.raises(ProbekitError, match="Did you mean attn_lrs"):
        ProbeOptions.of(attn_lr=[1.0])


def test_fewshot_episodes_choose_on_validation_and_run_any_pooled_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each episode's k is its validation winner (planted: k = 3 in episode 0, k = 1 in
    episode 1, ties to the smaller k); the MLP probe runs as a few-shot method unedited."""
    import importlib

    fs = importlib.import_module("probekit.fewshot")
    path = _planted(tmp_path)
    real = fs._knn_top1
    planted = torch.tensor([[0.2, 0.9, 0.9, 0.1], [0.8, 0.5, 0.8, 0.8]], dtype=torch.float64)
    seen: list[int] = []

    def knn_top1(support: Any, y: Any, queries: Any, q_y: Any, ks: list[int]) -> torch.Tensor:
        out = real(support, y, queries, q_y, ks)
        seen.append(len(q_y))
        return planted[:, : len(ks)] if len(seen) % 2 == 1 else out  # the validation pass

    monkeypatch.setattr(fs, "_knn_top1", knn_top1)
    res = fs.fewshot(path, shots=[5], episodes=2, methods="knn,mlp", feature="layer2/mean",
                     write=False)  # fmt: skip
    knn = next(r for r in res.records if r.method == "knn")
    assert [c["k"] for c in knn.extra["chosen"]] == [3, 1]
    mlp = next(r for r in res.records if r.method == "mlp")
    assert len(mlp.extra["chosen"]) == 2 and {"lr", "wd", "width"} <= set(mlp.extra["chosen"][0])
    assert mlp.value < 0.2  # layer2/mean's test rows are planted in the wrong clusters
