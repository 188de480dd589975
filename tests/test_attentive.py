"""Attentive probes: the batched grid equals probes trained one by one, the pooling equals
torch.nn.MultiheadAttention, and on images whose class is *where* an object sits (mean pooling
loses it) the attentive probe beats linear heads on the mean by a margin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import probekit
from probekit.errors import ProbekitError
from probekit.probes.attentive import AttentiveHeads, _init, train_attentive_heads


def _random_tokens(n: int, t: int, d: int, c: int, layers: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, n, t, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen)
    x[:, torch.arange(n), y % t] += 2.0  # a token that says the class
    return x.reshape(layers, n, t * d), y


def test_batched_probes_equal_probes_trained_one_by_one() -> None:
    t, d, c = 6, 8, 3
    x, y = _random_tokens(60, t, d, c, layers=2)
    xv, yv = _random_tokens(30, t, d, c, layers=2, seed=1)
    lrs, wds = (1e-3, 3e-3), (0.0, 0.1)
    kw = {
        "queries": 2,
        "heads": 2,
        "epochs": 3,
        "batch_size": 16,
        "seed": 5,
        "dtype": torch.float64,
    }
    grid = train_attentive_heads(x, y, c, (t, d), lrs, wds, x_val=xv, y_val=yv, **kw)
    for li in range(2):
        for hi, (lr, wd) in enumerate((a, b) for a in lrs for b in wds):
            alone = train_attentive_heads(
                x[li : li + 1], y, c, (t, d), (lr,), (wd,), x_val=xv[li : li + 1], y_val=yv, **kw
            )
            assert alone.epoch[0, 0] == grid.epoch[li, hi]
            assert alone.val_acc[0, 0] == grid.val_acc[li, hi]
            for name, p in alone.params.items():
                torch.testing.assert_close(
                    p[0, 0], grid.params[name][li, hi], rtol=1e-9, atol=1e-10
                )
    # the probes learned something different from their start (the check can fail)
    start = _init(2, 4, t, d, c, 2, True, 5, torch.float64, torch.device("cpu"))
    assert not torch.allclose(start["wc"], grid.params["wc"])


@pytest.mark.parametrize("position", [True, False])
def test_pooling_equals_torch_multihead_attention(position: bool) -> None:
    torch.manual_seed(0)
    b, t, d, nh, q, c = 5, 7, 12, 3, 2, 4
    params = _init(1, 1, t, d, c, q, position, 3, torch.float64, torch.device("cpu"))
    with torch.no_grad():
        for v in params.values():  # random weights everywhere (biases and position too)
            v.normal_()
    heads = AttentiveHeads(params, nh, np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)))
    x = torch.randn(1, b, t, d, dtype=torch.float64)
    got = heads.pooled(x)[0, 0]  # (B, Q, D)
    mha = torch.nn.MultiheadAttention(d, nh, batch_first=True, dtype=torch.float64)
    p = {k: v[0, 0].detach() for k, v in params.items()}
    with torch.no_grad():
        bk = torch.randn(d, dtype=torch.float64)  # a key bias: it drops out of the softmax
        mha.in_proj_weight.copy_(torch.cat([p["wq"], p["wk"], p["wv"]]))
        mha.in_proj_bias.copy_(torch.cat([p["bq"], bk, p["bv"]]))
        mha.out_proj.weight.copy_(p["wo"])
        mha.out_proj.bias.copy_(p["bo"])
        xn = torch.nn.functional.layer_norm(x[0], (d,))
        key = xn + p["pos"] if position else xn
        want, _ = mha(p["query"].expand(b, q, d), key, xn, need_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    logits = heads.logits(x)[0, 0]
    torch.testing.assert_close(logits, want.mean(1) @ p["wc"] + p["bc"], rtol=1e-10, atol=1e-10)


def _where_images(root: Path, seed: int = 0) -> str:
    """4 classes: the quadrant a bright square sits in (on noise); the same objects anywhere."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 48), ("test", 24)):
        for c in range(4):
            d = root / split / f"quadrant{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(96, 96, 3), dtype=np.uint8)
                y0, x0 = (c // 2) * 48, (c % 2) * 48
                s = int(rng.integers(14, 22))
                oy, ox = rng.integers(4, 48 - s - 4, size=2)
                img[y0 + oy : y0 + oy + s, x0 + ox : x0 + ox + s] = rng.integers(180, 256, size=3)
                Image.fromarray(img).save(d / f"{i}.png")
    return f"imagefolder:{root}"


def test_attentive_beats_linear_on_mean_where_position_is_the_class(tmp_path: Path) -> None:
    spec = _where_images(tmp_path / "where")
    res = probekit.extract(
        "test_resnet",
        spec,
        random_init=True,
        layers="last2",
        pool="mean",
        tokens="all",
        img_size=96,
        num_workers=0,
        quiet=True,
    )
    att = probekit.probe(res.store_path, method="attentive", epochs=30)
    lin = probekit.probe(res.store_path, method="linear", epochs=30)
    a = att.value("top1", method="attentive", split="test")
    m = lin.value("top1", method="linear", split="test")
    assert a >= 0.9 and a - m >= 0.2, (a, m)
    rec = next(r for r in att.records if r.metric == "top1" and r.split == "test")
    assert rec.method == "attentive" and rec.feature.endswith("/tokens")
    assert {"lr", "wd", "queries", "epoch"} <= set(rec.hyper)


def test_attentive_on_a_store_without_tokens_says_how_to_make_them() -> None:
    res = probekit.extract("test_vit", "synthetic:16", random_init=True, num_workers=0, quiet=True)
    with pytest.raises(ProbekitError, match=r"no token arrays.*--tokens all"):
        probekit.probe(res.store_path, method="attentive")
    both = probekit.probe(res.store_path)  # "both": the pooled probes, tokens not needed
    assert set(both.selected) == {"linear", "logreg"}


def test_a_diverging_probe_is_said_and_never_chosen() -> None:
    """lr 1e9 sends the loss to NaN: alone, a one-line error that says it diverged; beside a
    sane lr, never the chosen head (its accuracy is argmax of NaN logits)."""
    ext = probekit.extract(
        "test_vit@random", "synthetic:24", tokens="all", layers="last", pool="cls", quiet=True
    )
    opts = {"method": "attentive", "attn_wds": [0.0], "epochs": 3, "write": False}
    with pytest.raises(ProbekitError, match="diverged at every configuration") as e:
        probekit.probe(ext.store_path, attn_lrs=[1e9], **opts)
    assert "\n" not in str(e.value)
    res = probekit.probe(ext.store_path, attn_lrs=[1e9, 1e-3], **opts)
    assert res.selected["attentive"]["lr"] == 1e-3
