"""Judge (reward-model) training: pure losses, data errors, a learnable toy task, resume, and the
round trip trained judge → ``vlm_judge`` reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genreward.config import config_from_dict
from genreward.errors import GenrewardError
from trainers import get_trainer
from trainers.losses_judge import pairwise_judge_loss, pointwise_bt_loss, yes_no_ce
from trainers.reward_model import RewardModelConfig, load_judge_rows, majority_baseline

# ------------------------------------------------------------------------------------------- losses


def test_yes_no_ce_values_and_gradient() -> None:
    y = torch.tensor([2.0, 0.0], requires_grad=True)
    n = torch.tensor([0.0, 0.0])
    loss = yes_no_ce(y, n, torch.tensor([1, 1]))
    expected = 0.5 * (math.log1p(math.exp(-2.0)) + math.log(2.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert (y.grad < 0).all()  # raising ℓ_yes lowers the loss for a "yes" target
    # full-vocabulary CE = logsumexp − ℓ_target
    lse = torch.tensor([3.0, 1.0])
    full = yes_no_ce(torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0]), torch.tensor([1, 0]), lse)
    assert full.item() == pytest.approx(0.5 * ((3.0 - 2.0) + (1.0 - (-1.0))))


def test_pairwise_loss_both_orders_symmetric() -> None:
    # a judge that answers the same for both orders (position bias) pays log 2 per pair on average …
    y, n = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    label = torch.tensor([1.0, 0.0])
    biased = pairwise_judge_loss(y, n, label)
    assert biased.item() == pytest.approx(0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))))
    # … and swapping which order is labelled "yes" (with the logits swapped too) gives the same loss.
    swapped = pairwise_judge_loss(y.flip(0), n.flip(0), label.flip(0))
    assert swapped.item() == pytest.approx(biased.item())
    consistent = pairwise_judge_loss(torch.tensor([1.0, -1.0]), torch.zeros(2), label)
    assert consistent < biased


def test_pointwise_bt_loss() -> None:
    s = torch.tensor([0.3, -1.2])
    assert pointwise_bt_loss(s, s.clone(), ce_weight=0.0).item() == pytest.approx(math.log(2.0))
    sc = torch.tensor([1.0], requires_grad=True)
    sr = torch.tensor([0.0], requires_grad=True)
    loss = pointwise_bt_loss(sc, sr, ce_weight=0.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    loss.backward()
    assert sc.grad.item() < 0 < sr.grad.item()  # decreasing in s_w − s_l
    gaps = [pointwise_bt_loss(torch.tensor([d]), torch.tensor([0.0]), ce_weight=0.1).item() for d in (-1.0, 0.0, 1.0, 3.0)]
    assert gaps == sorted(gaps, reverse=True)
    with_ce = pointwise_bt_loss(torch.tensor([0.0]), torch.tensor([0.0]), ce_weight=0.1).item()
    assert with_ce == pytest.approx(math.log(2.0) + 0.1 * 2 * math.log(2.0))


# ------------------------------------------------------------------------------------------- data


def _colour_image(path: Path, rgb: tuple[int, int, int], rng: np.random.Generator) -> str:
    noise = rng.integers(-20, 21, size=(32, 32, 3))
    arr = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def _red_blue(folder: Path, n: int, seed: int) -> Path:
    """Pointwise rows: all-red / all-blue images, "is the image red?"."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        red = i % 2 == 0
        img = _colour_image(folder / f"{i}.png", (220, 30, 30) if red else (30, 30, 220), rng)
        rows.append({"prompt": "is the image red?", "image": img, "label": "yes" if red else "no"})
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_image_and_bad_label_errors(tmp_path: Path) -> None:
    good = _colour_image(tmp_path / "a.png", (255, 0, 0), np.random.default_rng(0))
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "image": good, "label": "yes"}) + "\n"
                   + json.dumps({"prompt": "p", "image": str(tmp_path / "nope.png"), "label": "no"}) + "\n")
    with pytest.raises(GenrewardError) as err:
        load_judge_rows(bad, "pointwise")
    msg = str(err.value)
    assert "\n" not in msg and f"{bad}:2" in msg and "nope.png" in msg
    bad.write_text(json.dumps({"prompt": "p", "image": good, "label": "maybe"}) + "\n")
    with pytest.raises(GenrewardError, match=r"rows.jsonl:1: label must be"):
        load_judge_rows(bad, "pointwise")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": good, "rejected": "missing.png"}) + "\n")
    with pytest.raises(GenrewardError, match=r"pairs.jsonl:1: image file not found: .*missing.png"):
        load_judge_rows(pairs, "pairwise")


