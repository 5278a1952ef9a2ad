"""Reward loss terms on renders: the VLM3D judge term and any other differentiable reward.

Why here and not in ``genreward.rewards``: the rewards themselves are generic (``vlm_judge``,
``clip_score``); what is 3D-specific is how views are arranged for the judge and how a score becomes a
loss that is weighted by a ``lambda_*`` schedule.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from genreward.errors import GenrewardError
from genreward.rewards import build
from genreward.rewards.vlm_judge import MULTIVIEW_CRITERIA, MULTIVIEW_TEMPLATE

ARRANGEMENTS = ("separate", "grid2x2")
FORMS = ("log_odds", "prob")

# the same question as MULTIVIEW_TEMPLATE (docs/algorithms/vlm3d_sds.md §4), worded for one tiled canvas
GRID_TEMPLATE = (
    "This image shows four views of one 3D object in a 2x2 grid. Considering all views together, does the "
    'object (1) match the description "{prompt}", and (2) look geometrically sound and consistent across views '
    '({criteria})? Answer only "Yes" or "No".'
)


def tile_2x2(views: torch.Tensor) -> torch.Tensor:
    """Four views ``[4,3,H,W]`` → one canvas ``[1,3,2H,2W]`` (row-major: views 0 1 / 2 3)."""
    if views.shape[0] != 4:
        raise GenrewardError(f"vlm.arrangement=grid2x2 needs exactly 4 views, got {views.shape[0]}")
    top = torch.cat([views[0], views[1]], dim=-1)
    bottom = torch.cat([views[2], views[3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)[None]


class VLMTerm:
    """loss_vlm from a frozen yes/no VLM judge looking at V views of the object at once.

    ``form``: ``log_odds`` → loss = ℓ_No − ℓ_Yes (VLM3D's default); ``prob`` → loss = p_No − p_Yes with
    (p_Yes, p_No) the softmax over the two logits, i.e. 1 − 2σ(ℓ_Yes − ℓ_No).
    """

    def __init__(
        self,
        model: str = "tiny:qwen2-vl",
        arrangement: str = "separate",
        form: str = "log_odds",
        image_size: int = 256,
        template: str | None = None,
        criteria: str | None = None,
        device: str | torch.device | None = None,
        dtype: str = "fp32",
        judge: Any = None,
    ):
        if arrangement not in ARRANGEMENTS:
            raise GenrewardError(f"vlm.arrangement must be one of {', '.join(ARRANGEMENTS)}, got {arrangement!r}")
        if form not in FORMS:
            raise GenrewardError(f"vlm.form must be one of {', '.join(FORMS)}, got {form!r}")
        self.arrangement, self.form, self.image_size = arrangement, form, int(image_size)
        if template is None:
            template = MULTIVIEW_TEMPLATE if arrangement == "separate" else GRID_TEMPLATE
        self.judge = judge if judge is not None else build(
            "vlm_judge", model=model, normalization="log_odds" if form == "log_odds" else "yes_no",
            template=template, criteria=criteria if criteria is not None else MULTIVIEW_CRITERIA,
            device=device, dtype=dtype,
        )

    def judge_input(self, views: torch.Tensor) -> torch.Tensor:
        """Renders ``[V,3,H,W]`` → the judge's input: ``[1,V,3,S,S]`` (separate) or ``[1,3,2S,2S]`` (grid2x2)."""
        x = views.clamp(0.0, 1.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x[None] if self.arrangement == "separate" else tile_2x2(x)

    def __call__(self, views: torch.Tensor, prompt: str) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss_vlm scalar with graph to ``views``, detached details)."""
        out = self.judge(self.judge_input(views), [prompt])
        score = out.scores[0]
        loss = -score if self.form == "log_odds" else 1.0 - 2.0 * score
        details = {"vlm_log_odds": float(out.details["log_odds"][0]), "vlm_p_yes": float(out.details["p_yes"][0])}
        return loss, details


class RewardTerm:
    """loss_<label> = −mean(score) of any differentiable registered reward on the training renders."""

    def __init__(self, name: str, options: dict[str, Any] | None = None, label: str | None = None):
        self.reward = build(name, **(options or {}))
        self.label = label or name
        if not getattr(self.reward, "differentiable", False):
            raise GenrewardError(f"reward {name!r} is not differentiable; sds3d reward terms need gradients to the renders")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.reward(images.clamp(0.0, 1.0), list(prompts))
        return -out.scores.mean(), {f"{self.label}_score": float(out.scores.detach().mean())}
