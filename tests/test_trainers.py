"""PRDP and DDPO end to end on tiny:sd: metrics, checkpoints, resume, LoRA reload, bad input, docs/algorithms/prdp.md §9.10."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genreward.config import config_from_dict
from genreward.errors import GenrewardError
from genreward.rewards.base import RewardOutput, register

TINY_PRDP = {
    "trainer": "prdp",
    "model": {"pipeline": "tiny:sd", "device": "cpu"},
    "sample": {"num_steps": 4, "guidance_scale": 5.0, "eta": 1.0, "batch_size": 16},
    "prompts": {"path": "animals"},
    "reward": [{"name": "jpeg_compressibility"}],
    "prdp": {"epochs": 2, "updates_per_epoch": 2, "prompts_per_epoch": 2, "images_per_prompt": 3, "beta": 1e-3, "clip_eps": 1e-2},
    "train": {"trainable": "lora", "lora": {"rank": 4}, "optim": {"lr": 1e-2}, "chunk_size": 16},
    "checkpoint": {"every": 1},
    "eval": {"prompts": {"path": "animals", "limit": 2}, "images_per_prompt": 1},
    "logging": {"trackers": []},
}


def _config(tmp_path: Path, overrides=(), base=TINY_PRDP, name="run"):
    from trainers import get_trainer

    config_cls, train = get_trainer(base["trainer"])
    return config_from_dict(dict(base, output_dir=str(tmp_path / name)), config_cls, list(overrides)), train


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@register("test_nan_on_even")
class _NanOnEven:
    """Test reward: JPEG size, but NaN for every even-indexed image (a broken reward model)."""

    name = "test_nan_on_even"
    differentiable = False

    def __call__(self, images, prompts, **context):
        scores = images.mean(dim=(1, 2, 3)).float()
        scores[::2] = float("nan")
        return RewardOutput(scores=scores)


def test_prdp_end_to_end_outputs(tmp_path):
    config, train = _config(tmp_path)
    result = train(config)
    out = tmp_path / "run"
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert r["num_samples"] == 6 and r["reward_nonfinite"] == 0
        assert all(k in r for k in ("loss", "loss_first", "grad_norm", "time_sampling", "time_reward", "time_reference", "time_training"))
        assert r["frac_clipped_branch_first"] == 0.0  # u = v at the first update of every epoch (prdp.md §9.6)
    assert (out / "checkpoints" / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "config.yaml").is_file() and (out / "reward_curve.png").is_file()
    assert (out / "eval" / "before" / "summary.json").is_file() and (out / "eval" / "final" / "summary.json").is_file()
    html = (out / "gallery.html").read_text()
    assert "before" in html.lower() and html.count("<img") >= 4
    assert result["replicas_identical"] is True


def test_spec9_10_logprob_plumbing_at_initialisation(tmp_path):
    """With θ = θ_old = θ_ref: recomputed log π_θ equals the sampled log π_old (< 1e-6) and log π_θ − log π_ref = 0."""
    from genreward.sampling import sample_trajectories
    from trainers.common import TrainingRun

    for trainable in ("lora", "full"):
        config, _ = _config(tmp_path, [f"train.trainable={trainable}"], name=f"plumb-{trainable}")
        run = TrainingRun(config, need_reference=True)
        traj = sample_trajectories(run.pipe, ["a cat", "a dog"], num_steps=4, seeds=[1, 2], unet=run.policy)
        policy_lp = run.log_probs(traj)
        with run.reference() as ref:
            ref_lp = run.log_probs(traj, ref)
        assert (policy_lp - traj.log_probs).abs().max().item() < 1e-6
        assert (policy_lp - ref_lp).abs().max().item() < 1e-6
        run.accelerator.end_training()


@pytest.mark.slow
def test_prdp_nonfinite_rewards_are_dropped_and_counted(tmp_path, caplog):
    config, train = _config(tmp_path, ["reward.0.name=test_nan_on_even", "eval.enabled=false", "prdp.epochs=1"])
    with caplog.at_level("WARNING"):
        train(config)
    row = _metrics(tmp_path / "run")[0]
    assert row["reward_nonfinite"] == 3  # 6 images, every even one NaN
    assert all(isinstance(row[k], float) and row[k] == row[k] for k in ("loss", "grad_norm", "reward_mean"))
    assert "NaN/inf" in caplog.text


def test_prompt_set_smaller_than_n_is_clear_error(tmp_path):
    small = tmp_path / "two.txt"
    small.write_text("a cat\na dog\n")
    config, train = _config(tmp_path, [f"prompts.path={small}", "prdp.prompts_per_epoch=3"])
    with pytest.raises(GenrewardError, match=r"has 2 prompts but prdp.prompts_per_epoch is 3"):
        train(config)


def test_unknown_trainer_and_reward_names(tmp_path):
    from trainers import get_trainer

    with pytest.raises(GenrewardError, match=r"unknown trainer 'prdpp'.*available trainers: ddpo, grpo, nft, prdp"):
        get_trainer("prdpp")
    config, train = _config(tmp_path, ["reward.0.name=not_a_reward"])
    with pytest.raises(GenrewardError, match=r"unknown reward 'not_a_reward'"):
        train(config)


@pytest.mark.slow
def test_resume_gives_identical_weights_and_metrics(tmp_path):
    """Train 4 epochs; versus train 2, stop, resume from the latest checkpoint, train 2 more."""
    from safetensors.torch import load_file

    common = ["prdp.epochs=4", "eval.enabled=false", "checkpoint.every=2"]
    config, train = _config(tmp_path, common, name="straight")
    train(config)
    config, train = _config(tmp_path, ["prdp.epochs=2", "eval.enabled=false", "checkpoint.every=2"], name="split")
    train(config)
    config, train = _config(tmp_path, common + ["checkpoint.resume_from=latest"], name="split")
    train(config)
    a = load_file(tmp_path / "straight" / "checkpoints" / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("epoch", "reward_mean", "reward_std", "reward_mean_window_std", "loss", "loss_first", "grad_norm", "num_pairs")
    assert [{k: r[k] for k in keys} for r in _metrics(tmp_path / "straight")] == [
        {k: r[k] for k in keys} for r in _metrics(tmp_path / "split")
    ]


@pytest.mark.slow
def test_saved_lora_reloads_as_the_finetuned_model(tmp_path):
    """pipe.load_lora_weights(checkpoint) reproduces the fine-tuned samples, not the base model's."""
    from genreward.images import load_images
    from genreward.models import load_pipeline
    from genreward.sampling import sample_trajectories

    config, train = _config(tmp_path, ["prdp.epochs=2", "train.optim.lr=5e-2", "prdp.clip_eps=1.0"])
    train(config)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "eval" / "final" / "metrics.jsonl").read_text().splitlines()]
    finetuned = load_images([out / "eval" / "final" / r["image"] for r in records])
    prompts, seeds = [r["prompt"] for r in records], [r["seed"] for r in records]

    def images(pipe):
        return sample_trajectories(pipe, prompts, num_steps=4, guidance_scale=5.0, eta=1.0, seeds=seeds).images

    base = images(load_pipeline("tiny:sd", device="cpu"))
    reloaded = images(load_pipeline("tiny:sd", device="cpu", lora=str(out / "checkpoints" / "checkpoint-2")))
    assert (reloaded - finetuned).abs().max().item() <= 1.5 / 255  # PNG rounding only
    assert (base - finetuned).abs().max().item() > 5 / 255


TINY_DDPO = {
    "trainer": "ddpo",
    "model": {"pipeline": "tiny:sd", "device": "cpu"},
    "sample": {"num_steps": 4, "guidance_scale": 5.0, "eta": 1.0, "batch_size": 8},
    "prompts": {"path": "animals", "limit": 3},
    "reward": [{"name": "jpeg_compressibility"}],
    "ddpo": {"epochs": 2, "samples_per_epoch": 8, "minibatch_size": 4, "gradient_accumulation_steps": 1, "tracker_buffer_size": 4, "tracker_min_count": 2},
    "train": {"trainable": "lora", "optim": {"lr": 1e-2}},
    "checkpoint": {"every": 1},
    "eval": {"enabled": False},
    "logging": {"trackers": []},
}


@pytest.mark.slow
def test_ddpo_end_to_end_ratio_one_on_policy(tmp_path):
    config, train = _config(tmp_path, base=TINY_DDPO)
    train(config)
    rows = _metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert abs(r["ratio_first"] - 1.0) < 1e-5  # on-policy at the first inner step: ρ = 1
        assert 0.0 <= r["clipfrac"] <= 1.0 and r["approx_kl"] >= 0.0
        assert r["tracked_prompts"] <= 3
    assert rows[-1]["clipfrac"] > 0.0  # later slots move past the tiny clip range
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["objects"]["tracker"]  # the per-prompt tracker travels with the checkpoint, as JSON


