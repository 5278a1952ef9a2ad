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
        "checkpoint": {"every": 12},  # steps: 3 epochs of 32 rows in batches of 8
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
    config.logging.trackers = ["tensorboard"]  # the policy trainers' accelerate set-up and trackers
    result = train(config)
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    assert result["majority_baseline"] == pytest.approx(0.5)
    assert result["heldout_accuracy"] > 0.9, result
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "heldout_accuracy" in records[0]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-12", "checkpoint-24"]
    assert (tmp_path / "run" / "config.yaml").is_file()

    # the saved judge is the vlm_judge reward: same P(yes) as the trained weights give inside the trainer
    rows = load_judge_rows(eval_path, "pointwise")
    images = load_images([r["image"] for r in rows])
    reward = VLMJudge(model=result["judge_dir"], normalization="yes_no")
    scores = reward(images, [r["prompt"] for r in rows]).scores
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
    assert ((scores > 0.5) == labels).float().mean().item() > 0.9

    # resume from the step-12 checkpoint: continues to step 24 and ends with exactly the same weights
    from safetensors.torch import load_file

    resumed_dir = tmp_path / "resumed"
    resumed_cfg = _config(tmp_path, train_path, eval_path)
    resumed_cfg.output_dir = str(resumed_dir)
    resumed_cfg.checkpoint.resume_from = str(tmp_path / "run" / "checkpoints" / "checkpoint-12")
    again = train(resumed_cfg)
    assert again["step"] == 24 and again["loss"] == result["loss"]
    a = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-24" / "model.safetensors"))
    b = load_file(str(resumed_dir / "checkpoints" / "checkpoint-24" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reward2 = VLMJudge(model=again["judge_dir"], normalization="yes_no")
    assert torch.equal(reward2(images, [r["prompt"] for r in rows]).scores, scores)


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

    def capture(judge, peft_model, folder, **kwargs):
        rows = load_judge_rows(eval_path, "pointwise")
        with torch.no_grad():
            captured["scores"] = judge(load_images([r["image"] for r in rows]), [r["prompt"] for r in rows]).scores
        return original(judge, peft_model, folder, **kwargs)

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
    assert config.model == "tiny:llava-effnet" and config.train.freeze_vision_tower
    assert config.train.objective == "pointwise" and config.train.lr_schedule == "cosine"


@pytest.mark.slow
def test_easyvqa_short_run_beats_question_prior(tmp_path: Path) -> None:
    """Real data: the shipped recipe (frozen EfficientNet tower + free-form answers) trained for 1,200 steps
    clears the question-prior baseline by a clear margin on held-out easy-vqa questions (the 3,000-step
    run's numbers are in docs/judges.md)."""
    pytest.importorskip("easy_vqa")
    from genreward.config import load_config
    from genreward.data.easyvqa import convert

    data = convert(tmp_path / "data", auxiliary=True, open_answers=True)
    test_rows = (tmp_path / "data" / "test.jsonl").read_text().splitlines()
    (tmp_path / "data" / "test.jsonl").write_text("\n".join(test_rows[:1500]) + "\n")
    path = Path(__file__).resolve().parents[1] / "configs" / "judge_easyvqa.yaml"
    cls, train = get_trainer("reward_model")
    config = load_config(path, cls, [f"output_dir={tmp_path / 'run'}", f"data.train={data['train']}",
                                     f"data.eval={tmp_path / 'data' / 'test.jsonl'}", "train.max_steps=1200",
                                     "train.eval_every=0", "data.eval_subset=null"])
    result = train(config)
    assert result["majority_baseline"] > 0.75  # the question prior is strong on this subset too
    assert result["heldout_accuracy"] >= result["majority_baseline"] + 0.05, result


# ------------------------------------------------------------------------- free-form answers, rationales


def test_answer_tokens_ce_matches_manual_and_masks() -> None:
    from trainers.losses_judge import answer_tokens_ce

    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 4, 0], [2, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = answer_tokens_ce(logits, targets, mask)
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([-(logp[0, 0, 1] + logp[0, 1, 4]) / 2, -logp[1, 0, 2]])
    torch.testing.assert_close(got, expected)
    assert answer_tokens_ce(logits, targets, torch.zeros_like(mask)).abs().max() == 0


def test_continuation_logits_are_teacher_forced_next_tokens() -> None:
    """Position j of a continuation predicts its token j: j=0 is the plain first-answer logits, j=1 equals
    the first-answer logits of the query with token 0 appended — an off-by-one would fail both."""
    from genreward.models.vlm import encode_query, next_token_logits
    from genreward.rewards.vlm_judge import VLMJudge

    judge = VLMJudge(model="tiny:qwen2-vl")
    images = torch.rand(2, 3, 56, 56)
    units = judge._image_units(images)
    queries = [([units[0]], "what colour?"), ([units[1]], "what shape?")]
    conts = [[judge.yes_id, judge.no_id], [judge.no_id]]
    with torch.no_grad():
        got = judge.answer_logits(queries, continuations=conts)
        plain = judge.answer_logits(queries)[:, 0]
        seq = encode_query(judge.processor, judge.info, 1, "what colour?", [units[0][2]]) + [judge.yes_id]
        appended = next_token_logits(judge.model, judge.info, [seq], units[0][0], units[0][1][None], judge.pad_id)[0, 0]
    assert got.shape[:2] == (2, 2)
    torch.testing.assert_close(got[:, 0], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, 1], appended, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0, 1], got[0, 0])