def test_majority_baseline() -> None:
    train = [{"prompt": "a", "label": 1}] * 3 + [{"prompt": "a", "label": 0}] + [{"prompt": "b", "label": 0}] * 2
    test = [{"prompt": "a", "label": 1}, {"prompt": "a", "label": 0}, {"prompt": "b", "label": 0}, {"prompt": "c", "label": 1}]
    assert majority_baseline(train, test) == pytest.approx(3 / 4)  # unseen "c" → overall majority (1)


# ------------------------------------------------------------------------------------------- training


def _config(tmp_path: Path, train: Path, eval_: Path, **train_overrides) -> RewardModelConfig:
    data = {
        "trainer": "reward_model", "output_dir": str(tmp_path / "run"), "model": "tiny:qwen2-vl",
        "data": {"train": str(train), "eval": str(eval_)},
        "train": {"objective": "pointwise", "lr": 3e-3, "vision_lr_scale": 1.0, "epochs": 6, "batch_size": 8,
                  "eval_every": 0, "seed": 0, "device": "cpu", **train_overrides},
        "checkpoint": {"every_epochs": 3},
    }
    cls, _ = get_trainer("reward_model")
    return config_from_dict(data, cls)


@pytest.mark.slow
def test_trains_red_blue_resumes_and_round_trips(tmp_path: Path) -> None:
    from genreward.images import load_images
    from genreward.rewards.vlm_judge import VLMJudge

    train_path = _red_blue(tmp_path / "train", 32, seed=0)
    eval_path = _red_blue(tmp_path / "eval", 16, seed=1)
    _, train = get_trainer("reward_model")
    config = _config(tmp_path, train_path, eval_path)
    result = train(config)
    assert result["majority_baseline"] == pytest.approx(0.5)
    assert result["heldout_accuracy"] > 0.9, result
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "heldout_accuracy" in records[0]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_12", "step_24"]

    # the saved judge is the vlm_judge reward: same P(yes) as the trained weights give inside the trainer
    rows = load_judge_rows(eval_path, "pointwise")
    images = load_images([r["image"] for r in rows])
    reward = VLMJudge(model=result["judge_dir"], normalization="yes_no")
    scores = reward(images, [r["prompt"] for r in rows]).scores
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
    assert ((scores > 0.5) == labels).float().mean().item() > 0.9

    # resume from the step-12 checkpoint: continues to step 24 and ends with the same weights
    resumed_dir = tmp_path / "resumed"
    resumed_cfg = _config(tmp_path, train_path, eval_path)
    resumed_cfg.output_dir = str(resumed_dir)
    resumed_cfg.checkpoint.resume_from = str(tmp_path / "run" / "checkpoints" / "step_12")
    again = train(resumed_cfg)
    assert again["step"] == 24
    reward2 = VLMJudge(model=again["judge_dir"], normalization="yes_no")
    torch.testing.assert_close(reward2(images, [r["prompt"] for r in rows]).scores, scores, atol=1e-5, rtol=1e-4)


def test_saved_judge_scores_equal_trained_model(tmp_path: Path) -> None:
    """Short LoRA run; the merged saved judge reproduces the in-trainer logits exactly."""
    from genreward.images import load_images
    from genreward.rewards.vlm_judge import VLMJudge
    import trainers.reward_model as rm

    train_path = _red_blue(tmp_path / "train", 8, seed=0)
    eval_path = _red_blue(tmp_path / "eval", 4, seed=1)
    config = _config(tmp_path, train_path, eval_path, trainable="lora", epochs=1, batch_size=4)
    captured: dict = {}
    original = rm.save_judge

    def capture(judge, peft_model, folder):
        rows = load_judge_rows(eval_path, "pointwise")
        with torch.no_grad():
            captured["scores"] = judge(load_images([r["image"] for r in rows]), [r["prompt"] for r in rows]).scores
        return original(judge, peft_model, folder)

    rm.save_judge = capture
    try:
        result = rm.train(config)
    finally:
        rm.save_judge = original
    rows = load_judge_rows(eval_path, "pointwise")
    reward = VLMJudge(model=result["judge_dir"])
    scores = reward(load_images([r["image"] for r in rows]), [r["prompt"] for r in rows]).scores
    torch.testing.assert_close(scores, captured["scores"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(scores, VLMJudge(model="tiny:qwen2-vl")(load_images([r["image"] for r in rows]),
                                                                     [r["prompt"] for r in rows]).scores)


def test_easyvqa_config_parses() -> None:
    from genreward.config import read_yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "judge_easyvqa.yaml"
    cls, _ = get_trainer(read_yaml(path)["trainer"])
    config = config_from_dict(read_yaml(path), cls, source=str(path))
    assert config.train.objective == "pointwise" and config.data.image_size == 112
