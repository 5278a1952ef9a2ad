"""Loading the project-trained models of the shapes world (``world:shapes-t2i``, ``world:shapes-clip``,
``world:shapes-judge``).

Their weights ship inside the package (``genreward/world/weights/``, fp16 safetensors to stay small) so
they are found offline after ``pip install .``; they load back in fp32 and are then moved by the caller.

Importing this module registers the three specs with :mod:`genreward.registry`, so ``load_pipeline``,
``load_clip`` and ``load_vlm`` find them; the registry imports ``genreward.world.plugin`` by name the first time it
meets an unknown prefix such as ``world:``, so callers need not import this module themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from genreward.errors import GenrewardError
from genreward.registry import register_spec

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
T2I_SPECS = ("world:shapes-t2i",)
CLIP_SPECS = ("world:shapes-clip",)
JUDGE_SPECS = ("world:shapes-judge",)  # the shapes world's judge VLM (genreward's own folder format)


def t2i_folder() -> Path:
    """Folder of the shipped ``world:shapes-t2i`` components."""
    return WEIGHTS_DIR / "shapes_t2i"


def clip_folder() -> Path:
    """Folder of the shipped ``world:shapes-clip`` (a transformers ``CLIPModel`` folder)."""
    return WEIGHTS_DIR / "shapes_clip"


def judge_folder() -> Path:
    """Folder of the shipped ``world:shapes-judge`` (a ``save_genreward_vlm`` folder)."""
    return WEIGHTS_DIR / "shapes_judge"


def t2i_defaults(folder: str | Path | None = None) -> dict[str, Any]:
    """The sampling defaults the model was measured with (steps, guidance scale, η, size)."""
    meta = Path(folder or t2i_folder()) / "world_model.json"
    return dict(json.loads(meta.read_text())["defaults"])


def load_world_t2i(folder: str | Path | None = None):
    """A ``StableDiffusionPipeline`` from the world model's component folders, fp32 on CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from genreward.models.tokenizers import build_clip_tokenizer

    root = Path(folder or t2i_folder())
    meta_path = root / "world_model.json"
    if not meta_path.is_file():
        raise GenrewardError(f"world text-to-image weights not found in {root} (no world_model.json)")
    meta = json.loads(meta_path.read_text())
    f32 = torch.float32
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(root / "vae", torch_dtype=f32),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=f32),
        tokenizer=build_clip_tokenizer(model_max_length=int(meta["tokenizer"]["model_max_length"])),
        unet=UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=f32),
        scheduler=DDIMScheduler.from_pretrained(root / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_world_clip(folder: str | Path | None = None):
    """The world CLIP (a transformers ``CLIPModel`` folder) as a frozen ``ClipModel``, fp32 on CPU.

    The folder has no tokenizer files (they would double its size), so CLIP's offline BPE is built here;
    transformers would otherwise make a tokenizer with an empty vocabulary from ``config.json`` alone.
    """
    from transformers import CLIPModel

    from genreward.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipModel
    from genreward.models.tokenizers import build_clip_tokenizer

    root = Path(folder or clip_folder())
    if not (root / "config.json").is_file():
        raise GenrewardError(f"world CLIP weights not found in {root} (no config.json)")
    model = CLIPModel.from_pretrained(root, torch_dtype=torch.float32)
    context = int(model.config.text_config.max_position_embeddings)
    size = int(model.config.vision_config.image_size)
    spec = CLIP_SPECS[0] if folder is None else str(root)
    return ClipModel(model, build_clip_tokenizer(model_max_length=context), "transformers", size,
                     OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, context_length=context, spec=spec)


def load_world_judge(folder: str | Path | None = None):
    """The world judge VLM as ``(model, processor, info)``, fp32 on CPU (``load_vlm`` freezes and moves it)."""
    from genreward.models.vlm import GENREWARD_VLM_FILE, load_genreward_vlm

    root = Path(folder or judge_folder())
    if not (root / GENREWARD_VLM_FILE).is_file():
        raise GenrewardError(f"VLM {JUDGE_SPECS[0]!r}: its weights are missing from {root}")
    model, processor, info = load_genreward_vlm(root)
    if folder is None:
        info.spec = JUDGE_SPECS[0]
    return model, processor, info


# ------------------------------------------------------------------------- spec loaders (genreward.registry)


@register_spec("pipeline", *T2I_SPECS)
def _t2i_spec(spec: str):
    return load_world_t2i()


@register_spec("clip", *CLIP_SPECS)
def _clip_spec(spec: str, backend: str, device: torch.device, dtype: torch.dtype):
    from genreward.models.clip import check_backend

    check_backend(spec, backend, "transformers")
    return load_world_clip().to(device=device, dtype=dtype)


@register_spec("vlm", *JUDGE_SPECS)
def _judge_spec(spec: str, device: torch.device, dtype: torch.dtype):
    return load_world_judge()
