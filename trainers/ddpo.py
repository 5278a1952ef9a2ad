"""DDPO (Black et al., 2023), the DDPO_IS variant of ddpo-pytorch — specs/ddpo_logprob.md §5.

Each epoch: sample trajectories (prompts drawn per sample), score them, turn rewards into advantages
(per-prompt running statistics, or batch statistics), then for each inner epoch shuffle samples and each
sample's time order and take PPO-clipped importance-sampling steps, one timestep slot at a time,
accumulating gradients over timesteps and minibatches before each optimiser step.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from genreward.rewards.base import RewardSpec, reward_from_specs
from genreward.sampling import sample_trajectories, step_log_prob
from genreward.schema import ModelConfig, PromptsConfig, SampleConfig
from trainers.common import (
    CheckpointSection,
    LoggingSection,
    OptimSection,
    Timer,
    TrainEvalSection,
    TrainingRun,
    TrainSection,
    derived_seed,
    eval_reward_list,
    peak_rss_mb,
    stateful,
    training_progress,
)
from trainers.losses import PerPromptStatTracker, batch_advantages, ddpo_loss
from trainers.prdp import epoch_record

log = logging.getLogger("genreward.ddpo")


@dataclass
class DDPOSection:
    """DDPO hyperparameters; defaults from ddpo-pytorch's config/base.py and dgx.py (compressibility)."""

    epochs: int = 100
    samples_per_epoch: int = 256  # over all processes (8 per GPU × 4 batches × 8 GPUs in the reference)
    gradient_accumulation_steps: int = 2  # minibatches (of train.batch_size) per optimiser step
    clip_range: float = 1e-4  # PPO ratio clip ε
    adv_clip_max: float = 5.0
    timestep_fraction: float = 1.0  # fraction of each trajectory's steps trained on
    inner_epochs: int = 1
    per_prompt_stat_tracking: bool = True
    tracker_buffer_size: int = 16
    tracker_min_count: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"key 'ddpo.timestep_fraction' must be in (0, 1], got {self.timestep_fraction}")
        for name in ("epochs", "samples_per_epoch", "gradient_accumulation_steps", "inner_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"key 'ddpo.{name}' must be >= 1, got {getattr(self, name)}")


def _ddpo_train_defaults() -> TrainSection:
    return TrainSection(optim=OptimSection(lr=3e-4), batch_size=4)


@dataclass
class DDPOConfig:
    output_dir: str
    trainer: Literal["ddpo"] = "ddpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    reward: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="jpeg_compressibility")])
    ddpo: DDPOSection = field(default_factory=DDPOSection)
    train: TrainSection = field(default_factory=_ddpo_train_defaults)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: TrainEvalSection = field(default_factory=TrainEvalSection)


def train(config: DDPOConfig) -> dict:
    d = config.ddpo
    tracker = PerPromptStatTracker(d.tracker_buffer_size, d.tracker_min_count) if d.per_prompt_stat_tracking else None
    reward = reward_from_specs(config.reward)
    run = TrainingRun(
        config, config.model, config.train, config.checkpoint, config.logging, config.eval, config.sample,
        need_reference=False, checkpoint_objects=([tracker] if tracker else []) + stateful(reward),
    )
    acc = run.accelerator
    prompts = run.load_prompts(config.prompts)
    local = run.local_slice(d.samples_per_epoch, "ddpo.samples_per_epoch")
    eval_items = run.load_prompts(config.eval.prompts) if config.eval.enabled else []
    eval_rewards = eval_reward_list(config.eval, reward)
    if eval_items and run.start_epoch == 0:
        run.evaluate("before", eval_items, eval_rewards)
    T = config.sample.num_steps
    t_train = max(1, int(T * d.timestep_fraction))
    progress = training_progress(acc, run.start_epoch, d.epochs)

    for epoch in range(run.start_epoch, d.epochs):
        timer = Timer()
        gen = torch.Generator().manual_seed(derived_seed(config.train.seed, epoch, 0))
        chosen_all = torch.randint(len(prompts), (d.samples_per_epoch,), generator=gen).tolist()
        items = [prompts[i] for i in chosen_all[local]]
        texts = [it.prompt for it in items]
        seeds = [derived_seed(config.train.seed, epoch, 1, local.start + i) for i in range(len(items))]
        with timer("sampling"), acc.autocast():
            traj = sample_trajectories(
                run.pipe, texts, num_steps=T, guidance_scale=config.sample.guidance_scale, eta=config.sample.eta,
                negative_prompt=config.sample.negative_prompt, seeds=seeds, batch_size=config.sample.batch_size,
                height=config.sample.height, width=config.sample.width, reduction=config.sample.logprob_reduction,
                unet=run.policy,
            )
        with timer("reward"), torch.no_grad():
            rewards = reward(traj.images, texts, metadata=[it.metadata for it in items]).scores.detach().float().to(acc.device)
        # Advantages from the rewards of all processes (per-prompt statistics need every sample of a prompt).
        all_rewards = run.gather_rewards(rewards).cpu().numpy()
        all_texts = [prompts[i].prompt for i in chosen_all]
        adv_all = tracker.update(all_texts, all_rewards) if tracker else batch_advantages(all_rewards)
        advantages = torch.as_tensor(np.asarray(adv_all)[local], dtype=torch.float32, device=acc.device)
        stats_sum: dict[str, float] = {}
        n_stats, first_ratio = 0, None
        with timer("training"):
            for inner in range(d.inner_epochs):
                g = torch.Generator().manual_seed(derived_seed(config.train.seed, epoch, 2, acc.process_index, inner))
                order = torch.randperm(len(traj), generator=g)
                time_order = torch.stack([torch.randperm(T, generator=g) for _ in range(len(traj))])
                minibatches = [order[i : i + config.train.batch_size] for i in range(0, len(traj), config.train.batch_size)]
                accum = d.gradient_accumulation_steps * t_train
                slots = [(mb, j) for mb in minibatches for j in range(t_train)]
                for n, (mb, j) in enumerate(slots):
                    sync = (n + 1) % accum == 0 or n == len(slots) - 1
                    steps = time_order[mb, j]
                    ctx = acc.no_sync(run.unet) if not sync else contextlib.nullcontext()
                    with ctx:
                        with acc.autocast():
                            lp = step_log_prob(run.unet, run.pipe.scheduler, traj, steps, mb, config.sample.logprob_reduction)
                        old = traj.log_probs[mb, steps]
                        loss, stats = ddpo_loss(lp, old, advantages[mb], d.clip_range, d.adv_clip_max)
                        acc.backward(loss / accum)
                    if first_ratio is None:
                        first_ratio = float(stats["ratio"])
                    for key, value in {"loss": loss.detach(), **stats}.items():
                        stats_sum[key] = stats_sum.get(key, 0.0) + float(value)
                    n_stats += 1
                    if sync:
                        grad_norm = run.optimizer_step()
        record = epoch_record(run, epoch, reward.name, rewards.view(-1, 1), torch.isfinite(rewards).view(-1, 1), prompts=all_texts)
        record.update({k: v / max(n_stats, 1) for k, v in stats_sum.items()})
        record.update(ratio_first=first_ratio, grad_norm=grad_norm, lr=config.train.optim.lr, peak_rss_mb=peak_rss_mb())
        if tracker:
            record["tracked_prompts"] = len(tracker.get_stats())
        record.update({f"time_{k}": round(v, 4) for k, v in timer.seconds.items()})
        run.log_metrics(record)
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward_mean']:.4g}", kl=f"{record.get('approx_kl', 0):.2g}")
        run.end_of_epoch(epoch, d.epochs, eval_items, eval_rewards)
    progress.close()
    return run.finish(d.epochs - 1, eval_items, eval_rewards)
