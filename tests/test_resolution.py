"""One evaluation resolution per triage, the cost of every backbone counted on the model, and
resolution sweeps."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.data import create_transform
from typer.testing import CliRunner

import probekit
from probekit.backbones import create_backbone
from probekit.backbones.cost import count_gmacs
from probekit.cli import app
from probekit.errors import OptionError
from probekit.report.compute import pareto_front
from probekit.triaging.plan import parse_sizes

SMALL = {"num_workers": 0, "quiet": True}

# half of FlopCounterMode's count with timm's fused attention off, in a fresh process where
# TIMM_FUSED_ATTN=0 is read at import: the independent reference
REFERENCE = """
import json, sys, timm, torch
from torch.utils.flop_counter import FlopCounterMode
out = {}
for name, size in json.loads(sys.argv[1]):
    with torch.device("meta"):
        model = timm.create_model(name, img_size=size) if "vit" in name else timm.create_model(name)
        with FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, 3, size, size))
    out[f"{name}@{size}"] = fc.get_total_flops() / 2e9
print(json.dumps(out))
"""


def test_gmacs_match_flop_counter_and_timm_tables() -> None:
    cases = [
        ("vit_small_patch16_224", 224, 4.60),
        ("convnext_tiny", 224, 4.45),
        ("resnet50", 224, 4.09),
        ("vit_small_patch14_dinov2", 224, None),
        ("vit_small_patch14_dinov2", 518, None),
    ]
    env = {**os.environ, "TIMM_FUSED_ATTN": "0"}
    got = subprocess.run(
        [sys.executable, "-c", REFERENCE, json.dumps([[n, s] for n, s, _ in cases])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    reference = json.loads(got.stdout)
    ours = {}
    for name, size, table in cases:
        bb = create_backbone(name, random_init=True, img_size=size, load=False)
        ours[f"{name}@{size}"] = g = count_gmacs(bb.model, (size, size))
        assert g == pytest.approx(reference[f"{name}@{size}"], rel=0.05)
        if table is not None:
            assert g == pytest.approx(table, rel=0.05)
    # a ViT's cost grows with its token count (attention faster than linearly)
    small, big = ours["vit_small_patch14_dinov2@224"], ours["vit_small_patch14_dinov2@518"]
    tokens = (37 * 37 + 1) / (16 * 16 + 1)
    assert big / small > tokens * 0.95 and big > 40


def test_fused_attention_is_counted_and_restored() -> None:
    bb = create_backbone("vit_small_patch16_224", random_init=True, load=False)
    fused = [m.fused_attn for m in bb.model.modules() if hasattr(m, "fused_attn")]
    count_gmacs(bb.model, (224, 224))
    assert [m.fused_attn for m in bb.model.modules() if hasattr(m, "fused_attn")] == fused


def test_features_at_224_equal_timm_dynamic_size_forward() -> None:
    """A DINOv2 ViT-S/14 (pretrained at 518 px) extracted at 224 px: its features equal timm's
    own forward at 224 with `dynamic_img_size` (position embeddings resampled on the fly)."""
    res = probekit.extract(
        "vit_small_patch14_dinov2@random",
        "synthetic:2",
        img_size=224,
        layers="last",
        pool="cls",
        dtype="float32",
        **SMALL,
    )
    store = probekit.open_store(res.store_path)
    pre = store.info.preprocessing
    assert list(pre["input_size"]) == [3, 224, 224] and pre["crop_pct"] == 0.875
    torch.manual_seed(0)  # the seeded random init probekit gives NAME@random
    ref = timm.create_model("vit_small_patch14_dinov2", dynamic_img_size=True).eval()
    transform = create_transform(**pre, is_training=False)
    ds = probekit.load_dataset("synthetic:2")
    x = torch.stack([transform(ds.load_image("test", i)) for i in range(len(ds.splits["test"]))])
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True).numpy()
    got = store.features("test", "head/embed")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    cost = store.info.raw["cost"]
    assert cost["img_size"] == 224 and cost["native_size"] == 518
    assert cost["gmacs"] == pytest.approx(6.12, rel=0.02)
    # counted on the model as evaluated: its position embeddings for 16 x 16 patches
    at_224 = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0)
    assert cost["params_m"] == pytest.approx(sum(p.numel() for p in at_224.parameters()) / 1e6)


def _sizes(result: probekit.TriageResult) -> dict[str, tuple[int, int]]:
    return {
        r.model: (r.extra["img_size"], r.extra["native_size"])
        for r in result.records
        if r.kind == "extract"
    }


def test_triage_evaluates_at_224_by_default_and_native_on_request(tmp_path: Path) -> None:
    kw = {"methods": "knn", "ks": [1], "plots": False, "quiet": True, "log": None}
    default = probekit.triage("test_vit2@random", "synthetic:2", out=tmp_path / "a", **kw)
    assert _sizes(default) == {"test_vit2@random": (224, 160)}  # a register-token ViT at 160
    store = next(r.extra["store"] for r in default.records if r.kind == "extract")
    assert probekit.open_store(store).info.preprocessing["input_size"] == [3, 224, 224]
    native = probekit.triage(
        "test_vit2@random", "synthetic:2", img_size="native", out=tmp_path / "b", **kw
    )
    assert _sizes(native) == {"test_vit2@random": (160, 160)}
    md = (tmp_path / "a" / "report.md").read_text()
    assert "test_vit2@random (224px, pretrained 160px)" in md  # beside the entry
    assert "## Cost and resolution" in md
    assert "test_vit2@random (" not in (tmp_path / "b" / "report.md").read_text()
    with (tmp_path / "a" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["img_size"] == "224" for r in rows)
    assert all(float(r["gmacs"]) > 0 and float(r["params_m"]) > 0 for r in rows)
    assert all(float(r["images_per_s"]) > 0 for r in rows)


def test_resolution_sweep_runs_every_backbone_at_each_size(tmp_path: Path) -> None:
    result = probekit.triage(
        "test_vit@random,test_resnet@random",
        "synthetic:2",
        img_size="64,96",
        methods="knn",
        ks=[1],
        out=tmp_path / "sweep",
        quiet=True,
        log=None,
    )
    sizes = _sizes(result)
    assert sizes == {
        "test_vit@random @64px": (64, 160),
        "test_resnet@random @64px": (64, 160),
        "test_vit@random @96px": (96, 160),
        "test_resnet@random @96px": (96, 160),
    }
    stores = {r.extra["store"] for r in result.records if r.kind == "extract"}
    assert len(stores) == 4  # stores keyed by size
    gmacs = {m: c["gmacs"] for m, c in result.report.costs.items()}
    assert gmacs["test_vit@random @96px"] > gmacs["test_vit@random @64px"]
    assert (tmp_path / "sweep" / "resolution.png").is_file()
    assert (tmp_path / "sweep" / "cost.png").is_file()


def test_parse_sizes() -> None:
    assert parse_sizes(224) == (224,)
    assert parse_sizes("native") == (None,)
    assert parse_sizes("224, 336,448") == (224, 336, 448)
    assert parse_sizes([224, "native"]) == (224, None)
    for bad in ("0", "big", "224,224", ""):
        with pytest.raises(OptionError):
            parse_sizes(bad)
    result = CliRunner().invoke(
        app, ["triage", "-b", "test_vit@random", "-d", "synthetic:2", "--img-size", "abc"]
    )
    assert result.exit_code == 1 and "img_size 'abc'" in result.output


def test_pareto_front() -> None:
    points = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (4.0, 0.9), (2.0, 0.7)]
    assert pareto_front(points) == [0, 1, 4, 3]  # (3, 0.6) is beaten by (2, 0.7)
    rng = np.random.default_rng(0)
    pts = [(float(c), float(a)) for c, a in rng.random((40, 2))]
    front = set(pareto_front(pts))
    for i, (c, a) in enumerate(pts):  # brute force: on the front iff nothing dominates it
        dominated = any(c2 <= c and a2 >= a and (c2, a2) != (c, a) for c2, a2 in pts)
        assert (i in front) == (not dominated)


def test_model_that_cannot_take_the_size_is_one_line() -> None:
    with pytest.raises(OptionError, match="multiple of 16"):
        probekit.triage("test_vit@random", "synthetic:2", img_size=100, log=None)
