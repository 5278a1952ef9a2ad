"""GRPO (docs/algorithms/flow_grpo.md §6) and the score-function trainers on every model family: ratio exactly 1 and
KL 0 at the start, a closed-form toy optimum, two epochs end to end with a bit-identical resume for each trainer ×
family pair, and one-line errors for combinations that cannot train."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genreward.config import config_from_dict
from genreward.errors import GenrewardError
from trainers.losses import group_advantages, grpo_loss

FAMILY_SPECS = {"sd": "tiny:sd", "sdxl": "tiny:sdxl", "sd3": "tiny:sd3", "flux": "tiny:flux"}
GUIDANCE = {"sd": 4.0, "sdxl": 4.0, "sd3": 4.5, "flux": 3.5}

BASE = {
    "model": {"device": "cpu"},
    "sample": {"num_steps": 4, "eta": 1.0, "noise_level": 0.7, "batch_size": 16},
    "prompts": {"path": "animals"},
    "reward": [{"name": "jpeg_compressibility"}],
    "train": {"trainable": "lora", "lora": {"rank": 4}, "optim": {"lr": 1e-2}, "chunk_size": 16},
    "checkpoint": {"every": 1},
    "eval": {"enabled": False},
    "logging": {"trackers": []},
}
SECTIONS = {
    "grpo": {"grpo": {"epochs": 2, "prompts_per_epoch": 2, "group_size": 3, "minibatch_size": 3,
                      "gradient_accumulation_steps": 8, "clip_range": 1e-2, "beta": 0.04}},
    "prdp": {"prdp": {"epochs": 2, "updates_per_epoch": 2, "prompts_per_epoch": 2, "images_per_prompt": 3,
                      "beta": 1e-3, "clip_eps": 1e-2}},
    "ddpo": {"ddpo": {"epochs": 2, "samples_per_epoch": 6, "minibatch_size": 3, "gradient_accumulation_steps": 1,
                      "per_prompt_stat_tracking": False}},
}


def _config(tmp_path: Path, trainer: str, family: str, name: str = "run", overrides=()):
    from trainers import get_trainer

    raw = json.loads(json.dumps(BASE))
    raw.update(trainer=trainer, output_dir=str(tmp_path / name), **json.loads(json.dumps(SECTIONS[trainer])))
    raw["model"]["pipeline"] = FAMILY_SPECS[family]
    raw["sample"]["guidance_scale"] = GUIDANCE[family]
    config_cls, train = get_trainer(trainer)
    return config_from_dict(raw, config_cls, list(overrides)), train


def _rows(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock and memory fields (which differ between two runs of the same numbers)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "peak_rss_mb"} for r in rows]


def _run_and_resume(tmp_path: Path, trainer: str, family: str) -> tuple[list[dict], list[dict]]:
    """Two epochs straight, and one epoch then a resumed second one in another folder: the final LoRA weights must be
    bitwise equal and metrics.jsonl the same row for row."""
    config, train = _config(tmp_path, trainer, family)
    train(config)
    full = tmp_path / "run"
    first_half, _ = _config(tmp_path, trainer, family, "resumed", [f"{trainer}.epochs=1"])
    train(first_half)
    resumed, _ = _config(tmp_path, trainer, family, "resumed", ["checkpoint.resume_from=latest"])
    train(resumed)
    a = load_file(str(full / "checkpoints" / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    return _rows(full), _rows(tmp_path / "resumed")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_grpo_on_flow_models_starts_on_policy_and_resumes_bit_identically(tmp_path, family):
    rows, resumed = _run_and_resume(tmp_path, "grpo", family)
    first = rows[0]
    # one optimiser step per epoch (accumulation covers every slot): all of epoch 0 is on-policy at θ = θ_ref
    # (ratio and approx_kl differ from 1 and 0 only by float rounding of other batch shapes; the LoRA's B = 0 at
    # initialisation makes the policy equal the reference exactly, so the KL is exactly 0)
    assert abs(first["ratio_first"] - 1) < 1e-6 and abs(first["ratio"] - 1) < 1e-6 and first["approx_kl"] < 1e-10
    assert first["kl"] == 0.0
    assert first["trained_steps"] == 3 and first["num_samples"] == 6  # int(4 · 0.99) steps, 2 groups of 3
    assert rows[1]["kl"] > 0  # after one update the policy has moved away from the reference
    assert [r["epoch"] for r in rows] == [0, 1] and resumed == rows


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_SPECS))
@pytest.mark.parametrize("trainer", ["grpo", "prdp", "ddpo"])
def test_every_score_function_trainer_runs_on_every_family_and_resumes(tmp_path, trainer, family):
    rows, resumed = _run_and_resume(tmp_path, trainer, family)
    assert [r["epoch"] for r in rows] == [0, 1] and resumed == rows
    assert all(math.isfinite(r["reward_mean"]) for r in rows)


def test_grpo_with_no_stochastic_step_to_train_is_one_line(tmp_path):
    config, train = _config(tmp_path, "grpo", "sd3", overrides=["sample.sde_window=[3,1]", "grpo.timestep_fraction=0.5"])
    with pytest.raises(GenrewardError, match="no step to train: grpo.timestep_fraction=0.5"):
        train(config)


def test_grpo_toy_reaches_the_closed_form_optimum():
    """A 1-D Gaussian policy N(μ, 1) with reward −(x − 3)²: the optimum μ* = 3 (reward maximised in expectation at the
    mean); GRPO with groups of 16, PPO clipping and Adam reaches it from μ = 0."""
    torch.manual_seed(0)
    mu = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([mu], lr=0.05)
    for _ in range(300):
        with torch.no_grad():
            x = mu + torch.randn(4, 16)  # 4 groups (one per "prompt") of 16 samples
            old = -0.5 * (x - mu) ** 2
            adv = group_advantages((-(x - 3.0) ** 2).reshape(-1), [k for k in range(4) for _ in range(16)])
        for _ in range(2):  # two inner updates: the second one is off-policy and clipped
            new = -0.5 * (x - mu) ** 2
            loss, _ = grpo_loss(new.reshape(-1), old.reshape(-1), adv, clip_range=0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert abs(float(mu.detach()) - 3.0) < 0.15


def test_a_family_that_does_not_fit_the_pipeline_is_one_line(tmp_path):
    config, train = _config(tmp_path, "grpo", "sd", overrides=["model.family=sd3"])
    with pytest.raises(GenrewardError, match="model.family=sd3 does not fit pipeline 'tiny:sd'.*StableDiffusionPipeline"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["grpo_tiny_sd3", "grpo_tiny_flux", "prdp_tiny_sdxl"])
def test_tiny_family_configs_run_end_to_end(tmp_path, config):
    """The shipped CPU configs for the new families, unchanged but for the output folder (each well under 3 minutes)."""
    from genreward.cli import main

    out = tmp_path / config
    assert main(["train", f"configs/{config}.yaml", f"output_dir={out}", "model.device=cpu"]) == 0
    rows = _rows(out)
    epochs = {"grpo_tiny_sd3": 4, "grpo_tiny_flux": 4, "prdp_tiny_sdxl": 12}[config]
    assert [r["epoch"] for r in rows] == list(range(epochs)) and all(math.isfinite(r["reward_mean"]) for r in rows)
    assert (out / "checkpoints" / f"checkpoint-{epochs}" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "gallery.html").is_file() and (out / "eval" / "final" / "summary.json").is_file()


@pytest.mark.parametrize("trainer,config", [("rpo", "configs/rpo_tiny.yaml"), ("nft", "configs/nft_tiny.yaml")])
def test_trainers_not_yet_on_a_family_stop_in_one_line(tmp_path, trainer, config):
    from genreward.config import load_config
    from trainers import get_trainer

    config_cls, train = get_trainer(trainer)
    cfg = load_config(config, config_cls, [f"output_dir={tmp_path / 'run'}", "model.pipeline=tiny:sd3", "model.device=cpu"])
    with pytest.raises(GenrewardError, match=f"trainer {trainer} runs on sd models; model.pipeline 'tiny:sd3' is a sd3 model"):
        train(cfg)
    assert not (tmp_path / "run").exists()
