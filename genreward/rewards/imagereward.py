"""ImageReward (Xu et al., 2023): a BLIP model fine-tuned on 137k expert rankings of prompt–image pairs.

This is an adapter to the ``image-reward`` package (import name ``ImageReward``), which is not a
dependency of genreward: version 1.5 pins ``timm==0.6.13`` (open_clip needs timm ≥ 1.0.17), pulls in
``datasets``/``pandas``/``pyarrow``/``fairscale``, and imports transformers internals
(``transformers.modeling_utils.apply_chunking_to_forward``) that recent transformers releases no longer
have, so it belongs in an environment made for it. Without it, ``build("image_reward")`` is a one-line
error with the pip command.

Score: the package's own standardised reward, (raw − 0.167) / 1.033 with its fixed constants, typically
within −2 … 2 (higher is better; not bounded). Differentiable: the images go through the
same torch preprocessing as the package's ReFL trainer (bicubic resize of the shorter side to 224, centre
crop, CLIP mean/std) and its ``score_gard`` method, so gradients reach the pixels; the BLIP weights are
frozen.

``RM.load("ImageReward-v1.0")`` fetches ``ImageReward.pt`` (BLIP ViT-L + BERT weights) and ``med_config.json`` from hub
repository ``THUDM/ImageReward`` into ``~/.cache/ImageReward``, and BLIP's ``bert-base-uncased``
tokenizer; ``model=`` also takes a local checkpoint file, ``med_config=`` a local config.
"""

from __future__ import annotations

import importlib
from typing import Any, NoReturn, Sequence

import torch
import torch.nn.functional as F

from genreward.errors import GenrewardError, OfflineModelError
from genreward.images import check_images
from genreward.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from genreward.models.device import resolve_device
from genreward.models.hub import hub_offline
from genreward.rewards.base import RewardOutput, check_batch, register

PACKAGE = "image-reward"
MODULE = "ImageReward"
DEFAULT_MODEL = "ImageReward-v1.0"
HUB_REPO = "THUDM/ImageReward"
IMAGE_SIZE = 224
MAX_PROMPT_TOKENS = 35  # what the package pads/truncates prompts to


def import_image_reward() -> Any:
    """The ``ImageReward`` module, or a one-line error: not installed, or installed but not importable here."""
    try:
        return importlib.import_module(MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in (None, MODULE):
            _broken(exc)
        raise GenrewardError(
            f"reward 'image_reward' needs the package {PACKAGE}, which is not installed: pip install {PACKAGE} "
            f"(it pins timm==0.6.13 and needs an older transformers, so install it in a separate environment)"
        ) from None
    except Exception as exc:  # ImportError from its own imports (timm / transformers internals), or worse
        _broken(exc)


def _broken(exc: BaseException) -> NoReturn:
    """Say that the package is there but unusable, so nobody reinstalls it expecting a different result."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    raise GenrewardError(
        f"reward 'image_reward': the {PACKAGE} package is installed but cannot be imported "
        f"({type(exc).__name__}: {first}); it needs timm==0.6.13 and an older transformers, "
        f"so install it in an environment made for it"
    ) from None


def preprocess(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[B,3,H,W]`` in [0,1] → ``[B,3,224,224]`` normalised like the package (shorter side 224, centre crop, CLIP mean/std)."""
    x = check_images(images).float()
    h, w = x.shape[-2:]
    target = (size, max(size, int(size * w / h))) if h <= w else (max(size, int(size * h / w)), size)
    if (h, w) != target:
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
    top, left = round((target[0] - size) / 2.0), round((target[1] - size) / 2.0)
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@register("image_reward")
class ImageRewardScore:
    """ImageReward-v1.0 through the ``image-reward`` package; standardised scores (typically −2 … 2), differentiable."""

    differentiable = True

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        med_config: str | None = None,
        download_root: str | None = None,
        device: str | torch.device | None = None,
    ):
        rm = import_image_reward()
        self.name = "image_reward"
        self.device = resolve_device(device)
        try:
            self.model = rm.load(model, device=self.device, download_root=download_root, med_config=med_config)
        except GenrewardError:
            raise
        except Exception as exc:  # hub errors, a missing file, a bad checkpoint: all one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            error = OfflineModelError if hub_offline() or isinstance(exc, (OSError, ConnectionError)) else GenrewardError
            raise error(
                f"image_reward: cannot load {model!r} ({type(exc).__name__}: {first}); it needs {HUB_REPO}/ImageReward.pt, "
                f"{HUB_REPO}/med_config.json and the bert-base-uncased tokenizer, or a local checkpoint as option model=<file>"
            ) from None
        if not callable(getattr(self.model, "score_gard", None)):
            raise GenrewardError(f"image_reward: this {PACKAGE} version has no score_gard method; install image-reward>=1.5")
        self.model.eval().requires_grad_(False)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        check_batch("image_reward", images, prompts)
        if images.shape[0] == 0:
            return RewardOutput(scores=torch.zeros(0, device=images.device))
        tokens = self.model.blip.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )
        # Build a graph only when someone will differentiate through the scores.
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            pixels = preprocess(images.to(self.device))
            rewards = self.model.score_gard(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device), pixels)
            scores = rewards.reshape(images.shape[0]).to(device=images.device, dtype=torch.float32)
        return RewardOutput(scores=scores)


__all__ = ["ImageRewardScore", "import_image_reward"]
