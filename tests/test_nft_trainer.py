"""DiffusionNFT trainer (trainers/nft.py): docs/algorithms/diffusion_nft.md §11 items 11–13 and 15, end to end on
tiny:sd (metrics, checkpoint, bit-identical resume), bad inputs, and the shipped world configs (one short epoch)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from genreward.config import config_from_dict, load_config
from genreward.errors import GenrewardError
from genreward.rewards.base import RewardOutput, register

ROOT = Path(__file__).resolve().parents[1]

TINY_NFT = {
    "trainer": "nft",
    "model": {"pipeline": "tiny:sd", "device": "cpu"},
    "sample": {"num_steps": 4, "guidance_scale": 1.0, "eta": 0.0, "batch_size": 16},
    "prompts": {"path": "animals"},
    "reward": [{"name": "jpeg_compressibility"}],
    "nft": {"epochs": 2, "prompts_per_epoch": 2, "images_per_prompt": 3, "beta": 1.0, "kl_weight": 1e-4,
            "steps_per_epoch": 2, "old_decay_type": 1},
    "train": {"trainable": "lora", "lora": {"rank": 4}, "optim": {"lr": 1e-2}, "chunk_size": 4},
    "checkpoint": {"every": 1},
    "eval": {"prompts": {"path": "animals", "limit": 2}, "images_per_prompt": 1},
    "logging": {"trackers": []},
}


def _config(tmp_path: Path, overrides=(), name="run"):
    from trainers import get_trainer

    config_cls, train = get_trainer("nft")
    return config_from_dict(dict(TINY_NFT, output_dir=str(tmp_path / name)), config_cls, list(overrides)), train


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@register("test_nft_constant")
class _Constant:
    """Test reward: the same score for every image (no signal in any group)."""

    name = "test_nft_constant"
    differentiable = False

    def __call__(self, images, prompts, **context):
        return RewardOutput(scores=torch.full((images.shape[0],), 0.5))


@register("test_nft_nan_on_even")
class _NanOnEven:
    """Test reward: the mean pixel, NaN for every even-indexed image (a broken reward model)."""

    name = "test_nft_nan_on_even"
    differentiable = False

    def __call__(self, images, prompts, **context):
        scores = images.mean(dim=(1, 2, 3)).float()
        scores[::2] = float("nan")
        return RewardOutput(scores=scores)


# ------------------------------------------------------------------------------- items 11–13: schedules


def test_item11_old_policy_decay_schedules():
    from trainers.nft import old_policy_decay

    assert [old_policy_decay(s, 1) for s in (0, 1, 250, 500, 900)] == pytest.approx([0, 0.001, 0.25, 0.5, 0.5])
    assert [old_policy_decay(s, 2) for s in (74, 75, 100, 300)] == pytest.approx([0, 0, 0.1875, 0.999])
    assert old_policy_decay(1000, 0) == 0.0
    with pytest.raises(GenrewardError):
        old_policy_decay(1, 3)


def test_item11_old_update_once_per_step_count_and_swap_is_exact():
    from trainers.nft import NFTPolicies

    lin = torch.nn.Linear(3, 2)
    policies = NFTPolicies(list(lin.parameters()), eval_ema=True)
    theta0 = [p.detach().clone() for p in lin.parameters()]
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    policies.global_step = 250
    eta = policies.update_old(kind=1)
    assert eta == pytest.approx(0.25)
    for o, t0, p in zip(policies.old, theta0, lin.parameters()):
        assert torch.allclose(o, 0.25 * t0 + 0.75 * p.detach())
    before = [p.detach().clone() for p in lin.parameters()]
    with policies.old_policy():  # sampling reads θ_old ...
        assert all(torch.equal(p, o) for p, o in zip(lin.parameters(), policies.old))
    assert all(torch.equal(p, b) for p, b in zip(lin.parameters(), before))  # ... and θ comes back exactly


def test_item12_eval_ema_decay_and_swap():
    from trainers.nft import NFTPolicies, eval_ema_decay

    assert eval_ema_decay(1) == pytest.approx(2 / 11)
    assert eval_ema_decay(8) == pytest.approx(0.5)
    assert all(eval_ema_decay(k) == 0.9 for k in (80, 81, 500))
    lin = torch.nn.Linear(3, 2)
    policies = NFTPolicies(list(lin.parameters()), eval_ema=True)
    start = [p.detach().clone() for p in lin.parameters()]
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    delta = policies.after_optimizer_step()  # k = 1
    assert delta == pytest.approx(2 / 11) and policies.global_step == 1
    for e, s, p in zip(policies.ema, start, lin.parameters()):
        assert torch.allclose(e, s + (1 - 2 / 11) * (p.detach() - s))
    theta = [p.detach().clone() for p in lin.parameters()]
    with policies.ema_policy():
        assert all(torch.equal(p, e) for p, e in zip(lin.parameters(), policies.ema))
    assert all(torch.equal(p, t) for p, t in zip(lin.parameters(), theta))


@pytest.mark.parametrize("grid,count", [(10, 9), (25, 24), (4, 3), (1, 1)])
def test_item13_timestep_plan_distinct_grid_entries(grid, count):
    from trainers.nft import timestep_plan

    plan = timestep_plan(64, grid, 0.99, torch.Generator().manual_seed(0))
    assert plan.shape == (64, count) and plan.dtype == torch.long
    assert int(plan.min()) >= 0 and int(plan.max()) < grid
    assert all(len(set(row.tolist())) == count for row in plan)  # distinct: each timestep at most once per sample
    if count > 1:
        assert len({tuple(row.tolist()) for row in plan}) > 1  # an independent permutation per sample


# ----------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("override,match", [
    ("nft.beta=0", "nft.beta"), ("nft.beta=-0.5", "nft.beta"), ("nft.images_per_prompt=1", "images_per_prompt"),
    ("nft.train_guidance_scale=4.0", "train_guidance_scale"), ("nft.timestep_fraction=0", "timestep_fraction"),
    ("nft.old_decay_type=5", "old_decay_type"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, override, match):
    with pytest.raises(GenrewardError, match=match):
        _config(tmp_path, [override])
    assert not (tmp_path / "run").exists()


def test_prompt_set_smaller_than_n_is_clear_error(tmp_path):
    small = tmp_path / "two.txt"
    small.write_text("a cat\na dog\n")
    config, train = _config(tmp_path, [f"prompts.path={small}", "nft.prompts_per_epoch=3"])
    with pytest.raises(GenrewardError, match=r"has 2 prompts but nft.prompts_per_epoch is 3"):
        train(config)
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_nft_end_to_end_outputs_and_sampling_reads_theta_old(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from trainers.common import param_digest
    from trainers.common import TrainingRun
    from trainers.run_dir import load_tree

    sampled_with = []
    original = TrainingRun.sample

    def recording_sample(self, prompts, seeds, model=None, **kw):
        sampled_with.append(param_digest(self.trainable_params))
        return original(self, prompts, seeds, model, **kw)

    monkeypatch.setattr(TrainingRun, "sample", recording_sample)
    config, train = _config(tmp_path, ["nft.epochs=3"])
    result = train(config)
    out = tmp_path / "run"
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["num_samples"] == 6 and r["reward_nonfinite"] == 0
        assert r["groups"] == 2 and r["groups_without_signal"] == 0 and r["update_skipped"] == 0
        for key in ("loss", "kl", "old_deviate", "grad_norm", "x0_norm", "time_sampling", "time_reward", "time_training"):
            assert math.isfinite(r[key]), key
        assert r["r_mean"] == pytest.approx(0.5, abs=1e-6)  # advantages are centred per prompt
    assert [r["optimizer_steps"] for r in rows] == [2, 4, 6]  # steps_per_epoch = 2
    assert [r["old_decay"] for r in rows] == pytest.approx([0.002, 0.004, 0.006])
    ckpt = out / "checkpoints" / "checkpoint-3"
    for name in ("pytorch_lora_weights.safetensors", "nft_policies.safetensors", "ema/pytorch_lora_weights.safetensors",
                 "optimizer.safetensors", "manifest.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "trainer_state.json").read_text())["objects"]["nft"] == {"global_step": 6}
    assert (out / "eval" / "before" / "summary.json").is_file() and (out / "eval" / "final" / "summary.json").is_file()
    assert result["replicas_identical"] is True
    # Item 11: epoch e+1 sampled with the θ_old saved after epoch e, which is not θ (η > 0).
    assert len(sampled_with) == 3
    for epoch in (1, 2):
        old = load_tree(out / "checkpoints" / f"checkpoint-{epoch}" / "nft_policies.safetensors")["old"]
        assert sampled_with[epoch] == param_digest(old)
    theta = load_file(ckpt / "pytorch_lora_weights.safetensors")
    ema = load_file(ckpt / "ema" / "pytorch_lora_weights.safetensors")
    assert theta.keys() == ema.keys() and any(not torch.equal(theta[k], ema[k]) for k in theta)


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    """Train 3 epochs straight; versus 2 epochs, then resume from the latest checkpoint to 3."""
    from safetensors.torch import load_file

    from trainers.run_dir import load_tree

    common = ["eval.enabled=false", "checkpoint.every=0"]
    config, train = _config(tmp_path, common + ["nft.epochs=3"], name="straight")
    train(config)
    config, train = _config(tmp_path, common + ["nft.epochs=2"], name="split")
    train(config)
    config, train = _config(tmp_path, common + ["nft.epochs=3", "checkpoint.resume_from=latest"], name="split")
    train(config)
    a_dir, b_dir = (tmp_path / name / "checkpoints" / "checkpoint-3" for name in ("straight", "split"))
    for name in ("pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors"):
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    pa, pb = load_tree(a_dir / "nft_policies.safetensors"), load_tree(b_dir / "nft_policies.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(pa["old"] + pa["ema"], pb["old"] + pb["ema"]))
    keys = ("epoch", "reward_mean", "loss", "kl", "old_deviate", "grad_norm", "optimizer_steps", "old_decay")
    assert [{k: r[k] for k in keys} for r in _metrics(tmp_path / "straight")] == [
        {k: r[k] for k in keys} for r in _metrics(tmp_path / "split")
    ]


def test_constant_reward_is_reported_and_the_update_skipped(tmp_path, caplog):
    from safetensors.torch import load_file

    config, train = _config(tmp_path, ["reward.0.name=test_nft_constant", "eval.enabled=false", "nft.epochs=1"])
    with caplog.at_level("WARNING"):
        train(config)
    row = _metrics(tmp_path / "run")[0]
    assert row["groups_without_signal"] == 2 and row["groups"] == 2 and row["update_skipped"] == 1
    assert row["optimizer_steps"] == 0 and math.isnan(row["loss"])
    assert "no reward signal" in caplog.text and "skipped" in caplog.text
    lora = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-1" / "pytorch_lora_weights.safetensors")
    assert all(float(v.abs().sum()) == 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)  # untouched (B = 0)


def test_nan_rewards_are_left_out(tmp_path, caplog):
    config, train = _config(tmp_path, ["reward.0.name=test_nft_nan_on_even", "eval.enabled=false", "nft.epochs=1"])
    with caplog.at_level("WARNING"):
        train(config)
    row = _metrics(tmp_path / "run")[0]
    assert row["reward_nonfinite"] == 3  # 6 images, every even one NaN
    assert all(math.isfinite(row[k]) for k in ("loss", "grad_norm", "reward_mean"))
    assert "NaN/inf" in caplog.text


# --------------------------------------------------------------------------------- item 15: CFG-free


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_item15_training_forwards_use_conditional_embeddings_only(tmp_path, monkeypatch, guidance):
    """Training calls (one timestep per sample) never see the unconditional embedding, whatever the sampler's CFG."""
    from diffusers import UNet2DConditionModel

    calls = []
    original = UNet2DConditionModel.forward

    def recording_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        per_sample = torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.numel() == sample.shape[0] > 1
        calls.append((per_sample, sample.shape[0], encoder_hidden_states.detach().clone()))
        return original(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    config, train = _config(tmp_path, ["eval.enabled=false", "nft.epochs=1", f"sample.guidance_scale={guidance}"])
    train(config)
    from genreward.models import load_pipeline
    from genreward.sampling import encode_prompts

    pipe = load_pipeline("tiny:sd", device="cpu")
    _, uncond = encode_prompts(pipe, ["x"])
    uncond = uncond[0]

    def has_uncond(emb):
        return any(torch.allclose(row, uncond, atol=1e-6) for row in emb)

    training = [c for c in calls if c[0]]
    sampling = [c for c in calls if not c[0]]
    assert training and sampling
    assert all(batch == emb.shape[0] and not has_uncond(emb) for _, batch, emb in training)
    assert any(has_uncond(emb) for _, _, emb in sampling) == (guidance > 1.0)  # the detector works


# ----------------------------------------------------------------------------------- shipped configs


def test_nft_tiny_config_parses():
    from trainers.nft import NFTConfig

    config = load_config(ROOT / "configs" / "nft_tiny.yaml", NFTConfig)
    assert config.trainer == "nft" and config.model.pipeline == "tiny:sd" and config.sample.guidance_scale == 1.0


@pytest.mark.parametrize("name", ["nft_world_verifier", "nft_world_judge"])
def test_world_configs_parse_and_run_one_short_epoch(tmp_path, name):
    from trainers import get_trainer

    config_cls, train = get_trainer("nft")
    config = load_config(ROOT / "configs" / f"{name}.yaml", config_cls)
    assert config.model.pipeline == "world:shapes-t2i" and config.sample.guidance_scale == 1.0
    assert config.eval.rewards[0].name == "verifier"
    overrides = [f"output_dir={tmp_path / name}", "nft.epochs=1", "nft.prompts_per_epoch=2", "nft.images_per_prompt=2",
                 "sample.num_steps=3", "model.device=cpu", "eval.prompts.limit=1", "eval.images_per_prompt=1",
                 "eval.rewards=[{name: verifier}]"]
    config = load_config(ROOT / "configs" / f"{name}.yaml", config_cls, overrides)
    result = train(config)
    rows = _metrics(tmp_path / name)
    assert len(rows) == 1 and rows[0]["num_samples"] == 4 and math.isfinite(rows[0]["reward_mean"])
    assert "verifier" in result["final"]
