"""Score Distillation Sampling (DreamFusion) from any diffusers Stable-Diffusion-family pipeline.

The renders are VAE-encoded *with* gradient, noised at a random timestep, and the frozen U-Net (under
``no_grad``) predicts the noise with classifier-free guidance. The gradient w(t)(ε̂ − ε) on the latents
is applied through a surrogate loss ½‖z − sg(z − grad)‖²_sum / B, whose derivative w.r.t. z is exactly
grad / B (docs/algorithms/vlm3d_sds.md §2).

CFG conventions (``cfg_convention``):

* ``threestudio`` — ε̂ = ε̂_c + s·(ε̂_c − ε̂_u) (threestudio's SD guidance; VLM3D's configs, s = 100);
* ``standard`` — ε̂ = ε̂_u + ω·(ε̂_c − ε̂_u) (DreamFusion / diffusers). s ↔ ω = s + 1.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from trainers.sds3d.schedules import Schedule, scheduled

CFG_CONVENTIONS = ("threestudio", "standard")
WEIGHTINGS = ("sds", "uniform", "fantasia3d")


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float, convention: str = "threestudio") -> torch.Tensor:
    """Classifier-free guidance in either convention (see the module docstring)."""
    if convention == "threestudio":
        return eps_cond + scale * (eps_cond - eps_uncond)
    if convention == "standard":
        return eps_uncond + scale * (eps_cond - eps_uncond)
    raise ValueError(f"unknown CFG convention {convention!r}; use one of {', '.join(CFG_CONVENTIONS)}")


def sds_weight(alpha_bar: torch.Tensor, kind: str = "sds") -> torch.Tensor:
    """w(t) from ᾱ_t: ``sds`` 1 − ᾱ_t, ``uniform`` 1, ``fantasia3d`` sqrt(ᾱ_t)(1 − ᾱ_t)."""
    if kind == "sds":
        return 1.0 - alpha_bar
    if kind == "uniform":
        return torch.ones_like(alpha_bar)
    if kind == "fantasia3d":
        return alpha_bar.sqrt() * (1.0 - alpha_bar)
    raise ValueError(f"unknown SDS weighting {kind!r}; use one of {', '.join(WEIGHTINGS)}")


def sds_surrogate_loss(latents: torch.Tensor, eps_pred: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor,
                       grad_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad): grad = w·(ε̂ − ε) (optionally clamped, NaNs zeroed); loss = ½‖z − sg(z − grad)‖²_sum / B.

    ``weight`` broadcasts against the latents (e.g. ``[B,1,1,1]``). ∂loss/∂z = grad / B exactly.
    """
    grad = weight * (eps_pred.float() - noise.float())
    if grad_clip is not None:
        grad = grad.clamp(-grad_clip, grad_clip)
    grad = torch.nan_to_num(grad)
    z = latents.float()
    target = (z - grad).detach()
    loss = 0.5 * F.mse_loss(z, target, reduction="sum") / z.shape[0]
    return loss, grad


