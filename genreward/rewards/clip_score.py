"""CLIPScore: how well an image matches its prompt, as a differentiable reward.

score = ``scale`` · cos(CLIP image embedding, CLIP text embedding of the prompt). The CLIPScore paper
(Hessel et al., 2021) reports 2.5·max(cos, 0) and many later papers 100·max(cos, 0); the default here is
the plain cosine in [-1, 1] (``scale=1``), whose gradient does not vanish for poorly matching images.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genreward.errors import GenrewardError
from genreward.models.clip import ClipModel, TextEmbeddingCache, load_clip
from genreward.rewards.base import RewardOutput, check_batch, register


class PromptImageCosine:
    """``scale`` · cos(image embedding, prompt embedding) under a frozen CLIP, with a prompt-embedding cache."""

    differentiable = True

    def __init__(self, name: str, clip: ClipModel, scale: float = 1.0):
        self.name = name
        self.clip = clip
        self.scale = float(scale)
        self._texts = TextEmbeddingCache(self.clip)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised, gradient-free text embeddings ``[B, D]``, cached per prompt."""
        return self._texts(prompts)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        check_batch(self.name, images, prompts)
        if images.shape[0] == 0:
            empty = torch.zeros(0, device=images.device)
            return RewardOutput(scores=empty, details={"cosine": empty})
        texts = self.text_embeddings(list(prompts))
        # Build a graph only when someone will differentiate through the scores.
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            image_emb = self.clip.embed_images(images.to(self.clip.device))
            cosine = (image_emb * texts.to(image_emb.device)).sum(dim=-1)
            scores = (self.scale * cosine).to(device=images.device, dtype=torch.float32)
        return RewardOutput(scores=scores, details={"cosine": cosine.detach().to(images.device, torch.float32)})


# ----------------------------------------------------------------------------------------------- HPSv2


@register("clip_score")
class ClipScore(PromptImageCosine):
    """Prompt–image cosine similarity under a frozen CLIP; gradients flow to the pixels only."""

    def __init__(
        self,
        model: str = "tiny:clip",
        backend: str = "auto",
        device: str | torch.device | None = None,
        dtype: str = "fp32",
        scale: float = 1.0,
    ):
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise GenrewardError(f"clip_score option scale must be a number, got {scale!r}") from None
        super().__init__("clip_score", load_clip(model, backend=backend, device=device, dtype=dtype), scale)