def test_open_answer_and_rationale_rows(tmp_path: Path) -> None:
    img = _colour_image(tmp_path / "a.png", (255, 0, 0), np.random.default_rng(0))
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "is it red?", "image": img, "label": "yes", "rationale": "it is red"}) + "\n"
                    + json.dumps({"prompt": "what colour is it?", "image": img, "answer": "red"}) + "\n")
    rows = load_judge_rows(path, "pointwise")
    assert rows[0]["rationale"] == "it is red" and rows[0]["label"] == 1 and rows[1]["answer"] == "red"
    assert majority_baseline([r for r in rows if "label" in r], [rows[0]]) == 1.0
    path.write_text(json.dumps({"prompt": "what?", "image": img, "answer": " "}) + "\n")
    with pytest.raises(GenrewardError, match=r"rows.jsonl:1: 'answer' must be a non-empty string"):
        load_judge_rows(path, "pointwise")
    path.write_text(json.dumps({"prompt": "what?", "image": img}) + "\n")
    with pytest.raises(GenrewardError, match=r"rows.jsonl:1: missing 'label' .* or a free-form 'answer'"):
        load_judge_rows(path, "pointwise")


def test_mixed_batch_loss_has_gradients_from_every_row_kind(tmp_path: Path) -> None:
    import trainers.reward_model as rm
    from genreward.rewards.vlm_judge import VLMJudge

    img = _colour_image(tmp_path / "a.png", (255, 0, 0), np.random.default_rng(0))
    cfg = rm.RewardTrainSection()
    judge = VLMJudge(model="tiny:qwen2-vl")
    rm._make_trainable(judge, cfg)
    images = rm._ImageCache(None)
    kinds = {
        "label": [{"prompt": "is it red?", "image": img, "label": 1}],
        "rationale": [{"prompt": "is it red?", "image": img, "label": 1, "rationale": "it is red"}],
        "answer": [{"prompt": "what colour is it?", "image": img, "answer": "red"}],
    }
    losses = {}
    for kind, rows in kinds.items():
        judge.model.zero_grad()
        loss = rm.batch_loss(judge, rows, images, cfg)
        loss.backward()
        losses[kind] = float(loss.detach())
        assert math.isfinite(losses[kind]) and losses[kind] > 0
        grad = judge.model.lm_head.weight.grad
        assert grad is not None and grad.abs().sum() > 0, kind
    assert losses["rationale"] > losses["label"]  # the rationale tokens add their own CE
    mixed = rm.batch_loss(judge, kinds["label"] + kinds["answer"], images, cfg)
    assert float(mixed.detach()) == pytest.approx((losses["label"] + losses["answer"]) / 2, rel=1e-4)


# ------------------------------------------------------------------ LLaVA judge with an EfficientNet tower