def timestep_bounds(min_percent: Schedule, max_percent: Schedule, step: int, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """(t_min, t_max) at ``step`` from (possibly annealed) percentages, as threestudio computes them."""
    lo = int(num_train_timesteps * scheduled(min_percent, step))
    hi = int(num_train_timesteps * scheduled(max_percent, step))
    return lo, max(lo, hi)


def sample_timesteps(batch: int, t_min: int, t_max: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ U{t_min, …, t_max}, one per render."""
    return torch.randint(t_min, t_max + 1, (batch,), generator=generator)


class SDSGuidance:
    """SDS loss from a loaded SD-family pipeline (``genreward.models.pipeline.load_pipeline``).

    ``noise_predictor`` (optional) replaces the U-Net call: ``f(z_t, t, embeds) -> ε`` — used by tests
    with a mock that returns the injected noise.
    """

    def __init__(
        self,
        pipe: Any,
        guidance_scale: float = 100.0,
        cfg_convention: str = "threestudio",
        weighting: str = "sds",
        min_step_percent: Schedule = 0.02,
        max_step_percent: Schedule = 0.98,
        grad_clip: float | None = None,
        resolution: int | None = None,
        latent_mode: str = "sample",
        negative_prompt: str = "",
        noise_predictor: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        if cfg_convention not in CFG_CONVENTIONS:
            raise ValueError(f"unknown CFG convention {cfg_convention!r}")
        sds_weight(torch.ones(1), weighting)  # validates the name
        self.pipe, self.unet, self.vae = pipe, pipe.unet, pipe.vae
        self.guidance_scale, self.cfg_convention, self.weighting = float(guidance_scale), cfg_convention, weighting
        self.min_step_percent, self.max_step_percent, self.grad_clip = min_step_percent, max_step_percent, grad_clip
        self.latent_mode, self.negative_prompt = latent_mode, negative_prompt
        self.noise_predictor = noise_predictor
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.float()
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        scale = getattr(pipe, "vae_scale_factor", 8)
        self.resolution = int(resolution or self.unet.config.sample_size * scale)
        self._embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) text embeddings ``[B, L, D]``, cached per prompt string."""
        for p in set(prompts) - set(self._embeds):
            with torch.no_grad():
                cond, uncond = self.pipe.encode_prompt(p, self.device, 1, True, self.negative_prompt)
            self._embeds[p] = (cond, uncond)
        cond = torch.cat([self._embeds[p][0] for p in prompts])
        uncond = torch.cat([self._embeds[p][1] for p in prompts])
        return cond, uncond

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Renders ``[B,3,H,W]`` in [0,1] → scaled VAE latents, keeping the graph to the pixels."""
        x = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = (x * 2.0 - 1.0).to(self.device, self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        if self.latent_mode == "mean":
            z = dist.mean
        else:  # reparameterised sample: mean + std·noise, differentiable in the mean
            noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean) if generator is not None else torch.randn_like(dist.mean)
            z = dist.mean + dist.std * noise
        return z.float() * float(self.vae.config.scaling_factor)

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """CFG-combined ε̂ at (z_t, t) from the frozen U-Net, without a graph (v-prediction converted to ε)."""
        with torch.no_grad():
            z_in = torch.cat([z_t, z_t]).to(self.unet.dtype)
            t_in = torch.cat([t, t]).to(self.device)
            embeds = torch.cat([cond, uncond]).to(self.unet.dtype)
            if self.noise_predictor is not None:
                out = self.noise_predictor(z_in, t_in, embeds)
            else:
                out = self.unet(z_in, t_in, encoder_hidden_states=embeds).sample
            out = out.float()
            if self.prediction_type == "v_prediction":
                ab = self.alphas_cumprod.to(self.device)[t_in].view(-1, 1, 1, 1)
                out = ab.sqrt() * out + (1 - ab).sqrt() * torch.cat([z_t, z_t]).float()
            eps_cond, eps_uncond = out.chunk(2)
            return cfg_combine(eps_uncond, eps_cond, self.guidance_scale, self.cfg_convention)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], step: int, generator: torch.Generator,
                 timer: Callable[[str], contextlib.AbstractContextManager] | None = None) -> dict[str, torch.Tensor]:
        """SDS on renders ``[B,3,H,W]`` (one view-dependent prompt each) at training ``step``.

        Returns ``loss_sds`` (with graph to ``images``), and detached ``t``, ``grad`` (w(t)(ε̂ − ε)),
        ``noise``, ``eps_pred``, ``latents`` for logging and tests.
        """
        timer = timer or (lambda name: contextlib.nullcontext())
        b = images.shape[0]
        t_min, t_max = timestep_bounds(self.min_step_percent, self.max_step_percent, step, self.num_train_timesteps)
        t = sample_timesteps(b, t_min, t_max, generator)
        with timer("vae_encode"):
            z = self.encode(images, generator)
        noise = torch.randn(z.shape, generator=generator).to(z)
        ab = self.alphas_cumprod.to(z.device)[t.to(z.device)].view(-1, 1, 1, 1)
        z_t = ab.sqrt() * z.detach() + (1 - ab).sqrt() * noise
        cond, uncond = self.embeddings(prompts)
        with timer("unet"):
            eps_pred = self.predict_noise(z_t, t.to(z.device), cond, uncond)
        loss, grad = sds_surrogate_loss(z, eps_pred, noise, sds_weight(ab, self.weighting), self.grad_clip)
        return {"loss_sds": loss, "t": t, "grad": grad.detach(), "noise": noise, "eps_pred": eps_pred,
                "latents": z.detach(), "t_min": torch.tensor(t_min), "t_max": torch.tensor(t_max)}
