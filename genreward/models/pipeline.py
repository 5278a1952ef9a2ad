"""Loading text-to-image pipelines: hub id, local folder, or a registered spec (``tiny:sd``, ``world:shapes-t2i``).

All three go through the same code afterwards: the model family is detected (:mod:`genreward.models.families`),
U-Net families get ``DDIMScheduler`` (their log-probabilities are DDIM's), flow families keep their flow-matching
scheduler, the pipeline moves to the configured device/dtype, and optional fine-tuned weights (a LoRA or a full
denoiser folder) are applied.

Prefixed specs are looked up in :mod:`genreward.registry` (kind ``"pipeline"``; a loader takes the spec and
returns a diffusers pipeline). The ``tiny:`` / ``random:`` built-ins register below; ``world:`` specs are
registered by the ``genreward.world.plugin`` plugin.
"""

from __future__ import annotations

from pathlib import Path

import logging
import re

import torch

from genreward.errors import GenrewardError
from genreward.models.device import resolve_device, resolve_dtype
from genreward.models.hub import first_line, from_pretrained_offline_aware
from genreward.models.tiny import (
    RANDOM_FAMILY_SPECS,
    RANDOM_SPECS,
    TINY_FAMILY_SPECS,
    TINY_SPECS,
    build_random_family,
    build_random_sd15,
    build_tiny_flux,
    build_tiny_sd,
    build_tiny_sd3,
    build_tiny_sdxl,
)
from genreward.registry import find_spec_loader, register_spec


@register_spec("pipeline", *TINY_SPECS)
def _tiny_pipeline(spec: str):
    return build_tiny_sd(spec)


@register_spec("pipeline", *TINY_FAMILY_SPECS)
def _tiny_family_pipeline(spec: str):
    return {"tiny:sdxl": build_tiny_sdxl, "tiny:sd3": build_tiny_sd3, "tiny:flux": build_tiny_flux}[spec]()


@register_spec("pipeline", *RANDOM_FAMILY_SPECS)
def _random_family_pipeline(spec: str):
    # billions of random parameters: created directly on the GPU when there is one (not on its CPU, then copied)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return build_random_family(spec)


@register_spec("pipeline", *RANDOM_SPECS)
def _random_pipeline(spec: str):
    return build_random_sd15()


def load_pipeline(
    spec: str = "tiny:sd",
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = "fp32",
    lora: str | None = None,
    unet: str | None = None,
    family: str | None = None,
):
    """A text-to-image pipeline of a known model family (sd, sdxl, sd3, flux), on ``device`` in ``dtype``, frozen.

    ``spec``: a hub id (``CompVis/stable-diffusion-v1-4``, ``stabilityai/stable-diffusion-3.5-medium``,
    ``black-forest-labs/FLUX.1-dev``), a local pipeline folder, ``tiny:sd`` / ``tiny:sd-v`` / ``tiny:sdxl`` /
    ``tiny:sd3`` / ``tiny:flux`` (tiny, random weights), ``random:sd15`` / ``random:sdxl`` / ``random:sd35m`` /
    ``random:flux-dev`` (full architectures, random weights), or ``world:shapes-t2i`` (the shapes world's
    project-trained model; docs/world.md). U-Net families get a DDIM scheduler (the kernel with log-probs); flow
    families keep their ``FlowMatchEulerDiscreteScheduler``. ``lora``: a folder or file loadable by
    ``pipe.load_lora_weights``. ``unet``: a folder with a full fine-tuned denoiser (``UNet2DConditionModel`` or the
    family's transformer) that replaces the pipeline's. ``family`` overrides the detected family (``model.family``).
    """
    from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from genreward.models.families import family_of

    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    loader = find_spec_loader("pipeline", spec, what="pipeline")
    if loader is not None:
        pipe = loader(spec)
    else:
        pipe = from_pretrained_offline_aware(DiffusionPipeline.from_pretrained, spec, spec, "pipeline", safety_checker=None)
    fam = family_of(pipe, family, spec)
    if fam.kernel == "ddim" and not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if fam.kernel == "flow" and not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise GenrewardError(f"pipeline '{spec}' ({fam.name}) has scheduler {type(pipe.scheduler).__name__}; the flow "
                             "sampler needs FlowMatchEulerDiscreteScheduler")
    if unet is not None:
        cls = type(fam.denoiser)
        setattr(pipe, fam.denoiser_attr, from_pretrained_offline_aware(cls.from_pretrained, unet, unet, cls.__name__))
    pipe.to(torch_device)
    if fam.denoiser.dtype != torch_dtype:
        pipe.to(torch_dtype)
    if lora is not None:
        load_lora(pipe, lora, spec)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    return pipe


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_lora(pipe, lora: str, spec: str = "") -> None:
    """Apply LoRA weights (a folder or ``.safetensors`` file) to ``pipe``; one line when they do not fit.

    Refused: a missing or unreadable file, weights whose shapes differ from this pipeline's layers (a LoRA of
    another model), and weights that name modules this pipeline lacks (diffusers only warns about those and
    loads the rest, which silently gives a half-applied LoRA). diffusers' log lines are kept out of the output.
    """
    path = Path(lora).expanduser()
    if not path.exists():
        raise GenrewardError(f"LoRA weights not found: {lora}")
    target = f"pipeline {spec!r}" if spec else "this pipeline"
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt") as fh:
                    fh.keys()
            except Exception as exc:  # a truncated/overwritten file: the header does not parse
                raise GenrewardError(f"LoRA weights {file} are not a readable safetensors file (damaged or truncated?): "
                                     f"{first_line(exc, 120)}") from None
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    saved = [(lg, lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    for lg in loggers:
        lg.handlers = [collect]  # the warnings become the error below (or are dropped when harmless)
        lg.setLevel(logging.WARNING)
        lg.propagate = False
    try:
        pipe.load_lora_weights(str(path))
    except GenrewardError:
        raise
    except Exception as exc:  # safetensors header errors, size mismatches, "not a LoRA checkpoint"
        text = str(exc)
        if "size mismatch" in text:
            m = re.search(r"size mismatch for (\S+?): copying a param with shape torch.Size\((\[.*?\])\).*?is torch.Size\((\[.*?\])\)", text)
            example = f" (e.g. {m.group(1)}: {m.group(2)} in the file, {m.group(3)} here)" if m else ""
            raise GenrewardError(
                f"LoRA weights {lora} do not fit {target}: their layer shapes differ{example}; a LoRA of another model?"
            ) from None
        raise GenrewardError(f"cannot load LoRA weights {lora} into {target}: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        for lg, level, propagate, handlers in saved:
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = propagate
    unexpected = [m for m in collect.messages if "unexpected keys" in m]
    if unexpected:
        pipe.unload_lora_weights()
        keys = unexpected[0].split(":", 1)[-1].strip().split(",")[0].strip()
        raise GenrewardError(
            f"LoRA weights {lora} do not fit {target}: they name modules it does not have (e.g. {keys}; a LoRA of another model?)"
        )
