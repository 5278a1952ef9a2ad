"""Loading text-to-image pipelines: hub id, local folder, or a registered spec (``tiny:sd``, ``world:shapes-t2i``).

All three go through the same code afterwards: the scheduler is swapped for ``DDIMScheduler`` (the
sampler's log-probabilities are defined for DDIM), the pipeline moves to the configured device/dtype,
and optional fine-tuned weights (a LoRA or a full U-Net folder) are applied.

Prefixed specs are looked up in :mod:`genreward.registry` (kind ``"pipeline"``; a loader takes the spec and
returns a diffusers pipeline). The ``tiny:`` / ``random:`` built-ins register below; ``world:`` specs are
registered by the ``genreward.world.plugin`` plugin.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genreward.errors import GenrewardError
from genreward.models.device import resolve_device, resolve_dtype
from genreward.models.hub import from_pretrained_offline_aware
from genreward.models.tiny import RANDOM_SPECS, TINY_SPECS, build_random_sd15, build_tiny_sd
from genreward.registry import find_spec_loader, register_spec


@register_spec("pipeline", *TINY_SPECS)
def _tiny_pipeline(spec: str):
    return build_tiny_sd(spec)


@register_spec("pipeline", *RANDOM_SPECS)
def _random_pipeline(spec: str):
    return build_random_sd15()


def load_pipeline(
    spec: str = "tiny:sd",
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = "fp32",
    lora: str | None = None,
    unet: str | None = None,
):
    """A Stable-Diffusion-family pipeline with a DDIM scheduler, on ``device`` in ``dtype``.

    ``spec``: a hub id (``CompVis/stable-diffusion-v1-4``), a local pipeline folder, ``tiny:sd`` /
    ``tiny:sd-v`` (tiny, random weights), ``random:sd15`` (SD-1.5 architecture, random weights), or
    ``world:shapes-t2i`` (the shapes world's project-trained model, shipped in the package; see
    docs/world.md). ``lora``: a folder or file loadable by ``pipe.load_lora_weights``. ``unet``: a folder
    with a full fine-tuned ``UNet2DConditionModel`` that replaces the pipeline's U-Net.
    """
    from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel

    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    loader = find_spec_loader("pipeline", spec, what="pipeline")
    if loader is not None:
        pipe = loader(spec)
    else:
        pipe = from_pretrained_offline_aware(DiffusionPipeline.from_pretrained, spec, spec, "pipeline", safety_checker=None)
    if not hasattr(pipe, "unet"):
        raise GenrewardError(f"pipeline '{spec}' has no U-Net (got {type(pipe).__name__}); genreward trains U-Net based SD-family models")
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if unet is not None:
        pipe.unet = from_pretrained_offline_aware(UNet2DConditionModel.from_pretrained, unet, unet, "U-Net")
    pipe.to(torch_device)
    if pipe.unet.dtype != torch_dtype:
        pipe.to(torch_dtype)
    if lora is not None:
        if not Path(lora).exists():
            raise GenrewardError(f"LoRA weights not found: {lora}")
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe
