"""``sd``: Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): one CLIP text encoder, a U-Net predicting ε or v,
the DDIM step kernel with log-probabilities (docs/algorithms/ddpo.md)."""

from __future__ import annotations

from typing import Sequence

import torch

from genreward.models.families.base import Conditioning, ModelFamily, guided


class SDFamily(ModelFamily):
    name = "sd"
    kernel = "ddim"
    denoiser_attr = "unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    pipeline_classes = ("StableDiffusionPipeline",)

    def default_size(self) -> tuple[int, int]:
        side = int(self.denoiser.config.sample_size) * self.vae_scale_factor
        return side, side

    def size_multiple(self) -> int:
        cfg = self.denoiser.config
        blocks = getattr(cfg, "block_out_channels", None) or getattr(cfg, "down_block_types", ())
        return self.vae_scale_factor * 2 ** max(len(blocks) - 1, 0)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative, guidance: bool, height: int | None = None,
               width: int | None = None) -> tuple[Conditioning, Conditioning | None]:
        negatives = [negative or ""] * len(prompts) if isinstance(negative, str) or negative is None else list(negative)
        cond, uncond = self.pipe.encode_prompt(list(prompts), device=self.denoiser.device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=negatives)
        return Conditioning({"encoder_hidden_states": cond}), Conditioning({"encoder_hidden_states": uncond}) if guidance else None

    def _forward(self, model, x, t, cond: Conditioning) -> torch.Tensor:
        return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def denoise(self, model, x_t, t, cond, uncond, guidance_scale):
        t = torch.as_tensor(t, device=x_t.device)
        x_in = self.scheduler.scale_model_input(x_t, t)
        return guided(lambda x, tt, c: self._forward(model, x, tt, c), x_in, t, cond, uncond, guidance_scale)

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (n, int(self.denoiser.config.in_channels), height // f, width // f)

    def initial_latents(self, n, height, width, generators, dtype):
        from genreward.sampling import randn_like_per_sample

        dummy = torch.empty(self.latent_shape(n, height, width), device=self.denoiser.device)
        noise = randn_like_per_sample(dummy, list(generators))
        return (noise * self.scheduler.init_noise_sigma).to(dtype)

    def decode(self, latents, height: int | None = None, width: int | None = None):
        vae = self.pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def training_target(self, x0, noise, t):
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return noise