def _launch(tmp_path: Path, num_processes: int, name: str, extra=()) -> tuple[int, str, Path]:
    """``accelerate launch`` the CLI exactly as a user would (gloo on CPU, one thread per process)."""
    import os
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = tmp_path / f"{name}.yaml"
    data = dict(TINY_PRDP, output_dir=str(tmp_path / name))
    data["prdp"] = dict(data["prdp"], prompts_per_epoch=2)
    cfg.write_text(yaml.safe_dump(data))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else ["--num_processes", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(
        launch + ["-m", "genreward", "train", str(cfg), *extra], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    return proc.returncode, proc.stdout + proc.stderr, tmp_path / name


@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [1, 2])
def test_accelerate_launch_replicas_identical_and_save_does_not_hang(tmp_path, num_processes):
    rc, output, out = _launch(tmp_path, num_processes, f"launch{num_processes}")
    assert rc == 0, output[-4000:]
    replicas = json.loads((out / "replicas.json").read_text())
    assert len(replicas["digests"]) == num_processes and replicas["identical"] is True
    assert (out / "checkpoints" / "checkpoint-1" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoints" / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    rows = _metrics(out)
    assert [r["num_samples"] for r in rows] == [6, 6]  # 2 prompts × 3 images, gathered over all processes


@pytest.mark.slow
def test_stateful_reward_state_is_checkpointed(tmp_path):
    """A shaping reward's running statistics travel with the checkpoint (JSON in trainer_state.json)."""
    config, train = _config(
        tmp_path,
        ["reward.0.name=meanstd", "reward.0.options={reward: {name: jpeg_compressibility}}", "eval.enabled=false", "prdp.epochs=1"],
    )
    train(config)
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())["objects"]["reward"]
    assert state["stats"] and all(v[0] == 3 for v in state["stats"].values())  # 3 images per prompt seen


@pytest.mark.slow
def test_reward_variance_monitor_keys(tmp_path):
    """docs/algorithms/rewarddance.md §5, §8 item 8: within-prompt std and the sliding-window std of the epoch mean."""
    from types import SimpleNamespace

    from trainers.diagnostics import REWARD_WINDOW, epoch_record

    config, train = _config(tmp_path, ["prdp.epochs=2", "prdp.updates_per_epoch=1", "eval.enabled=false", "checkpoint.every=0"])
    train(config)
    rows = _metrics(tmp_path / "run")
    means = torch.tensor([r["reward_mean"] for r in rows], dtype=torch.float64)
    for e, r in enumerate(rows):
        assert r["reward_mean_window_std"] == pytest.approx(float(means[: e + 1].std(unbiased=False)), abs=1e-12)
        assert r["reward_std_within_prompt"] >= 0.0 and r["reward_std_within_prompt"] <= r["reward_std"] + 1e-9
    assert rows[0]["reward_mean_window_std"] == 0.0 and rows[-1]["reward_mean_window_std"] > 0.0

    # Direct call: a 12-epoch history (window of 10) and fixed rewards; NaN rewards are left out of groups.
    history = [0.1 * k * k for k in range(12)]
    run = SimpleNamespace(gather_rewards=lambda t: t, accelerator=SimpleNamespace(is_main_process=True), reward_means=history)
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, float("nan")]])
    rec = epoch_record(run, 12, "r", rewards, torch.isfinite(rewards))
    expected_within = (torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False).item() + 0.0) / 2
    assert rec["reward_std_within_prompt"] == pytest.approx(expected_within)
    window = torch.tensor(history[-(REWARD_WINDOW - 1):] + [rec["reward_mean"]], dtype=torch.float64)
    assert REWARD_WINDOW == 10 and rec["reward_mean_window_std"] == pytest.approx(float(window.std(unbiased=False)))
    # DDPO's flat batch: groups by prompt text, in gather order.
    flat = torch.tensor([1.0, 4.0, 2.0, 8.0])
    rec = epoch_record(run, 12, "r", flat.view(-1, 1), torch.ones(4, 1, dtype=torch.bool), prompts=["a", "b", "a", "b"])
    assert rec["reward_std_within_prompt"] == pytest.approx((0.5 + 2.0) / 2)


