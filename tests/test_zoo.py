"""The backbone zoo: Battle of the Backbones aliases, and loaders for checkpoints timm does not
host, each tested on a checkpoint written in its original key format from random tensors."""

from __future__ import annotations

import importlib
import json
import socket
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import hide_modules
from typer.testing import CliRunner

from probekit.backbones import (
    ALIASES,
    EXTRA_MODULES,
    GROUPS,
    create_backbone,
    list_backbones,
)
from probekit.cli import app
from probekit.errors import BackboneError, WeightsError
from probekit.loaders import LOADERS

runner = CliRunner()

# the models of Battle of the Backbones that probekit must reach by one alias
BOB = {
    "resnet50", "resnet101", "convnext_tiny", "convnext_small", "convnext_base",
    "convnext_tiny_in22k", "convnext_small_in22k", "convnext_base_in22k", "swinv2_tiny_bob",
    "swinv2_base_bob", "swinv2_base_in22k_ft1k", "vit_s16_in1k", "vit_b16_in1k",
    "vit_l16_in21k_ft1k", "vit_s16_in21k", "vit_b16_in21k", "vit_l16_in21k", "efficientnet_b0",
    "dino_vits16", "dino_vitb16", "mae_vitb16", "mae_vitl16", "clip_vitb16",
    "clip_laion2b_vitb16", "clip_laion2b_vitl14", "clip_resnet50", "clip_resnet101",
    "mocov3_vits16", "mocov3_vitb16", "mocov3_resnet50", "vicreg_resnet50",
    "vicregl_convnext_base", "dino_resnet50", "midas31_swinv2_tiny", "midas31_swinv2_base",
    "stable_diffusion_v1_5",
}  # fmt: skip
NEWER = {"dinov2_vits14", "dinov2_vitb14_reg", "dinov3_vitb16", "eva02_base", "siglip_vitb16"}


def test_every_alias_resolves_to_a_timm_tag_or_a_registered_loader() -> None:
    pretrained, archs = set(timm.list_models(pretrained=True)), set(timm.list_models())
    assert set(ALIASES) >= BOB | NEWER
    assert {a for a, row in ALIASES.items() if row.bob} == BOB
    for row in ALIASES.values():
        assert row.group in GROUPS, row
        if row.builder is not None:  # probekit's own non-timm model: module:function exists
            module, _, func = row.builder.partition(":")
            assert callable(getattr(importlib.import_module(module), func)), row
        elif row.loader is not None:
            assert row.loader in LOADERS and LOADERS[row.loader].arch == row.timm_name, row
            assert row.timm_name in archs and LOADERS[row.loader].url.startswith("https://"), row
        elif row.package is not None:
            assert row.timm_name in archs, row
        else:
            assert row.timm_name in pretrained, row


