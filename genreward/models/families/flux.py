"""``flux``: FLUX.1-dev / schnell (``FluxPipeline``): CLIP (pooled) + T5, a guidance-distilled transformer that takes
the guidance scale as an embedding (no classifier-free guidance, no negative prompts), 2×2-packed latents with
text/image position ids, and a resolution-dependent (dynamic) shift; the flow-matching step kernel
(docs/algorithms/flow_grpo.md)."""

from __future__ import annotations

from typing import Sequence

import torch

from genreward.models.families.base import Conditioning, ModelFamily

MAX_SEQUENCE_LENGTH = 512  # T5 tokens (FLUX.1-dev's pipeline default)


class FluxFamily(ModelFamily):
    name = "flux"
    kernel = "flow"
    denoiser_attr = "transformer"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    pipeline_classes = ("FluxPipeline",)
    lora_pipeline_class = "FluxPipeline"
    supports_negative_prompt = False

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        side = int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor
        return side, side

    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2  # the VAE factor × the 2×2 packing

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        return 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))

    def _max_sequence_length(self) -> int:
        limit = getattr(self.pipe.tokenizer_2, "model_max_length", None)
        return min(MAX_SEQUENCE_LENGTH, int(limit)) if limit and limit < 10**6 else MAX_SEQUENCE_LENGTH

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative, guidance: bool, height: int | None = None,
               width: int | None = None) -> tuple[Conditioning, Conditioning | None]:
        self.check_negative_prompt(negative)
        device = self.denoiser.device
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                                           num_images_per_prompt=1,
                                                           max_sequence_length=self._max_sequence_length())
        h, w = self._latent_hw(*(height, width) if height else self.default_size())
        img_ids = self.pipe._prepare_latent_image_ids(len(prompts), h // 2, w // 2, device, embeds.dtype)
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled},
                            {"txt_ids": text_ids, "img_ids": img_ids}), None

    def denoise(self, model, x_t, t, cond, uncond, guidance_scale):
        """The velocity at σ = t/1000; the guidance scale goes in as FLUX's embedding (when the model has one)."""
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = (t.expand(batch) if t.ndim == 0 else t).to(x_t.dtype)
        config = model.config if hasattr(model, "config") else self.denoiser.config
        guidance = (torch.full([batch], float(guidance_scale), device=x_t.device, dtype=torch.float32)
                    if getattr(config, "guidance_embeds", False) else None)
        return model(hidden_states=x_t, timestep=t / 1000, guidance=guidance, pooled_projections=cond["pooled_projections"],
                     encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=cond["txt_ids"], img_ids=cond["img_ids"],
                     return_dict=False)[0]

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, ...]:
        h, w = self._latent_hw(height, width)
        channels = int(self.denoiser.config.in_channels) // 4
        return (n, channels, h, w)

    def image_seq_len(self, height: int, width: int) -> int:
        h, w = self._latent_hw(height, width)
        return (h // 2) * (w // 2)

    def initial_latents(self, n, height, width, generators, dtype):
        """Unpacked N(0, I) noise per sample (as the pipeline draws it), then 2×2-packed to [B, L, 4C]."""
        from genreward.sampling import randn_like_per_sample

        shape = self.latent_shape(n, height, width)
        noise = randn_like_per_sample(torch.empty(shape, device=self.denoiser.device), list(generators)).to(dtype)
        return self.pipe._pack_latents(noise, n, shape[1], shape[2], shape[3])

    def decode(self, latents, height: int | None = None, width: int | None = None):
        if height is None or width is None:
            height, width = self.default_size()
        vae = self.pipe.vae
        z = self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
        z = z.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def training_target(self, x0, noise, t):
        return noise - x0
