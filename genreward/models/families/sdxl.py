"""``sdxl``: Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders (the second pooled), the
``add_time_ids`` micro-conditioning (original size, crop, target size), a U-Net predicting ε; the DDIM step kernel
with log-probabilities, as ``sd`` (docs/algorithms/ddpo.md)."""

from __future__ import annotations

from typing import Sequence

import torch

from genreward.models.families.base import Conditioning
from genreward.models.families.sd import SDFamily


class SDXLFamily(SDFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    lora_pipeline_class = "StableDiffusionXLPipeline"

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative, guidance: bool, height: int | None = None,
               width: int | None = None) -> tuple[Conditioning, Conditioning | None]:
        negatives = [negative or ""] * len(prompts) if isinstance(negative, str) or negative is None else list(negative)
        device = self.denoiser.device
        # negatives are always given (default ""), so SDXL's force_zeros_for_empty_prompt never zeroes them: the
        # unconditional branch is the encoded empty prompt, as for every other family here
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negatives if guidance else None,
        )
        if height is None or width is None:
            height, width = self.default_size()
        time_ids = self.time_ids(len(prompts), height, width, pooled.dtype, device)
        cond = Conditioning({"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids})
        uncond = (Conditioning({"encoder_hidden_states": neg_embeds, "text_embeds": neg_pooled, "time_ids": time_ids})
                  if guidance else None)
        return cond, uncond

    def time_ids(self, n: int, height: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
        """SDXL micro-conditioning (original size, crop top-left, target size) = (H, W, 0, 0, H, W), as the pipeline
        uses by default."""
        pipe = self.pipe
        projection_dim = (pipe.text_encoder_2.config.projection_dim if getattr(pipe, "text_encoder_2", None) is not None
                          else None)
        ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                     text_encoder_projection_dim=projection_dim)
        return ids.to(device).repeat(n, 1)

    def _forward(self, model, x, t, cond: Conditioning) -> torch.Tensor:
        return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                     added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample

