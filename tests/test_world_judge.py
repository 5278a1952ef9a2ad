"""The shapes world's judge data (labels agree with the verifier) and the shipped world:shapes-judge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genreward.world import shapes as W
from genreward.world.judge_data import DESCRIBE_QUESTION, rows_for_scene, write_split
from genreward.world.verifier import score


def test_judge_rows_are_balanced_and_negatives_fail_the_verifier() -> None:
    rng = np.random.default_rng(0)
    yes = no = 0
    for sample in W.dataset(90, seed=3):
        rows = rows_for_scene(sample, "x.png", rng)
        assert [r.get("label") for r in rows] == ["yes", "no", None]
        assert rows[2] == {"prompt": DESCRIBE_QUESTION, "image": "x.png", "answer": sample.caption}
        assert score(sample.image, rows[0]["spec"])["pass"]
        assert not score(sample.image, rows[1]["spec"])["pass"], rows[1]["prompt"]
        assert rows[1]["prompt"] != sample.caption
        yes, no = yes + 1, no + 1
    assert yes == no == 90


def test_write_split_is_deterministic(tmp_path: Path) -> None:
    a = write_split(tmp_path / "a", "s", 12, seed=5, split="train", size=32, describe=True, max_noise=0.05)
    b = write_split(tmp_path / "b", "s", 12, seed=5, split="train", size=32, describe=True, max_noise=0.05)
    assert a.read_text() == b.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 36 and all((tmp_path / "a" / r["image"]).is_file() for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("noise, floor", [(0.0, 0.82), (0.05, 0.85)])
def test_shipped_world_judge_accuracy(noise: float, floor: float) -> None:
    """world:shapes-judge on unseen scenes of training-distribution captions (documented in
    weights/shapes_judge/README.md: 89.75 % clean, 92.75 % at σ = 0.05 on 400 questions); the fixed
    120-question subset here must clear ``floor``."""
    from genreward.rewards.vlm_judge import VLMJudge

    judge = VLMJudge(model="world:shapes-judge", normalization="yes_no", batch_size=64)
    assert judge.template.startswith("Does the image show {prompt}?")
    rng = np.random.default_rng([11, 7])
    images, prompts, labels = [], [], []
    for sample in W.dataset(60, seed=11, noise=noise):
        for row in rows_for_scene(sample, "", rng, describe=False):
            images.append(sample.image)
            prompts.append(row["prompt"])
            labels.append(row["label"] == "yes")
    with torch.no_grad():
        p_yes = judge(torch.stack(images), prompts).scores
    accuracy = ((p_yes > 0.5) == torch.tensor(labels)).float().mean().item()
    assert accuracy >= floor, accuracy
