"""``sd3``: Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): two CLIP encoders with pooled projections and an
optional T5, an MM-DiT transformer predicting the flow velocity, ``FlowMatchEulerDiscreteScheduler`` with its shift;
the flow-matching step kernel (docs/algorithms/flow_grpo.md)."""

from __future__ import annotations

from typing import Sequence

import torch

from genreward.models.families.base import Conditioning, ModelFamily, guided

MAX_SEQUENCE_LENGTH = 256  # T5 tokens, as the Flow-GRPO SD3.5 recipes use


class SD3Family(ModelFamily):
    name = "sd3"
    kernel = "flow"
    denoiser_attr = "transformer"
    # Flow-GRPO's SD3.5 LoRA targets: the joint attention's image and context projections.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    pipeline_classes = ("StableDiffusion3Pipeline",)
    lora_pipeline_class = "StableDiffusion3Pipeline"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        side = int(self.denoiser.config.sample_size) * self.vae_scale_factor
        return side, side

    def size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.denoiser.config.patch_size)

    def _max_sequence_length(self) -> int:
        tok = getattr(self.pipe, "tokenizer_3", None)
        limit = getattr(tok, "model_max_length", None) if tok is not None else None
        return min(MAX_SEQUENCE_LENGTH, int(limit)) if limit and limit < 10**6 else MAX_SEQUENCE_LENGTH

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative, guidance: bool, height: int | None = None,
               width: int | None = None) -> tuple[Conditioning, Conditioning | None]:
        negatives = [negative or ""] * len(prompts) if isinstance(negative, str) or negative is None else list(negative)
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.denoiser.device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negatives if guidance else None,
            max_sequence_length=self._max_sequence_length(),
        )
        cond = Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})
        uncond = Conditioning({"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled}) if guidance else None
        return cond, uncond

    def _forward(self, model, x, t, cond: Conditioning) -> torch.Tensor:
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    def denoise(self, model, x_t, t, cond, uncond, guidance_scale):
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        return guided(lambda x, tt, c: self._forward(model, x, tt, c), x_t, t, cond, uncond, guidance_scale)

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (n, int(self.denoiser.config.in_channels), height // f, width // f)

    def image_seq_len(self, height: int, width: int) -> int:
        f, p = self.vae_scale_factor, int(self.denoiser.config.patch_size)
        return (height // f // p) * (width // f // p)

    def initial_latents(self, n, height, width, generators, dtype):
        from genreward.sampling import randn_like_per_sample

        dummy = torch.empty(self.latent_shape(n, height, width), device=self.denoiser.device)
        return randn_like_per_sample(dummy, list(generators)).to(dtype)

    def decode(self, latents, height: int | None = None, width: int | None = None):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def training_target(self, x0, noise, t):
        """Rectified flow x_σ = (1−σ)x0 + σε: the velocity dx/dσ = ε − x0."""
        return noise - x0
