"""Shared fixtures: a private cache per test, generated image folders, tiny timm models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache root and an empty, offline Hugging Face cache."""
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    torch.set_num_threads(2)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def make_image(rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """PATH/<split>/<class>/<image>: 2 classes, train 6 + test 4 images, mixed sizes/formats."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                make_image(rng, (40 + 7 * i, 36 + 5 * i)).save(
                    d / f"{i}.{'png' if i % 2 else 'jpg'}"
                )
    return root
