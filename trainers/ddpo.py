"""DDPO (Black et al., 2023), the DDPO_IS variant of ddpo-pytorch — docs/algorithms/ddpo.md §5.

Each epoch: sample trajectories (prompts drawn per sample), score them, turn rewards into advantages
(per-prompt running statistics, or batch statistics), then for each inner epoch shuffle samples and each
sample's time order and take PPO-clipped importance-sampling steps, one timestep slot at a time,
accumulating gradients over timesteps and minibatches before each optimiser step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from genreward.rewards.base import reward_from_specs
from genreward.sampling import step_log_prob
from trainers.common import (
    OptimSection,
    PolicyConfig,
    Timer,
    TrainingRun,
    TrainSection,
    derived_seed,
    eval_reward_list,
    peak_rss_mb,
    stateful_objects,
    training_progress,
)
from trainers.diagnostics import epoch_record
from trainers.losses import PerPromptStatTracker, batch_advantages, ddpo_loss
from trainers.passes import UpdateLog, accumulated_updates, stochastic_step_indices
from trainers.prdp import load_checked_prompts, stop_without_finite_rewards
from trainers.run_dir import fault_point

log = logging.getLogger("genreward.ddpo")


@dataclass
class DDPOSection:
    """DDPO hyperparameters; defaults from ddpo-pytorch's config/base.py and dgx.py (compressibility)."""

    epochs: int = 100
    samples_per_epoch: int = 256  # over all processes (8 per GPU × 4 batches × 8 GPUs in the reference)
    minibatch_size: int = 4  # trajectories per gradient minibatch (ddpo-pytorch's train.batch_size)
    gradient_accumulation_steps: int = 2  # minibatches per optimiser step
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
        for name in ("epochs", "samples_per_epoch", "minibatch_size", "gradient_accumulation_steps", "inner_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"key 'ddpo.{name}' must be >= 1, got {getattr(self, name)}")


def _ddpo_train_defaults() -> TrainSection:
    return TrainSection(optim=OptimSection(lr=3e-4))


@dataclass
class DDPOConfig(PolicyConfig):
    """``trainer: ddpo``. Checkpoints count epochs: ``checkpoint-<epochs done>``."""

    trainer: Literal["ddpo"] = "ddpo"
    ddpo: DDPOSection = field(default_factory=DDPOSection)
    train: TrainSection = field(default_factory=_ddpo_train_defaults)


def train(config: DDPOConfig) -> dict:
    d = config.ddpo
    prompts = load_checked_prompts(config, 1, "prompts")
    eval_items = TrainingRun.load_eval_prompts(config)
    tracker = PerPromptStatTracker(d.tracker_buffer_size, d.tracker_min_count) if d.per_prompt_stat_tracking else None
    reward = reward_from_specs(config.reward)
    eval_rewards = eval_reward_list(config.eval, reward)
    objects = {**({"tracker": tracker} if tracker else {}), **stateful_objects(reward)}
    run = TrainingRun(config, need_reference=False, unit="epoch", checkpoint_objects=objects)
    acc = run.accelerator
    local = run.local_slice(d.samples_per_epoch, "ddpo.samples_per_epoch")
    if eval_items and run.start == 0:
        run.evaluate("before", eval_items, eval_rewards)
    progress = training_progress(acc, run.start, d.epochs)

    for epoch in range(run.start, d.epochs):
        timer = Timer()
        gen = torch.Generator().manual_seed(derived_seed(config.train.seed, epoch, 0))
        chosen_all = torch.randint(len(prompts), (d.samples_per_epoch,), generator=gen).tolist()
        items = [prompts[i] for i in chosen_all[local]]
        texts = [it.prompt for it in items]
        seeds = [derived_seed(config.train.seed, epoch, 1, local.start + i) for i in range(len(items))]
        with timer("sampling"):
            traj = run.sample(texts, seeds)
        with timer("reward"), torch.no_grad():
            rewards = reward(traj.images, texts, metadata=[it.metadata for it in items],
                             **run.reward_context()).scores.detach().float().to(acc.device)
        # Advantages from the rewards of all processes (per-prompt statistics need every sample of a prompt).
        all_rewards = run.gather_rewards(rewards).cpu().numpy()
        all_texts = [prompts[i].prompt for i in chosen_all]
        adv_all = tracker.update(all_texts, all_rewards) if tracker else batch_advantages(all_rewards)
        advantages = torch.as_tensor(np.asarray(adv_all)[local], dtype=torch.float32, device=acc.device)
        log = UpdateLog()
        stochastic = torch.tensor(stochastic_step_indices(traj), dtype=torch.long)
        t_train = max(1, int(len(stochastic) * d.timestep_fraction))

        def slot_loss(slot):
            mb, steps = slot
            with acc.autocast():
                lp = step_log_prob(run.unet, run.family, traj, steps, mb, config.sample.logprob_reduction)
            return ddpo_loss(lp, traj.log_probs[mb, steps], advantages[mb], d.clip_range, d.adv_clip_max)

        with timer("training"):
            for inner in range(d.inner_epochs):
                g = torch.Generator().manual_seed(derived_seed(config.train.seed, epoch, 2, acc.process_index, inner))
                order = torch.randperm(len(traj), generator=g)
                # each sample's own random order of its stochastic steps (all T for DDIM; a flow SDE window otherwise)
                time_order = stochastic[torch.stack([torch.randperm(len(stochastic), generator=g) for _ in range(len(traj))])]
                minibatches = [order[i : i + d.minibatch_size] for i in range(0, len(traj), d.minibatch_size)]
                slots = [(mb, time_order[mb, j]) for mb in minibatches for j in range(t_train)]
                grad_norm = accumulated_updates(run, slots, d.gradient_accumulation_steps * t_train, slot_loss, log)
        fault_point("unit")
        record = epoch_record(run, epoch, reward.name, rewards.view(-1, 1), torch.isfinite(rewards).view(-1, 1), prompts=all_texts)
        record.update(log.means())
        record.update(ratio_first=log.first_ratio, grad_norm=grad_norm, lr=config.train.optim.lr, peak_rss_mb=peak_rss_mb())
        if tracker:
            record["tracked_prompts"] = len(tracker.get_stats())
        record.update({f"time_{k}": round(v, 4) for k, v in timer.seconds.items()})
        run.log_metrics(record)
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward_mean']:.4g}", kl=f"{record.get('approx_kl', 0):.2g}")
        stop_without_finite_rewards(run, progress, rewards, epoch, reward.name)
        run.end_of_epoch(epoch, d.epochs, eval_items, eval_rewards)
    progress.close()
    return run.finish(d.epochs, eval_items, eval_rewards)
