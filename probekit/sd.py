"""Stable Diffusion as a backbone, as Battle of the Backbones used it (extra `[sd]`: diffusers).

Images (scaled to [-1, 1]) go through the VAE encoder; the latent mean, times the VAE's scaling
factor (0.18215 for SD 1.x), goes through the UNet's down path at timestep 0, conditioned on a
fixed prompt's text embedding. The output of every down block is a layer; the model's `head`
embedding is the last down block's output averaged over space. The wrapper speaks timm's
feature contract (`feature_info`, `forward_intermediates`, `forward_head`, `pretrained_cfg`),
so extraction, pooling and caching work as for any timm model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from probekit.errors import BackboneError

__all__ = ["SD15_REPO", "StableDiffusionEncoder", "stable_diffusion_v1_5"]

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class StableDiffusionEncoder(torch.nn.Module):
    """VAE encoder + UNet down blocks at timestep 0 with a fixed prompt embedding."""

    def __init__(
        self,
        vae: Any,
        unet: Any,
        prompt_embeds: torch.Tensor,
        *,
        scaling_factor: float = 0.18215,
        img_size: int = 512,
    ):
        super().__init__()
        self.vae, self.unet = vae, unet
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=True)
        self.scaling_factor = scaling_factor
        channels = list(unet.config.block_out_channels)
        vae_down = 2 ** (len(vae.config.block_out_channels) - 1)
        self.feature_info = [
            {
                "module": f"unet.down_blocks.{i}",
                "num_chs": channels[i],
                # every down block but the last halves the resolution at its end
                "reduction": vae_down * 2 ** min(i + 1, len(channels) - 1),
            }
            for i in range(len(channels))
        ]
        self.num_features = channels[-1]
        self.pretrained_cfg: dict[str, Any] = {
            "input_size": (3, img_size, img_size),
            "mean": (0.5, 0.5, 0.5),  # [0, 1] -> [-1, 1], what the VAE expects
            "std": (0.5, 0.5, 0.5),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
        }

    def _down(self, x: torch.Tensor) -> list[torch.Tensor]:
        vae: Any = self.vae
        latents = vae.encode(x).latent_dist.mean * self.scaling_factor
        unet: Any = self.unet
        t = torch.zeros(len(x), device=x.device)
        temb = unet.time_embedding(unet.time_proj(t).to(latents.dtype))
        prompt: Any = self.prompt_embeds
        text = prompt.to(latents.dtype).expand(len(x), -1, -1)
        h = unet.conv_in(latents)
        outs = []
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=temb, encoder_hidden_states=text)
            else:
                h, _ = block(hidden_states=h, temb=temb)
            outs.append(h)
        return outs

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **_: Any,
    ) -> Any:
        if output_fmt != "NCHW":
            raise ValueError("the Stable Diffusion encoder gives NCHW maps only.")
        n = len(self.feature_info)
        take = range(n - indices, n) if isinstance(indices, int) else (indices or range(n))
        outs = self._down(x)
        inters = [outs[i % n] for i in take]
        return inters if intermediates_only else (outs[-1], inters)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._down(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def stable_diffusion_v1_5(prompt: str = "", img_size: int = 512) -> StableDiffusionEncoder:
    """SD 1.5's VAE, UNet and the CLIP text embedding of `prompt`, from the Hugging Face hub
    (or its cache). Needs `pip install 'probekit[sd]'` (diffusers, transformers)."""
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise BackboneError(
            "the Stable Diffusion backbone needs diffusers and transformers: "
            "pip install 'probekit[sd]'."
        ) from None
    vae = AutoencoderKL.from_pretrained(SD15_REPO, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(SD15_REPO, subfolder="unet")
    tokenizer = CLIPTokenizer.from_pretrained(SD15_REPO, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(SD15_REPO, subfolder="text_encoder")
    tokens = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        embeds = text_encoder(tokens.input_ids)[0]
    return StableDiffusionEncoder(
        vae, unet, embeds, scaling_factor=float(vae.config.scaling_factor), img_size=img_size
    )
