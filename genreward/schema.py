"""Config sections shared by every command (evaluation, training): model, sampler, evaluation, rewards.

Each trainer's config embeds these sections, so ``model.pipeline=...`` or ``sample.num_steps=...`` mean the
same thing everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from genreward.rewards.base import RewardSpec


@dataclass
class ModelConfig:
    """Which pipeline to load and where. ``pipeline``: hub id, local folder or a spec (``tiny:sd``, ``tiny:sd3``,
    ``tiny:flux``, ``tiny:sdxl``, ``random:...``). ``family`` overrides the family detected from the pipeline class."""

    pipeline: str = "tiny:sd"
    family: Literal["sd", "sdxl", "sd3", "flux"] | None = None
    device: str = "auto"  # auto = CUDA when present, else CPU
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    lora: str | None = None  # fine-tuned LoRA weights (folder or .safetensors) applied on load
    unet: str | None = None  # a full fine-tuned U-Net folder that replaces the pipeline's


@dataclass
class SampleConfig:
    """Sampling: steps, guidance, stochasticity and image size.

    ``eta`` is DDIM's η (SD, SDXL). Flow families (SD3, FLUX) use ``noise_level`` (Flow-GRPO's a, default 0.7;
    0 = the deterministic Euler sampler), ``flow_kernel`` (sde | cps | dance) and ``sde_window`` ([start, size]: only
    those steps are stochastic, Flow-GRPO-Fast; null = all). FLUX takes ``guidance_scale`` as its guidance embedding.
    """

    num_steps: int = 50
    guidance_scale: float = 5.0  # classifier-free guidance weight w >= 0; w <= 1 switches guidance off
    eta: float = 1.0
    negative_prompt: str = ""
    batch_size: int = 8
    height: int | None = None  # None = the U-Net's native size; a multiple of VAE factor × U-Net downsampling (64 for SD)
    width: int | None = None
    logprob_reduction: Literal["mean", "sum"] = "mean"
    noise_level: float = 0.7
    flow_kernel: Literal["sde", "cps", "dance"] = "sde"
    sde_window: list[int] | None = None

    def __post_init__(self) -> None:
        if self.noise_level < 0 or not math.isfinite(self.noise_level):
            raise ValueError(f"key 'sample.noise_level' must be >= 0, got {self.noise_level}")
        if self.sde_window is not None and (len(self.sde_window) != 2 or min(self.sde_window) < 0):
            raise ValueError(f"key 'sample.sde_window' must be [start, size] with both >= 0, got {self.sde_window}")
        if self.num_steps < 1:
            raise ValueError(f"key 'sample.num_steps' must be >= 1, got {self.num_steps}")
        if self.batch_size < 1:
            raise ValueError(f"key 'sample.batch_size' must be >= 1, got {self.batch_size}")
        if self.eta < 0:
            raise ValueError(f"key 'sample.eta' must be >= 0, got {self.eta}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"key 'sample.guidance_scale' must be >= 0 (1 or less switches classifier-free guidance off), "
                             f"got {self.guidance_scale}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"key 'sample.{name}' must be a positive number of pixels or null (the model's native size), "
                                 f"got {value}")


@dataclass
class PromptsConfig:
    """A prompt set: a file path or the name of a set shipped in ``prompts/``."""

    path: str = "animals"
    column: str | None = None  # for .csv/.tsv/.jsonl: which column holds the prompt
    limit: int | None = None  # use only the first N prompts (after ``where``)
    where: dict[str, Any] | None = None  # keep prompts whose metadata matches, e.g. {type: single}; a list = any of


@dataclass
class EvalSection:
    """Evaluation: N images per prompt of a prompt set, scored by every listed reward."""

    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    images_per_prompt: int = 4
    seed: int = 0
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="jpeg_compressibility")])
    eta: float | None = None  # None = use sample.eta
    gallery: bool = True

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ValueError(f"key 'eval.images_per_prompt' must be >= 1, got {self.images_per_prompt}")


@dataclass
class EvalConfig:
    """``genreward eval CONFIG``: evaluate a pipeline on a prompt set."""

    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalSection = field(default_factory=EvalSection)