def test_llava_effnet_judge_round_trip_and_frozen_tower(tmp_path: Path) -> None:
    import trainers.reward_model as rm
    from genreward.models.vlm import save_genreward_vlm
    from genreward.rewards.vlm_judge import VLMJudge

    judge = VLMJudge(model="tiny:llava-effnet", normalization="yes_no")
    cfg = rm.RewardTrainSection(freeze_vision_tower=True)
    rm._make_trainable(judge, cfg)
    tower = judge.model.model.vision_tower
    bn = [m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn)  # ImageNet statistics are never overwritten
    assert not any(p.requires_grad for p in tower.parameters())
    assert tower.feature_cache == {}  # frozen features are encoded once per distinct image
    assert all(p.requires_grad for p in judge.model.model.multi_modal_projector.parameters())
    with torch.no_grad():
        for p in judge.model.model.multi_modal_projector.parameters():
            p.add_(0.05)  # "trained" weights differ from the fixed-seed build
    judge.model.eval()
    images = torch.rand(3, 3, 64, 64)
    prompts = ["is there a red shape?"] * 3
    with torch.no_grad():
        before = judge(images, prompts).scores
    folder = save_genreward_vlm(judge.model, judge.info, tmp_path / "judge")
    loaded = VLMJudge(model=str(folder), normalization="yes_no")
    with torch.no_grad():
        after = loaded(images, prompts).scores
        fresh = VLMJudge(model="tiny:llava-effnet", normalization="yes_no")(images, prompts).scores
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(fresh, before)
    # the cached features (filled by the first call) equal freshly computed ones
    assert len(tower.feature_cache) == 3
    tower.feature_cache = None
    with torch.no_grad():
        uncached = judge(images, prompts).scores
    torch.testing.assert_close(uncached, before, atol=1e-6, rtol=1e-5)
    # a frozen packaged tower is left out of the folder and rebuilt from its package on load
    slim = save_genreward_vlm(judge.model, judge.info, tmp_path / "slim", omit_packaged_tower=True)
    assert (slim / "model.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size / 5
    with torch.no_grad():
        torch.testing.assert_close(VLMJudge(model=str(slim), normalization="yes_no")(images, prompts).scores,
                                   before, atol=1e-6, rtol=1e-5)
    (folder / "genreward_vlm.json").write_text('{"base": "tiny:nope"}')
    with pytest.raises(GenrewardError, match="unknown base 'tiny:nope'"):
        VLMJudge(model=str(folder))


def test_frozen_tower_feature_cache_is_filled_once_in_a_fixed_order(tmp_path: Path) -> None:
    """Resume exactness with a frozen tower: the cache keeps each image's features from the batch they were first
    encoded in, and with 2+ threads a convolution's bits depend on that batch. Filled lazily, a resumed run
    (empty cache, another epoch's order) got other bits than the uninterrupted one and its loss drifted in the
    7th digit. ``prefill_feature_cache`` encodes every image up front in file order, so training never encodes
    again and a batch's loss does not depend on what ran before it."""
    import trainers.reward_model as rm
    from genreward.rewards.vlm_judge import VLMJudge

    rows = rm.load_judge_rows(_red_blue(tmp_path / "d", 12, seed=0), "pointwise")
    cfg = rm.RewardTrainSection(freeze_vision_tower=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # where batch-dependent bits show up
    try:
        losses, caches = [], []
        for history in ([], [[r] for r in rows[4:]]):  # B first sees images alone, as a late resume might
            judge = VLMJudge(model="tiny:llava-effnet")
            rm._make_trainable(judge, cfg)
            images = rm._ImageCache(None)
            assert rm.prefill_feature_cache(judge, images, rows) == 12
            tower = judge.model.model.vision_tower
            with torch.no_grad():
                for batch in history:
                    rm.batch_loss(judge, batch, images, cfg)
                losses.append(rm.batch_loss(judge, rows, images, cfg))
            assert len(tower.feature_cache) == 12  # training hit the cache for every image, encoded nothing
            caches.append(tower.feature_cache)
    finally:
        torch.set_num_threads(threads)
    assert caches[0].keys() == caches[1].keys() and all(torch.equal(caches[0][k], caches[1][k]) for k in caches[0])
    assert torch.equal(losses[0], losses[1])