def test_backbones_bob_lists_availability_and_params() -> None:
    res = runner.invoke(app, ["backbones", "--bob", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {r["alias"] for r in rows} == BOB and all(r["bob"] for r in rows)
    assert {r["availability"] for r in rows} == {"timm-hosted", "loader", "needs extra [sd]"}
    assert all(r["params_m"] > 1 for r in rows)
    by = {r["alias"]: r for r in rows}
    assert by["mocov3_vits16"]["params_m"] == pytest.approx(21.7, abs=0.1)  # 12-head ViT-S
    assert by["vit_l16_in21k"]["params_m"] > 300
    table = runner.invoke(app, ["backbones", "--bob"])
    assert "availability" in table.output and "loader" in table.output
    ssl = list_backbones(group="ssl")
    assert ssl and {r.group for r in ssl} == {"ssl"} and "dinov2_vits14" in {r.alias for r in ssl}
    rand = list_backbones(group="random", with_params=False)
    assert rand and all(r.alias.endswith("@random") and r.weights == "random-init" for r in rand)
    with pytest.raises(BackboneError, match="unknown group"):
        list_backbones(group="nope")


def _randomize(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in sd.items()
    }


def _check(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor of the model came from the checkpoint entry it should have."""
    own = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    assert params <= set(expected), sorted(params - set(expected))[:5]
    for k, v in expected.items():
        assert torch.equal(own[k], v), k


def _save(tmp_path: Path, name: str, obj: object) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("alias", "prefix", "wrap"),
    [
        ("mocov3_resnet50", "module.base_encoder.", True),
        ("vicreg_resnet50", "", False),
        ("dino_resnet50", "", False),
    ],
)
def test_resnet50_loaders(tmp_path: Path, alias: str, prefix: str, wrap: bool) -> None:
    """The original ResNet-50 checkpoints use torchvision's key names (the test takes them from
    torchvision itself); timm's ResNet-50 shares them."""
    tv = _randomize(torchvision.models.resnet50(weights=None).state_dict(), 1)
    backbone = {k: v for k, v in tv.items() if not k.startswith("fc.")}
    ckpt = {prefix + k: v for k, v in backbone.items()}
    if wrap:  # MoCo v3: projection MLP in fc, a momentum encoder and a predictor, all dropped
        ckpt[prefix + "fc.0.weight"] = torch.randn(4096, 2048)
        ckpt["module.momentum_encoder.conv1.weight"] = torch.randn(64, 3, 7, 7)
        ckpt["module.predictor.0.weight"] = torch.randn(4096, 256)
        obj: object = {"epoch": 1000, "arch": "resnet50", "state_dict": ckpt}
    else:
        obj = ckpt
    bb = create_backbone(alias, weights=_save(tmp_path, "w.pth", obj))
    _check(bb.model, backbone)
    x = torch.randn(1, 3, 224, 224)
    assert bb.model.forward_features(x).shape == (1, 2048, 7, 7)
    assert bb.model(x).shape == (1, 2048)  # no classifier


def moco_vit_keys(dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """MoCo v3 `vits.py` ViT-S/16 and ViT-B/16 (12 blocks, 12 heads, MLP 4x), the keys under
    module.base_encoder."""
    block = [
        ("norm1.weight", (dim,)),
        ("norm1.bias", (dim,)),
        ("attn.qkv.weight", (3 * dim, dim)),
        ("attn.qkv.bias", (3 * dim,)),
        ("attn.proj.weight", (dim, dim)),
        ("attn.proj.bias", (dim,)),
        ("norm2.weight", (dim,)),
        ("norm2.bias", (dim,)),
        ("mlp.fc1.weight", (4 * dim, dim)),
        ("mlp.fc1.bias", (4 * dim,)),
        ("mlp.fc2.weight", (dim, 4 * dim)),
        ("mlp.fc2.bias", (dim,)),
    ]
    return [
        ("cls_token", (1, 1, dim)),
        ("pos_embed", (1, 197, dim)),
        ("patch_embed.proj.weight", (dim, 3, 16, 16)),
        ("patch_embed.proj.bias", (dim,)),
        *[(f"blocks.{i}.{name}", shape) for i in range(12) for name, shape in block],
        ("norm.weight", (dim,)),
        ("norm.bias", (dim,)),
    ]


@pytest.mark.parametrize(("alias", "dim"), [("mocov3_vits16", 384), ("mocov3_vitb16", 768)])
def test_mocov3_vit_loader(tmp_path: Path, alias: str, dim: int) -> None:
    g = torch.Generator().manual_seed(2)
    backbone = {k: torch.randn(shape, generator=g) for k, shape in moco_vit_keys(dim)}
    ckpt = {f"module.base_encoder.{k}": v for k, v in backbone.items()}
    ckpt |= {f"module.momentum_encoder.{k}": v + 1 for k, v in backbone.items()}
    ckpt |= {  # the projection head (Linear, BN, ReLU, Linear, BN, ReLU, Linear, BN)
        "module.base_encoder.head.0.weight": torch.randn(4096, dim),
        "module.base_encoder.head.1.weight": torch.randn(4096),
        "module.base_encoder.head.6.weight": torch.randn(256, 4096),
        "module.predictor.0.weight": torch.randn(4096, 256),
    }
    path = _save(tmp_path, "vit-300ep.pth.tar", {"epoch": 300, "state_dict": ckpt})
    bb = create_backbone(alias, weights=path)
    _check(bb.model, backbone)
    assert bb.model.blocks[0].attn.num_heads == 12  # ViT-S too: MoCo v3's, not timm's 6 heads
    x = torch.randn(2, 3, 224, 224)
    assert bb.model.forward_features(x).shape == (2, 197, dim)
    assert bb.model(x).shape == (2, dim)
    part = {"module.base_encoder.cls_token": backbone["cls_token"]}
    bad = _save(tmp_path, "bad.pth", {"state_dict": part})
    with pytest.raises(WeightsError, match="does not have the facebookresearch/moco-v3 format"):
        create_backbone(alias, weights=bad)


def test_vicregl_convnext_loader(tmp_path: Path) -> None:
    """The original ConvNeXt keys (VICRegL's convnext.py: no layer scale, final LayerNorm)."""
    depths, dims = (3, 3, 27, 3), (128, 256, 512, 1024)
    g = torch.Generator().manual_seed(3)
    ckpt: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}

    def put(orig: str, timm_key: str, shape: tuple[int, ...]) -> None:
        ckpt[orig] = expected[timm_key] = torch.randn(shape, generator=g)

    put("downsample_layers.0.0.weight", "stem.0.weight", (128, 3, 4, 4))
    put("downsample_layers.0.0.bias", "stem.0.bias", (128,))
    put("downsample_layers.0.1.weight", "stem.1.weight", (128,))
    put("downsample_layers.0.1.bias", "stem.1.bias", (128,))
    for i in range(1, 4):
        put(f"downsample_layers.{i}.0.weight", f"stages.{i}.downsample.0.weight", (dims[i - 1],))
        put(f"downsample_layers.{i}.0.bias", f"stages.{i}.downsample.0.bias", (dims[i - 1],))
        put(
            f"downsample_layers.{i}.1.weight",
            f"stages.{i}.downsample.1.weight",
            (dims[i], dims[i - 1], 2, 2),
        )
        put(f"downsample_layers.{i}.1.bias", f"stages.{i}.downsample.1.bias", (dims[i],))
    for i, (depth, d) in enumerate(zip(depths, dims, strict=True)):
        for j in range(depth):
            o, t = f"stages.{i}.{j}", f"stages.{i}.blocks.{j}"
            put(f"{o}.dwconv.weight", f"{t}.conv_dw.weight", (d, 1, 7, 7))
            put(f"{o}.dwconv.bias", f"{t}.conv_dw.bias", (d,))
            put(f"{o}.norm.weight", f"{t}.norm.weight", (d,))
            put(f"{o}.norm.bias", f"{t}.norm.bias", (d,))
            put(f"{o}.pwconv1.weight", f"{t}.mlp.fc1.weight", (4 * d, d))
            put(f"{o}.pwconv1.bias", f"{t}.mlp.fc1.bias", (4 * d,))
            put(f"{o}.pwconv2.weight", f"{t}.mlp.fc2.weight", (d, 4 * d))
            put(f"{o}.pwconv2.bias", f"{t}.mlp.fc2.bias", (d,))
    put("norm.weight", "head.norm.weight", (1024,))
    put("norm.bias", "head.norm.bias", (1024,))
    for i, (depth, d) in enumerate(zip(depths, dims, strict=True)):  # no layer scale: ones
        expected |= {f"stages.{i}.blocks.{j}.gamma": torch.ones(d) for j in range(depth)}
    bb = create_backbone("vicregl_convnext_base", weights=_save(tmp_path, "cnx.pth", ckpt))
    _check(bb.model, expected)
    x = torch.randn(1, 3, 224, 224)
    assert bb.model.forward_features(x).shape == (1, 1024, 7, 7)
    assert bb.model(x).shape == (1, 1024)


@pytest.mark.parametrize(
    ("alias", "size", "dim"),
    [
        ("midas31_swinv2_tiny", 256, 768),
        ("midas31_swinv2_base", 384, 1024),
        pytest.param("midas31_swinv2_large", 384, 1536, marks=pytest.mark.slow),
    ],
)
def test_midas_swinv2_loader(tmp_path: Path, alias: str, size: int, dim: int) -> None:
    """MiDaS v3.1 holds timm 0.6's SwinV2 (patch merging at the end of a stage) under
    pretrained.model., next to the DPT decoder."""
    ref = timm.create_model(LOADERS[alias].arch, num_classes=0)
    expected = _randomize(ref.state_dict(), 4)
    ckpt: dict[str, torch.Tensor] = {}
    for k, v in expected.items():
        parts = k.split(".")
        if k.startswith("layers.") and parts[2] == "downsample":  # old layout: end of stage i-1
            parts[1] = str(int(parts[1]) - 1)
        ckpt["pretrained.model." + ".".join(parts)] = v
    ckpt["pretrained.model.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(
        256, 256, dtype=torch.long
    )
    ckpt["pretrained.model.head.weight"] = torch.randn(1000, dim)
    ckpt["scratch.output_conv.0.weight"] = torch.randn(128, 256, 3, 3)
    ckpt["pretrained.act_postprocess1.0.weight"] = torch.randn(96, 96, 1, 1)
    assert "pretrained.model.layers.0.downsample.reduction.weight" in ckpt
    del ref
    bb = create_backbone(alias, weights=_save(tmp_path, "dpt_swin2.pt", ckpt))
    _check(bb.model, expected)
    x = torch.randn(1, 3, size, size)
    assert bb.model.forward_features(x).shape == (1, size // 32, size // 32, dim)
    assert bb.model(x).shape == (1, dim)


def test_loader_weights_from_the_hub_cache_or_a_clear_offline_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args: object, **kw: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    with pytest.raises(WeightsError, match="--weights FILE") as e:
        create_backbone("dino_resnet50")
    assert "dino_resnet50_pretrain.pth" in str(e.value)
    tv = _randomize(torchvision.models.resnet50(weights=None).state_dict(), 5)
    backbone = {k: v for k, v in tv.items() if not k.startswith("fc.")}
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(backbone, cache / "dino_resnet50_pretrain.pth")
    bb = create_backbone("dino_resnet50")  # offline, from torch.hub's cache
    _check(bb.model, backbone)
    assert bb.weights.source == "url" and bb.weights.sha256
    assert bb.weights.key == f"url:{LOADERS['dino_resnet50'].url}"


TINY_SD = """
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from probekit.sd import StableDiffusionEncoder

def build():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    return StableDiffusionEncoder(vae, unet, torch.randn(1, 7, 32), img_size=32)
"""


def test_stable_diffusion_encoder_layers_are_the_unet_down_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("diffusers")
    import numpy as np

    import probekit

    (tmp_path / "tiny_sd.py").write_text(TINY_SD)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_sd  # type: ignore[import-not-found]

    model = tiny_sd.build().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    # the reference: diffusers' own full UNet forward at timestep 0, its down blocks hooked
    seen: list[torch.Tensor] = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: seen.append(o[0])) for b in model.unet.down_blocks
    ]
    with torch.no_grad():
        latents = model.vae.encode(x).latent_dist.mean * 0.18215
        model.unet(latents, 0, encoder_hidden_states=model.prompt_embeds.expand(2, -1, -1))
        for h in hooks:
            h.remove()
        final, inters = model.forward_intermediates(x, indices=[0, 1])
    assert len(inters) == 2 and inters[0].shape == (2, 32, 8, 8) and final.shape == (2, 64, 8, 8)
    for ours, ref in zip(inters, seen, strict=True):
        torch.testing.assert_close(ours, ref)
    assert [f["reduction"] for f in model.feature_info] == [4, 4]
    # through probekit: the down blocks are the layers, mean-pooled, the head their mean too
    res = probekit.extract(
        "tiny_sd:build", "synthetic:2", layers="all", pool="mean", num_workers=0, quiet=True
    )
    store = probekit.open_store(res.store_path)
    assert store.feature_names == ["layer0/mean", "layer1/mean", "head/embed"]
    assert store.features("train", "layer1/mean").shape[1] == 64
    emb = store.features("train", "head/embed").astype(np.float32)
    np.testing.assert_allclose(emb, store.features("train", "layer1/mean"), rtol=1e-2, atol=1e-3)


def test_stable_diffusion_row_lists_the_unet_down_blocks() -> None:
    diffusers = pytest.importorskip("diffusers")
    import inspect

    # SD 1.5's UNet has diffusers' default block layout: one layer per down block
    init = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    blocks = len(init["down_block_types"].default)
    (row,) = list_backbones("stable_diffusion_v1_5")
    assert row.default_layers == tuple(range(blocks)[-4:]) and blocks == 4
    assert row.params_m > 900


def test_stable_diffusion_alias_needs_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    row = ALIASES["stable_diffusion_v1_5"]
    assert row.bob and row.group == "generative"
    monkeypatch.setitem(EXTRA_MODULES, "sd", ("diffusers", "probekit_no_such_module"))
    assert row.availability == "needs extra [sd]"
    monkeypatch.setitem(EXTRA_MODULES, "sd", ("probekit", "torch"))
    assert row.availability == "builder [sd]"
    hide_modules(monkeypatch, "transformers")
    with pytest.raises(BackboneError, match=r"pip install 'probekit\[sd\]'"):
        create_backbone("stable_diffusion_v1_5")
