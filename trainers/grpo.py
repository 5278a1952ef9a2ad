"""GRPO for diffusion and flow models (Flow-GRPO, Liu et al. 2025; DanceGRPO) — docs/algorithms/flow_grpo.md §6.

One trainer for every model family: on SD3/FLUX it samples with the flow-matching SDE step (or CPS / DanceGRPO's,
optionally only inside a window of steps), on SD/SDXL with stochastic DDIM (a DDIM GRPO is DDPO with group
advantages). Each epoch:

1. draw K prompts (the same draw on every process) and repeat each G times — a group per prompt;
2. sample the K·G trajectories from π_θ_old (eval mode, no grad), recording every latent and step log-prob;
3. score the images; advantages A = (r − mean_group) / (std + 1e-4), std of the group or of all the epoch's rewards
   (``global_std``), clipped to ±``adv_clip_max``; samples of constant-reward groups (A = 0) are dropped;
4. for each inner epoch, minibatch and trained step j: ρ = exp(log p_θ − log p_old) of the stored transition,
   L = mean max(−A·ρ, −A·clip(ρ, 1 ± ε)) + β·KL(μ_θ ‖ μ_ref) (KL through the LoRA-disabled reference), with
   gradients accumulated over ``gradient_accumulation_steps`` minibatches × trained steps before each AdamW step.

Training uses the trajectory's own guidance (CFG with the same w and negative prompt, or FLUX's embedding, or
none when sampled with w ≤ 1), so the first inner step's ratio is exactly 1 in fp32. Not implemented: the EMA of
the LoRA weights that Flow-GRPO evaluates with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from genreward.errors import GenrewardError
from genreward.flow import trained_steps
from genreward.rewards.base import reward_from_specs
from genreward.sampling import step_terms
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
from trainers.losses import flow_kl, group_advantages, grpo_loss
from trainers.passes import UpdateLog, accumulated_updates, stochastic_step_indices
from trainers.prdp import load_checked_prompts, stop_without_finite_rewards
from trainers.run_dir import fault_point

log = logging.getLogger("genreward.grpo")


@dataclass
class GRPOSection:
    """GRPO hyperparameters; defaults are Flow-GRPO's SD3.5 recipe (docs/algorithms/flow_grpo.md §7) but for the
    group layout, which is sized for one GPU (the paper: 48 groups of 24 over 32 GPUs)."""

    epochs: int = 100
    prompts_per_epoch: int = 8  # K groups per epoch, over all processes
    group_size: int = 8  # G samples per prompt
    minibatch_size: int = 8  # trajectories per gradient minibatch
    gradient_accumulation_steps: int = 4  # minibatches per optimiser step
    inner_epochs: int = 1
    clip_range: float = 1e-4  # PPO ratio clip ε
    adv_clip_max: float = 5.0
    beta: float = 0.0  # KL weight (SD3.5 GenEval/OCR use 0.04)
    global_std: bool = True  # advantage std over the whole epoch (Flow-GRPO's SD3 configs) or per group
    timestep_fraction: float = 0.99  # train steps 0 … int(T·fraction) − 1 (of those that are stochastic)
    drop_zero_advantage: bool = True  # samples of constant-reward groups carry no gradient

    def __post_init__(self) -> None:
        for name in ("epochs", "prompts_per_epoch", "group_size", "minibatch_size", "gradient_accumulation_steps",
                     "inner_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"key 'grpo.{name}' must be >= 1, got {getattr(self, name)}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"key 'grpo.timestep_fraction' must be in (0, 1], got {self.timestep_fraction}")
        if self.clip_range <= 0 or self.beta < 0:
            raise ValueError("keys 'grpo.clip_range' must be > 0 and 'grpo.beta' >= 0")


def _grpo_train_defaults() -> TrainSection:
    return TrainSection(optim=OptimSection(lr=3e-4, weight_decay=1e-4))


@dataclass
class GRPOConfig(PolicyConfig):
    """``trainer: grpo``. Checkpoints count epochs: ``checkpoint-<epochs done>``."""

    trainer: Literal["grpo"] = "grpo"
    grpo: GRPOSection = field(default_factory=GRPOSection)
    train: TrainSection = field(default_factory=_grpo_train_defaults)


def train(config: GRPOConfig) -> dict:
    g = config.grpo
    prompts = load_checked_prompts(config, g.prompts_per_epoch, "grpo.prompts_per_epoch")
    eval_items = TrainingRun.load_eval_prompts(config)
    reward = reward_from_specs(config.reward)
    eval_rewards = eval_reward_list(config.eval, reward)
    run = TrainingRun(config, need_reference=g.beta > 0, unit="epoch", checkpoint_objects=stateful_objects(reward))
    acc = run.accelerator
    total = g.prompts_per_epoch * g.group_size
    local = run.local_slice(total, "grpo.prompts_per_epoch × grpo.group_size")
    if eval_items and run.start == 0:
        run.evaluate("before", eval_items, eval_rewards)
    progress = training_progress(acc, run.start, g.epochs)
    reduction = config.sample.logprob_reduction

    for epoch in range(run.start, g.epochs):
        timer = Timer()
        # 1. K prompts (same draw on every process), each repeated G times: group k = samples k·G … k·G + G − 1.
        gen = torch.Generator().manual_seed(derived_seed(config.train.seed, epoch, 0))
        chosen = torch.randperm(len(prompts), generator=gen)[: g.prompts_per_epoch].tolist()
        group_of = [k for k in range(g.prompts_per_epoch) for _ in range(g.group_size)]
        items = [prompts[chosen[k]] for k in group_of]
        texts = [it.prompt for it in items[local]]
        seeds = [derived_seed(config.train.seed, epoch, 1, i) for i in range(local.start, local.stop)]
        # 2. Trajectories from π_θ_old.
        with timer("sampling"):
            traj = run.sample(texts, seeds)
        # 3. Rewards of every process → group-relative advantages.
        with timer("reward"), torch.no_grad():
            rewards = reward(traj.images, texts, metadata=[it.metadata for it in items[local]],
                             **run.reward_context()).scores.detach().float().to(acc.device)
        all_rewards = run.gather_rewards(rewards).cpu().numpy()
        adv_all = group_advantages(all_rewards, group_of, global_std=g.global_std, clip=g.adv_clip_max)
        advantages = torch.as_tensor(np.asarray(adv_all)[local], dtype=torch.float32, device=acc.device)
        steps = _trained_steps(traj, g.timestep_fraction)
        keep = torch.nonzero(advantages != 0).reshape(-1) if g.drop_zero_advantage else torch.arange(len(traj))
        # 4. PPO-clipped updates over minibatches × trained steps.
        log = UpdateLog()

        def slot_loss(slot):
            mb, j = slot
            index = mb.to(traj.latents.device)
            with acc.autocast():
                log_prob, mean, std = step_terms(run.unet, run.family, traj, j, index, reduction)
            loss, stats = grpo_loss(log_prob, traj.log_probs[mb, j], advantages[mb], g.clip_range, g.adv_clip_max)
            if g.beta > 0:
                with torch.no_grad(), run.reference() as ref, acc.autocast():
                    _, mean_ref, _ = step_terms(ref, run.family, traj, j, index, reduction)
                kl = flow_kl(mean, mean_ref, std)
                loss, stats = loss + g.beta * kl, {**stats, "kl": kl.detach()}
            return loss, stats

        grad_norm = float("nan")
        with timer("training"):
            for inner in range(g.inner_epochs):
                shuffle = torch.Generator().manual_seed(derived_seed(config.train.seed, epoch, 2, acc.process_index, inner))
                order = keep[torch.randperm(keep.numel(), generator=shuffle)]
                minibatches = [order[i : i + g.minibatch_size] for i in range(0, order.numel(), g.minibatch_size)]
                slots = [(mb, j) for mb in minibatches for j in steps]
                norm = accumulated_updates(run, slots, g.gradient_accumulation_steps * len(steps), slot_loss, log)
                grad_norm = norm if slots else grad_norm
        fault_point("unit")
        all_texts = [prompts[chosen[k]].prompt for k in group_of]
        record = epoch_record(run, epoch, reward.name, rewards.view(-1, 1), torch.isfinite(rewards).view(-1, 1), prompts=all_texts)
        record.update(log.means())
        record.update(ratio_first=log.first_ratio, grad_norm=grad_norm, lr=config.train.optim.lr, peak_rss_mb=peak_rss_mb(),
                      trained_samples=int(keep.numel()), trained_steps=len(steps))
        record.update({f"time_{k}": round(v, 4) for k, v in timer.seconds.items()})
        run.log_metrics(record)
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward_mean']:.4g}", kl=f"{record.get('approx_kl', 0):.2g}")
        stop_without_finite_rewards(run, progress, rewards, epoch, reward.name)
        run.end_of_epoch(epoch, g.epochs, eval_items, eval_rewards)
    progress.close()
    return run.finish(g.epochs, eval_items, eval_rewards)


def _trained_steps(traj, fraction: float) -> list[int]:
    """Flow-GRPO's first int(T·fraction) steps, kept where the trajectory is stochastic (its SDE window)."""
    stochastic = set(stochastic_step_indices(traj))
    steps = [j for j in trained_steps(traj.num_steps, fraction) if j in stochastic]
    if not steps:
        raise GenrewardError(f"no step to train: grpo.timestep_fraction={fraction} of {traj.num_steps} steps leaves none "
                             "inside the stochastic steps (sample.sde_window / sample.eta / sample.noise_level)")
    return steps
