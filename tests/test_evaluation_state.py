"""Evaluation leaves rewards as it found them: held-out images never reach a training reward's state."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from genreward.evaluation import evaluate, score_images
from genreward.prompts import PromptItem
from genreward.rewards import RewardOutput, WeightedSum, build
from genreward.schema import SampleConfig

ITEMS = [PromptItem("a cat"), PromptItem("an owl")]
SAMPLE = SampleConfig(num_steps=2, guidance_scale=5.0, eta=1.0, batch_size=4)


class MeanPixel:
    """A stateless image reward (mean brightness); records the context keys it was called with."""

    differentiable = True

    def __init__(self) -> None:
        self.name = "mean_pixel"
        self.contexts: list[dict[str, Any]] = []

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        self.contexts.append(dict(context))
        return RewardOutput(scores=images.float().mean(dim=(1, 2, 3)))


class CountingReward(MeanPixel):
    """A stateful reward that ignores ``update_stats`` (a third-party reward): it counts images seen."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "counting"
        self.seen = 0

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        self.seen += images.shape[0]
        return super().__call__(images, prompts, **context)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])


def _trained_meanstd(per_prompt: bool = True):
    """A meanstd reward after one training batch (with one prompt that is also an eval prompt)."""
    reward = build("meanstd", reward=MeanPixel(), per_prompt=per_prompt)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reward(images, ["a cat", "a cat", "a dog", "a dog"])
    return reward


def test_evaluate_does_not_change_meanstd_statistics(tiny_pipe, tmp_path) -> None:
    """The training reward passed to ``evaluate`` (empty ``eval.rewards``) keeps its running statistics."""
    for per_prompt in (True, False):
        reward = _trained_meanstd(per_prompt)
        before = copy.deepcopy(reward.state_dict())
        out_dir = tmp_path / f"eval_{per_prompt}"
        result = evaluate(tiny_pipe, ITEMS, [reward], out_dir, SAMPLE, images_per_prompt=2, progress=False)
        assert len(result.records) == 4
        assert reward.state_dict() == before
        assert all(ctx.get("update_stats") is False for ctx in reward.inner.contexts[1:])  # 0 = the training call


def test_evaluate_restores_rewards_that_ignore_update_stats(tiny_pipe, tmp_path) -> None:
    """Snapshot/restore also covers stateful rewards that do not know ``update_stats``, alone or in a sum."""
    counting = CountingReward()
    counting(torch.rand(2, 3, 32, 32), ["x", "y"])
    total = WeightedSum([_trained_meanstd(), CountingReward()], [1.0, 0.5], name="total")
    before_total = copy.deepcopy(total.state_dict())
    evaluate(tiny_pipe, ITEMS, [counting, total], tmp_path / "eval", SAMPLE, images_per_prompt=2, progress=False)
    assert counting.seen == 2
    assert total.state_dict() == before_total


def test_score_images_passes_update_stats_false() -> None:
    reward = _trained_meanstd()
    before = copy.deepcopy(reward.state_dict())
    score_images([reward], torch.rand(2, 3, 32, 32), ["a cat", "a bird"], [{}, {}])
    assert reward.state_dict() == before
