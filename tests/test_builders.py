"""Backbones a Python function builds: decided before building (identity, size), built at most
once for an extraction, never for a cache hit, and in a triage at 224 px run where the function
takes a size and reported with the reason where it does not."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import probekit
from probekit.backbones import builders

SIZED = """
import timm, torch
def build(img_size=64):
    torch.manual_seed(3)
    return timm.create_model("test_vit", img_size=img_size)
def fixed():
    torch.manual_seed(3)
    return timm.create_model("test_resnet")
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "sized_builders.py").write_text(SIZED)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.setattr(builders, "builds", [])
    monkeypatch.setattr(builders, "_LAST", {})
    yield "sized_builders"
    sys.modules.pop("sized_builders", None)


def test_an_extraction_builds_once_and_a_cache_hit_builds_nothing(
    user_module: str, cache_dir: Path
) -> None:
    spec = f"{user_module}:build"
    first = probekit.extract(spec, "synthetic:4", img_size=32, pool="mean", quiet=True)
    assert builders.builds == [spec]  # the plan's skeleton is the model extracted
    builders._LAST.clear()  # a new process: nothing built in memory
    again = probekit.extract(spec, "synthetic:4", img_size=32, pool="mean", quiet=True)
    assert again.store_path == first.store_path and builders.builds == [spec]  # its card
    store = probekit.open_store(first.store_path)
    assert store.info.weights_source == "python"
    # the store's cost is the card's, counted once when the model was built
    (card,) = [json.loads(p.read_text()) for p in cache_dir.glob(".builders/*.json")]
    assert store.meta["cost"]["gmacs"] == card["gmacs"] is not None
    assert store.meta["config"]["preprocessing"]["input_size"] == [3, 32, 32]
    # the features are the function's model's own at that size
    import timm
    import torch

    torch.manual_seed(3)
    ref = timm.create_model("test_vit", img_size=32).eval()
    x = torch.rand(1, 3, 32, 32)
    built = probekit.create_backbone(spec, img_size=32)
    with torch.no_grad():
        np.testing.assert_allclose(
            built.model.forward_features(x).numpy(), ref.forward_features(x).numpy(), rtol=1e-6
        )


def test_identity_is_the_module_file_not_a_build(user_module: str, tmp_path: Path) -> None:
    a = builders.BuilderCall.resolve(f"{user_module}:build")
    b = builders.BuilderCall.resolve(f"{user_module}:fixed")
    assert a.digest != b.digest and builders.builds == []
    assert a.takes_size and not b.takes_size


def test_a_triage_at_224_runs_builders_that_take_a_size_and_says_why_not_others(
    user_module: str, tmp_path: Path
) -> None:
    res = probekit.triage(
        [f"{user_module}:build", f"{user_module}:fixed", "test_resnet@random"],
        ["synthetic:4"],
        methods="knn",
        layers="last",
        img_size=224,
        out=tmp_path / "rep",
        cache_dir=tmp_path / "cache",
        quiet=True,
        log=None,
    )
    cells = {r.model for r in res.report.records if r.kind == "knn" and r.metric == "top1"}
    assert f"{user_module}:build" in cells and "test_resnet@random" in cells
    errors = [r for r in res.report.records if r.kind == "error" and r.extra["stage"] == "extract"]
    assert [r.model for r in errors] == [f"{user_module}:fixed"]
    assert "own input size" in errors[0].extra["message"]
    assert "--img-size native" in errors[0].extra["message"]
    assert builders.builds.count(f"{user_module}:build") == 1  # plan checks build nothing


def test_a_backbones_source_is_decided_by_its_name_before_anything_loads(
    user_module: str,
) -> None:
    from probekit.backbones.sources import source_of

    assert source_of(f"{user_module}:build").kind == "python"
    assert source_of("stable_diffusion_v1_5").kind == "builder"
    assert source_of("test_vit").kind == "timm" and source_of("dino_vits16").kind == "timm"
    src = source_of(f"{user_module}:fixed")
    assert src.identity(f"{user_module}:fixed", None).source == "python"
    assert not src.takes_size(f"{user_module}:fixed") and builders.builds == []
    assert source_of("test_vit").identity("test_vit", None) == (
        probekit.create_backbone("test_vit", load=False).weights
    )