@pytest.mark.slow
def test_prdp_with_vlm_judge_reward_config(tmp_path):
    """configs/prdp_tiny_judge.yaml: the yes-token judge as PRDP's black-box reward, end to end (shortened)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "genreward", "train", "configs/prdp_tiny_judge.yaml", f"output_dir={tmp_path / 'judge'}",
         "prdp.epochs=1", "prdp.updates_per_epoch=1", "sample.num_steps=2", "eval.images_per_prompt=1", "eval.prompts.limit=1"],
        cwd=root, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = _metrics(tmp_path / "judge")[0]
    assert row["reward_name"] == "vlm_judge" and row["num_samples"] == 16 and row["reward_nonfinite"] == 0
    assert row["num_pairs"] > 0 and row["loss"] == row["loss"]
    summary = json.loads((tmp_path / "judge" / "eval" / "final" / "summary.json").read_text())
    assert set(summary) == {"vlm_judge"}


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_ddpo_first_ratio_is_one_with_lora_dropout_and_mixed_precision(tmp_path, precision, fresh_accelerator_state):
    """Sampling, recompute and loss evaluate one function: eval mode (dropout off) and the stored latent's density.

    Before the fix, LoRA dropout 0.5 drew a new mask per pass and bf16 stored the rounded latent but evaluated the
    density at the fp32 one; measured bound after the fix: |ratio − 1| ≤ 1e-6 in fp32 and bf16 on CPU.
    """
    config, train = _config(tmp_path, ["ddpo.epochs=1", "train.lora.dropout=0.5", f"train.mixed_precision={precision}",
                                       "train.lora.rank=4", "ddpo.minibatch_size=8"], base=TINY_DDPO)
    train(config)
    row = _metrics(tmp_path / "run")[0]
    assert abs(row["ratio_first"] - 1.0) <= 1e-6, row["ratio_first"]


def test_fsdp_is_refused_with_one_line(tmp_path, monkeypatch):
    """Under FULL_SHARD every rank holds shards; until that path is verified on GPUs the core refuses it."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    config, train = _config(tmp_path, ["eval.enabled=false"])
    with pytest.raises(GenrewardError, match="FSDP is not supported"):
        train(config)
    assert not (tmp_path / "run").exists()  # refused before the run folder was written


def test_ddpo_short_last_accumulation_group_is_averaged_over_its_own_size():
    from trainers.losses import accumulation_divisors

    assert accumulation_divisors(5, 2) == [2, 2, 2, 2, 1]
    assert accumulation_divisors(6, 3) == [3] * 6
    assert accumulation_divisors(2, 4) == [2, 2]
    # Each optimiser step's gradient is the mean over the passes it accumulated: Σ 1/divisor per group = 1.
    div = accumulation_divisors(7, 3)
    groups = [div[i : i + 3] for i in range(0, 7, 3)]
    assert [sum(1 / d for d in g) for g in groups] == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_two_processes_with_a_stateful_reward_share_its_statistics(tmp_path):
    """meanstd under 2 processes: statistics are updated with both ranks' rewards (gather context), no hang,
    and the checkpointed state counts every image of every rank."""
    rc, output, out = _launch(tmp_path, 2, "meanstd2", extra=[
        "reward.0.name=meanstd", "reward.0.options={reward: {name: jpeg_compressibility}}", "eval.enabled=false"])
    assert rc == 0, output[-4000:]
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())["objects"]["reward"]
    counts = [c for c, _, _ in state["stats"].values()]
    assert sum(counts) == 2 * 6  # 2 epochs × 2 prompts × 3 images, from both ranks (rank 0 alone would hold half)
