"""The model-family interface: what the sampler and the trainers may ask of a text-to-image pipeline.

A family wraps one diffusers pipeline and knows its prompt encoding, its denoiser call (classifier-free
guidance or FLUX's guidance embedding), its latent shape, its decoding and its step kernel (``ddim`` for the
SD U-Nets, ``flow`` for the flow-matching transformers). The sampler (:mod:`genreward.sampling`) and the
trainers talk to a family only, so adding a model is one file here, not a new training script.
See docs/architecture.md ("Model families").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from genreward.errors import GenrewardError

Kernel = Literal["ddim", "flow"]


@dataclass
class Conditioning:
    """A batch of prompt conditioning: named tensors with the batch on dim 0 (``per_sample``) and tensors every
    sample shares (``shared``, e.g. FLUX's text/image position ids). Indexable like the trajectory that stores it."""

    per_sample: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.per_sample.values())).shape[0]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.per_sample[name] if name in self.per_sample else self.shared[name]

    def select(self, index) -> "Conditioning":
        return Conditioning({k: v[index] for k, v in self.per_sample.items()}, dict(self.shared))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Conditioning":
        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)

        return Conditioning({k: move(v) for k, v in self.per_sample.items()}, {k: move(v) for k, v in self.shared.items()})

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        first = parts[0]
        return Conditioning({k: torch.cat([p.per_sample[k] for p in parts]) for k in first.per_sample}, dict(first.shared))

    @staticmethod
    def pair(uncond: "Conditioning", cond: "Conditioning") -> "Conditioning":
        """[uncond; cond] stacked on the batch dim: the one batched forward of classifier-free guidance."""
        return Conditioning.cat([uncond, cond])


def guided(forward, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
           guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance around ``forward(x, t, cond)``: pred_u + w·(pred_c − pred_u) from one batched call
    on [uncond; cond] (the conditional prediction alone when ``uncond`` is None or w = 1)."""
    if uncond is None or guidance_scale == 1.0:
        return forward(x, t, cond)
    t_both = torch.cat([t, t]) if t.ndim == 1 else t  # per-sample timesteps repeat for the [uncond, cond] batch
    pred = forward(torch.cat([x, x]), t_both, Conditioning.pair(uncond, cond))
    pred_uncond, pred_cond = pred.chunk(2)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


class ModelFamily:
    """Base class of a family; one instance wraps one pipeline (``family.pipe``).

    Subclasses set ``name``, ``kernel``, ``denoiser_attr`` (``"unet"`` / ``"transformer"``), ``lora_targets``
    and ``pipeline_classes`` (the diffusers class names detected as this family) and implement the methods
    that raise here.
    """

    name: str = ""
    kernel: Kernel = "ddim"
    denoiser_attr: str = "unet"
    lora_targets: tuple[str, ...] = ()
    pipeline_classes: tuple[str, ...] = ()
    supports_negative_prompt: bool = True
    lora_pipeline_class: str = "StableDiffusionPipeline"  # whose save_lora_weights / lora_state_dict format we write

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    # ------------------------------------------------------------------------------------ structure
    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that trains (U-Net or transformer)."""
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 8) or 8)

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels the denoiser was built for."""
        raise NotImplementedError

    def size_multiple(self) -> int:
        """Image sides must be multiples of this."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ the calls
    def encode(self, prompts: Sequence[str], negative: str | Sequence[str] | None, guidance: bool) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond) for ``prompts``; uncond is None when ``guidance`` (CFG) is off."""
        raise NotImplementedError

    def denoise(self, model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                uncond: Conditioning | None, guidance_scale: float) -> torch.Tensor:
        """The model output used by the step kernel (ε / v for DDIM U-Nets, the velocity for flow models), with
        classifier-free guidance when ``uncond`` is given. ``t`` is a scalar or one timestep per sample."""
        raise NotImplementedError

    def initial_latents(self, n: int, height: int, width: int, generators: Sequence[torch.Generator],
                        dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images [B, 3, H, W] in [0, 1]."""
        raise NotImplementedError

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict at (x0, noise, t): ε, v, or the flow velocity."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ weights
    def lora_saver(self):
        import diffusers

        return getattr(diffusers, self.lora_pipeline_class)

    def save_lora(self, peft_state: dict[str, torch.Tensor], folder: str) -> None:
        """Write diffusers-format LoRA weights (``pytorch_lora_weights.safetensors``) that this family's pipeline
        class reloads with ``load_lora_weights``. ``peft_state`` is ``get_peft_model_state_dict(denoiser)``: U-Nets
        are converted to diffusers' U-Net naming (as diffusers' SD/SDXL LoRA scripts do); transformers keep peft's
        ``lora_A``/``lora_B`` keys (as its SD3/FLUX scripts do: the U-Net conversion would mix two formats)."""
        if self.denoiser_attr == "unet":
            from diffusers.utils import convert_state_dict_to_diffusers

            peft_state = convert_state_dict_to_diffusers(peft_state)
        self.lora_saver().save_lora_weights(folder, **{f"{self.denoiser_attr}_lora_layers": peft_state},
                                            safe_serialization=True)

    def lora_state(self, folder: str) -> dict[str, torch.Tensor]:
        """The denoiser's LoRA tensors of a folder written by :meth:`save_lora` (keys without the component prefix).
        A LoRA of another family names other modules or has no ``<denoiser>.`` keys: one line."""
        state = self.lora_saver().lora_state_dict(folder)
        state = state[0] if isinstance(state, tuple) else state
        prefix = f"{self.denoiser_attr}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            other = sorted({k.split(".", 1)[0] for k in state})
            raise GenrewardError(f"LoRA weights in {folder} are not for a {self.name} {self.denoiser_attr} "
                                 f"(they hold {', '.join(other) or 'nothing'}); a LoRA of another model family?")
        return own

    # ------------------------------------------------------------------------------------ checks
    def check_negative_prompt(self, negative: str | Sequence[str] | None, key: str = "sample.negative_prompt") -> None:
        if self.supports_negative_prompt:
            return
        values = [negative] if isinstance(negative, str) or negative is None else list(negative)
        if any(v for v in values):
            raise GenrewardError(f"{key} is set but family '{self.name}' has no negative prompts "
                                 f"(it is guidance-distilled and never runs classifier-free guidance); remove {key}")

    def check_size(self, height: int | None, width: int | None, prefix: str = "") -> None:
        from genreward.sampling import _is_int

        multiple = self.size_multiple()
        for name, value in (("height", height), ("width", width)):
            if value is None:
                continue
            if isinstance(value, bool) or not _is_int(value) or value < 1:
                raise GenrewardError(f"{prefix}{name} must be a positive integer, got {value!r}")
            if value % multiple:
                lower = value // multiple * multiple
                options = " or ".join(str(v) for v in (lower, lower + multiple) if v > 0)
                raise GenrewardError(f"{prefix}{name}={value} does not suit this {self.name} model: image sizes must be "
                                     f"multiples of {multiple}; use {options}")
